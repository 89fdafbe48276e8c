"""The docs cannot rot: docs/reference.md is what docs/make_reference.py writes from the code; every --flag and every
NAME=value setting that README.md and docs/*.md name (in code spans and code blocks) exists; every stage option and
every run.sh setting is in the reference. Reads the files as they are when the test runs; no model is loaded."""
import dataclasses
import difflib
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
make_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_reference)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
READ = re.compile(r"\$\{([A-Z][A-Z0-9_]*):-")  # a variable a script reads: ${NAME:-default}
# flags of other programs the docs show: torchrun's, pip's, pytest's, tensorboard's, the Qwen2.5-Math harness's
EXTERNAL_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--standalone",
                  "--no-python", "--upgrade", "--no-deps", "--index-url", "--extra-index-url", "--target", "--pre",
                  "--no-cache-dir", "--force-reinstall", "--user", "--requirement", "--quiet", "--durations",
                  "--maxfail", "--logdir", "--prompt_type", "--max_tokens_per_call",
                  "--host", "--port", "--api-key", "--served-model-name", "--pooler-config"}  # the last five: `vllm serve`'s
EXTERNAL_PREFIXES = ("--rdzv_", "--rdzv-")
# environment variables of other programs (and of the tests) the docs may set; OPENAI_API_KEY is the openai client's
# (stepkto/served.py's default key variable); ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA pin torch's,
# MKL's and oneDNN's CPU kernels to one instruction set; the last three preload glibc's debugging malloc and set it
ENVIRONMENT = {"CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_PROJECT",
               "STEPKTO_DATA_DIR", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "OPENAI_API_KEY",
               "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
               "LD_PRELOAD", "MALLOC_CHECK_", "MALLOC_MMAP_THRESHOLD_"}


def code_of(markdown: str) -> list[str]:
    """The text of a markdown file's fenced code blocks and inline code spans."""
    fence = re.compile(r"^ *(```|~~~).*?$(.*?)^ *\1", re.M | re.S)
    blocks = [m[2] for m in fence.finditer(markdown)]
    span = re.compile(r"(`+)((?:(?!\n\s*\n).)+?)(?<!`)\1(?!`)", re.S)  # within a paragraph
    spans = [m[2] for m in span.finditer(fence.sub("", markdown))]
    return blocks + spans


def named(path: Path, pattern: str) -> set[str]:
    return {m for text in code_of(path.read_text()) for m in re.findall(pattern, text)}


def flags_named(path: Path) -> set[str]:
    return named(path, r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])")


def settings_named(path: Path) -> set[str]:
    return named(path, r"(?<![\w$])([A-Z][A-Z0-9_]+)=(?!=)")


def stage_flags() -> set[str]:
    """Every spelling HfArgumentParser accepts: --name, --name-with-dashes, and --no_name for a bool that is true."""
    flags = set()
    for stage in make_reference.STAGES:
        for f in dataclasses.fields(importlib.import_module(stage).Args):
            names = [f.name] + ([f"no_{f.name}"] if f.default is True else [])
            flags |= {f"--{n}" for n in names} | {f"--{n.replace('_', '-')}" for n in names}
    return flags


def setup_flags() -> set[str]:
    """The flags setup.sh's `case $flag in` takes."""
    patterns = re.findall(r"^\s+(-[\w|-]+)\)", (ROOT / "setup.sh").read_text(), re.M)
    return {flag for p in patterns for flag in p.split("|")}


def own_test_flags() -> set[str]:
    """tests/run.sh's own flags (`"${1:-}" = --quick`)."""
    return set(re.findall(r'"\$\{1:-\}" = (--[\w-]+)', (ROOT / "tests" / "run.sh").read_text()))


def test_quick_tier_names_test_files_that_exist():
    """tests/run.sh --quick lists test modules by name: a renamed or removed one would make pytest fail late."""
    quick = re.search(r'QUICK="([^"]*)"', (ROOT / "tests" / "run.sh").read_text()).group(1).split()
    assert quick, "tests/run.sh lists no quick tier"
    missing = [name for name in quick if not (ROOT / "tests" / f"{name}.py").exists()]
    assert not missing, f"tests/run.sh --quick names test files that do not exist: {', '.join(missing)}"


