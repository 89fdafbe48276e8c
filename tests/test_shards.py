"""Data-parallel stages: generate.py, label.py and evaluate.py split their chunks over --num_shards processes,
and the merged output is byte for byte what one process writes; a shard killed -9 and rerun gives the same
bytes; parts written with other settings are refused in one line. (The vLLM engine: tests/test_vllm_engine.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepkto import arith_task, jsonl
from test_stages import kill_when_partial_has_rows

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards") / "problems.jsonl"
    jsonl.write_jsonl_atomic(path, arith_task.make_split("test", 10, seed=1))
    return path


def stage(script: str, *args, shard=None, check=True) -> subprocess.CompletedProcess:
    shard_args = [] if shard is None else ["--num_shards", shard[1], "--shard_index", shard[0]]
    cmd = [sys.executable, str(REPO / script), *map(str, args), *map(str, shard_args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def gen_args(model, problems, out, temperature=1.0):
    return ["--model", model, "--problems", problems, "--output", out, "--num_samples", 2, "--temperature",
            temperature, "--max_new_tokens", 12, "--seed", 5, "--chunk_size", 2, "--prompt_style", "minimal",
            "--engine", "transformers"]


def run_sharded(script: str, args: list, count: int) -> list[str]:
    """Every shard of ``count`` in turn; returns their stdout."""
    return [stage(script, *args, shard=(k, count)).stdout for k in range(count)]


@pytest.fixture(scope="module")
def one_process(tiny_model, problems, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "samples.jsonl"
    stage("generate.py", *gen_args(tiny_model, problems, out))
    return out


@pytest.mark.parametrize("count", [2, 3])
def test_generate_shards_merge_to_one_process_bytes(tiny_model, problems, one_process, tmp_path, count):
    out = tmp_path / "samples.jsonl"
    printed = run_sharded("generate.py", gen_args(tiny_model, problems, out), count)
    assert all("the last shard to finish writes" in p for p in printed[:-1]) and "holds 20 samples" in printed[-1]
    assert out.read_bytes() == one_process.read_bytes()
    # the parts and their locks removed; the record of what made the output kept
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "samples.jsonl", "samples.jsonl.provenance.json"]


def test_more_shards_than_chunks(tiny_model, problems, one_process, tmp_path):
    """10 problems in chunks of 2 are 5 chunks: shards 5..6 of 7 have none and still take part in the merge."""
    out = tmp_path / "samples.jsonl"
    run_sharded("generate.py", gen_args(tiny_model, problems, out), 7)
    assert out.read_bytes() == one_process.read_bytes()


def test_killed_shard_reruns_to_the_same_bytes(tiny_model, problems, one_process, tmp_path):
    out = tmp_path / "samples.jsonl"
    stage("generate.py", *gen_args(tiny_model, problems, out), shard=(1, 2))
    cmd = [sys.executable, str(REPO / "generate.py"), *map(str, gen_args(tiny_model, problems, out)),
           "--num_shards", "2", "--shard_index", "0"]
    part = out.with_name("samples.jsonl.shard-0-of-2.partial")
    rc = kill_when_partial_has_rows(cmd, part, min_lines=3)  # shard 0 holds chunks 0, 2, 4: 12 rows
    assert rc == -9 and not out.exists()
    stage("generate.py", *gen_args(tiny_model, problems, out), shard=(0, 2))
    assert out.read_bytes() == one_process.read_bytes()


def test_parts_with_other_settings_are_refused_in_one_line(tiny_model, problems, tmp_path):
    out = tmp_path / "samples.jsonl"
    stage("generate.py", *gen_args(tiny_model, problems, out), shard=(0, 2))
    other = stage("generate.py", *gen_args(tiny_model, problems, out, temperature=0.7), shard=(1, 2), check=False)
    assert other.returncode != 0 and not out.exists()
    message = other.stderr.strip().splitlines()[-1]
    assert message.startswith("generate.py: error: ") and "--temperature 1.0 -> 0.7" in message
    assert "Traceback" not in other.stderr
    stage("generate.py", *gen_args(tiny_model, problems, out), shard=(0, 3))  # 3 shards' parts are their own
    assert not out.exists()
    stage("generate.py", *gen_args(tiny_model, problems, out), shard=(1, 2))  # the same settings merge
    single = tmp_path / "single.jsonl"
    stage("generate.py", *gen_args(tiny_model, problems, single))
    assert out.read_bytes() == single.read_bytes()


def test_label_shards_merge_to_one_process_bytes(one_process, tmp_path):
    single, merged = tmp_path / "single.jsonl", tmp_path / "merged.jsonl"
    args = ["--input", one_process, "--prm", "check", "--chunk_size", 3]
    stage("label.py", *args, "--output", single)
    run_sharded("label.py", [*args, "--output", merged], 3)
    assert merged.read_bytes() == single.read_bytes()
    assert len(jsonl.jsonl_lines(single.read_text())) == 20


def test_evaluate_shards_merge_to_one_process_bytes(tiny_model, problems, tmp_path):
    """Every shard samples and labels its own chunks; the last one writes result.json, equal to one process's."""
    def args(folder):
        return ["--model", tiny_model, "--benchmark", problems, "--output_dir", folder, "--max_new_tokens", 12,
                "--prompt_style", "minimal", "--engine", "transformers", "--chunk_size", 3, "--sample_k", 2]

    stage("evaluate.py", *args(tmp_path / "single"))
    printed = run_sharded("evaluate.py", args(tmp_path / "sharded"), 2)
    assert "the last shard to finish writes result.json" in printed[0] and "Pass@1" in printed[1]
    for name in ("greedy_samples", "greedy_labels", "sampled_samples", "sampled_labels"):
        assert (tmp_path / "sharded" / f"{name}.jsonl").read_bytes() == (tmp_path / "single" / f"{name}.jsonl").read_bytes()
    single, sharded = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("single", "sharded"))
    assert sharded == single


def test_shard_options_are_checked(tiny_model, problems, tmp_path):
    proc = stage("generate.py", *gen_args(tiny_model, problems, tmp_path / "x.jsonl"), shard=(2, 2), check=False)
    assert proc.returncode != 0 and "--shard_index" in proc.stderr and "Traceback" not in proc.stderr
