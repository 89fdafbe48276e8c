"""End-to-end smoke test of run.sh with a tiny budget: every stage runs for real (data, SFT from scratch,
generate, label, train, evaluate, report), and a rerun skips every finished stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    NUM_TRAIN=6, NUM_TEST=6, NUM_SFT=32, SFT_EPOCHS=1, SFT_BATCH=8, HIDDEN=64, LAYERS=1, FFN=64,
    SAMPLES=2, MAX_NEW_TOKENS=24, BATCH=4, ITERATIONS=2, THREADS=1,
)


def run_sh(runs: Path, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, **{k: str(v) for k, v in TINY.items()}, "RUNS": str(runs), "PYTHON": sys.executable, **settings}
    return subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def results(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "results.jsonl").read_text().splitlines()]


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


def test_run_sh_refuses_the_former_objective_setting(tmp_path):
    """OBJECTIVE (one objective) became OBJECTIVES: the old name is refused, never silently ignored."""
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
    precision (float32 weights, bf16 autocast): train.py refuses bf16 weights."""
    import pytest

    import common

    import models
    import grading

    if not (grading.default_data_dir() / "amc23.jsonl").exists():
        pytest.skip("../shared/data/amc23.jsonl is absent")
    model = tmp_path / "seed-model"
    tok = models.make_char_tokenizer()
    models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=64, max_len=2048).save_pretrained(model)
    tok.save_pretrained(model)
    problems = tmp_path / "train.jsonl"
    problems.write_text("".join(json.dumps({"id": f"t{i}", "problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(4)))
    env = {**os.environ, **{k: str(v) for k, v in TINY.items()}, "RUNS": str(tmp_path / "runs"), "PYTHON": sys.executable,
           "MODEL": str(model), "TRAIN_PROBLEMS": str(problems), "BENCHMARK": "amc23", "PRM": "judge",
           "JUDGE_MODEL": str(model), "JUDGE_DTYPE": "float64", "JUDGE_PROTOCOL": "first_error",
           "ENGINE": "transformers", "ITERATIONS": "1", "MAX_NEW_TOKENS": "12", "OBJECTIVES": "step-kto",
           "DTYPE": "bfloat16"}
    proc = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "sft from" not in proc.stdout  # the given model is M0
    judge = f"step labeller: judge with {model} (engine transformers, dtype float64, tensor_parallel_size 1, protocol first_error)"
    assert proc.stdout.count(judge) == 3  # evaluate M0, label iteration 1, evaluate M1
    rows = [json.loads(l) for l in (tmp_path / "runs" / "seed0" / "step-kto" / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["M0", "M1"] and all(r["n_problems"] == 40 for r in rows)
    samples = common.read_jsonl(tmp_path / "runs" / "seed0" / "step-kto" / "iter1" / "samples.jsonl")
    assert len(samples) == 4 * TINY["SAMPLES"] and "step by step" in samples[0]["prompt"]
    trained = json.loads((tmp_path / "runs" / "seed0" / "step-kto" / "M1" / "train_args.json").read_text())
    assert (trained["dtype"], trained["autocast"]) == ("float32", "bfloat16")


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
    assert len(one.read_text().splitlines()) == TINY["NUM_TRAIN"]
    assert loop.stdout.count("/seed0/M0 is already a complete checkpoint: nothing to do") == 2  # no SFT
    # run.sh's own table for each setting, then the default's (Step-KTO only) and each setting's
    assert loop.stdout.count("| step-kto | M1 | 1 |") == 5 and loop.stdout.count("| kto | M1 | 1 |") == 4

    bad = subprocess.run(["bash", str(REPO / "bench" / "ablation_loop.sh")], cwd=REPO, capture_output=True, text=True,
                         env={**env, "SEEDS": "1"})
    assert bad.returncode == 2 and "seed1/data missing" in bad.stderr