def bench_flags() -> set[str]:
    """The options the bench/*.py scripts give argparse, read from their source (not imported)."""
    calls = [c for p in (ROOT / "bench").glob("*.py") for c in re.findall(r"add_argument\(([^)]*)", p.read_text())]
    return {flag for c in calls for flag in re.findall(r"""["'](--[\w-]+)["']""", c)}


def script_settings(*paths: Path) -> set[str]:
    return {name for p in paths for name in READ.findall(p.read_text())}


def test_reference_is_generated():
    committed = (ROOT / "docs" / "reference.md").read_text()
    generated = make_reference.render()
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                             "docs/reference.md", "generated"))[:40])
    assert generated == committed, f"docs/reference.md is stale: run `{make_reference.COMMAND}`\n{diff}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_flags_exist(doc):
    known = stage_flags() | setup_flags() | own_test_flags() | bench_flags() | EXTERNAL_FLAGS
    missing = sorted(f for f in flags_named(doc) if f not in known and not f.startswith(EXTERNAL_PREFIXES))
    assert not missing, f"{doc.name} names flags that no stage, setup.sh or bench/*.py has: {', '.join(missing)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_settings_exist(doc):
    known = ENVIRONMENT | script_settings(ROOT / "run.sh", ROOT / "setup.sh", *(ROOT / "bench").glob("*.sh"))
    missing = sorted(s for s in settings_named(doc) if s not in known and not s.startswith("VLLM_"))
    assert not missing, f"{doc.name} sets variables that run.sh and the scripts do not read: {', '.join(missing)}"


def sections(markdown: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in re.split(r"^## ", markdown, flags=re.M)[1:]}


def test_every_stage_is_referenced():
    """A top-level script with a command line (an Args dataclass) is a stage of the reference."""
    has_args = lambda p: re.search(r"^class Args\b", p.read_text(), re.M)  # noqa: E731
    stages = {p.stem for p in ROOT.glob("*.py") if has_args(p)}
    stages |= {f"stepkto.{p.stem}" for p in (ROOT / "stepkto").glob("*.py") if has_args(p)}
    assert stages == set(make_reference.STAGES), "docs/make_reference.py's STAGES: add the new stage"


def test_reference_is_complete():
    reference = sections((ROOT / "docs" / "reference.md").read_text())
    missing = [f"{stage}.py --{f.name}" for stage in make_reference.STAGES
               for f in dataclasses.fields(importlib.import_module(stage).Args)
               if f"| `--{f.name}`" not in reference.get(make_reference.title(stage), "")]
    missing += [f"run.sh {name}" for name in sorted(script_settings(ROOT / "run.sh"))
                if f"| `{name}` |" not in reference.get("run.sh", "")]
    missing += [f"setup.sh {flag}" for flag in sorted(setup_flags())
                if f"`{flag}`" not in reference.get("setup.sh", "")]
    missing += [f"setup.sh {name}" for name in sorted(script_settings(ROOT / "setup.sh"))
                if f"| `{name}` |" not in reference.get("setup.sh", "")]
    assert not missing, f"docs/reference.md lacks: {', '.join(missing)}"


def test_readme_loss_snippet_runs_as_written():
    """The README's "Using the loss in your own trainer" snippet, run as it stands: every tensor it needs is in it."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the loss in your own trainer", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (loss snippet)", "exec"), namespace)
    assert namespace["policy_logps"].grad is not None  # the snippet ran its backward
    assert set(namespace["metrics"]) >= {"loss/total", "loss/outcome", "loss/step", "kl/z0"}


def test_readme_names_the_lines_of_the_step():
    """The README's map from the paper to the code names the lines of train.train, the Step-KTO step, as they stand."""
    import ast

    found = re.search(r"`train\.train`, train\.py lines (\d+)-(\d+)", (ROOT / "README.md").read_text())
    tree = ast.parse((ROOT / "train.py").read_text())
    step = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "train")
    assert found and (int(found[1]), int(found[2])) == (step.lineno, step.end_lineno)
