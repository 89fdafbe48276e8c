"""Every output records what made it, and no stage reuses an output made by anything else: samples, labels, an
evaluation folder, a checkpoint and the built-in task's data, each rerun on changed inputs or settings; shards of
other inputs never merge; one writer per output; the record itself (stepkto/provenance.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepkto import arith_task, jsonl, provenance, sharding

REPO = Path(__file__).resolve().parents[1]


def run(script, *args, check=True) -> subprocess.CompletedProcess:
    entry = [str(REPO / script)] if script.endswith(".py") else ["-m", script]  # a stage, or a module of the package
    cmd = [sys.executable, *entry, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def refusal(proc) -> str:
    """The one line a refused stage ends with (no traceback)."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def sample_rows(completions: list[str]) -> list[dict]:
    return [{"id": f"p{i}#0", "problem_id": f"p{i}", "problem": "Compute 3 + 4.", "answer": "7",
             "prompt": "Problem: Compute 3 + 4.\nSolution:\n", "completion": c, "finish_reason": "stop"}
            for i, c in enumerate(completions)]


RIGHT = ["3 + 4 = 7\n\n\\boxed{7}"] * 4
WRONG = ["3 + 4 = 8\n\n\\boxed{7}"] * 4  # the same ids, other content: the step is wrong


@pytest.fixture
def samples(tmp_path) -> Path:
    path = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(path, sample_rows(RIGHT))
    return path


def label_args(samples, out, *extra):
    return ["--input", samples, "--output", out, "--prm", "check", "--chunk_size", 2, *extra]


def test_labels_of_changed_samples_are_refused_then_redone(samples, tmp_path):
    out = tmp_path / "labels.jsonl"
    run("label.py", *label_args(samples, out))
    assert run("label.py", *label_args(samples, out)).stdout.count("nothing to do") == 1
    jsonl.write_jsonl_atomic(samples, sample_rows(WRONG))
    line = refusal(run("label.py", *label_args(samples, out), check=False))
    assert "labels.jsonl was made from other samples (samples.jsonl changed)" in line and "--on_change redo" in line
    assert all(r["labels"] == [True, True] for r in jsonl.read_jsonl(out))  # nothing lost or half-written
    redo = run("label.py", *label_args(samples, out, "--on_change", "redo"))
    assert "making it again" in redo.stdout
    assert all(r["labels"][0] is False for r in jsonl.read_jsonl(out))
    record = json.loads((tmp_path / "labels.jsonl.provenance.json").read_text())
    assert record["inputs"]["samples"]["sha256"] == provenance.file_sha256(samples)
    assert record["settings"]["prm"] == "check" and record["stage"] == "label.py"


def test_a_shard_on_other_samples_never_merges(samples, tmp_path):
    """Shard 0 of 2 labels the old samples, shard 1 is started on new ones with the same ids: refused, and the
    output is never written from both."""
    out = tmp_path / "labels.jsonl"
    run("label.py", *label_args(samples, out), "--num_shards", 2, "--shard_index", 0)
    jsonl.write_jsonl_atomic(samples, sample_rows(WRONG))
    line = refusal(run("label.py", *label_args(samples, out), "--num_shards", 2, "--shard_index", 1, check=False))
    assert "samples.jsonl changed" in line and not out.exists()


def test_other_labeller_settings_are_named(samples, tmp_path):
    out = tmp_path / "labels.jsonl"
    run("label.py", *label_args(samples, out))
    other = ["--input", samples, "--output", out, "--prm", "check", "--chunk_size", 3]
    line = refusal(run("label.py", *other, check=False))
    assert "--chunk_size 2 -> 3" in line


def test_one_writer_per_output(samples, tmp_path):
    """A second process started on an output that another process is writing refuses with one line."""
    out = tmp_path / "labels.jsonl"
    sharding.claim(out)  # this test process is the first writer
    try:
        line = refusal(run("label.py", *label_args(samples, out), check=False))
    finally:
        sharding.release(out)
    assert "is being written by another process" in line and not out.exists()
    run("label.py", *label_args(samples, out))  # once the first writer is gone, the output is written


def test_evaluation_of_another_benchmark_is_refused(tiny_model, tmp_path):
    """Two benchmark files with the same ids: the folder holding the first one's evaluation is not reported for
    the second."""
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    rows = arith_task.make_split("test", 4, seed=0)
    jsonl.write_jsonl_atomic(first, rows)
    jsonl.write_jsonl_atomic(second, [{**r, "problem": r["problem"].replace("Compute", "Evaluate")} for r in rows])

    def evaluate(benchmark, *extra):
        return run("evaluate.py", "--model", tiny_model, "--benchmark", benchmark, "--output_dir", tmp_path / "eval",
                   "--max_new_tokens", 8, "--prompt_style", "minimal", "--engine", "transformers", *extra,
                   check=False)

    assert evaluate(first).returncode == 0
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert result["provenance"]["inputs"]["benchmark"]["sha256"] == provenance.json_sha256(rows)
    line = refusal(evaluate(second))
    assert "eval was made from other benchmark (second.jsonl changed)" in line
    assert evaluate(second, "--on_change", "redo").returncode == 0
    assert json.loads((tmp_path / "eval" / "result.json").read_text())["provenance"] != result["provenance"]


def sft_args(data, out, *extra):
    return ["--objective", "sft", "--model", "scratch", "--hidden_size", 64, "--num_layers", 1,
            "--intermediate_size", 64, "--per_device_batch_size", 8, "--data", data, "--output_dir", out,
            "--prompt_style", "minimal", *extra]


def test_checkpoint_of_other_settings_or_data_is_refused(tmp_path):
    data = tmp_path / "data"
    run("stepkto.arith_task", "--output_dir", data, "--num_train", 4, "--num_test", 4, "--num_sft", 16)
    out = tmp_path / "M0"
    run("train.py", *sft_args(data / "sft.jsonl", out))
    assert "nothing to do" in run("train.py", *sft_args(data / "sft.jsonl", out)).stdout
    line = refusal(run("train.py", *sft_args(data / "sft.jsonl", out, "--lr", 1e-3), check=False))
    assert "M0 was made with other settings (--lr 1e-05 -> 0.001)" in line
    line = refusal(run("stepkto.arith_task", "--output_dir", data, "--num_train", 4, "--num_test", 4, "--num_sft", 8,
                       check=False))
    assert "--num_sft 16 -> 8" in line
    run("stepkto.arith_task", "--output_dir", data, "--num_train", 4, "--num_test", 4, "--num_sft", 8, "--on_change", "redo")
    line = refusal(run("train.py", *sft_args(data / "sft.jsonl", out), check=False))
    assert "from other data (sft.jsonl changed)" in line
    run("train.py", *sft_args(data / "sft.jsonl", out, "--on_change", "redo"))
    record = json.loads((out / "provenance.json").read_text())
    assert record["inputs"]["data"]["sha256"] == provenance.file_sha256(data / "sft.jsonl")
    assert record["models"]["model"] == {"name": "scratch"} and record["settings"]["world_size"] == 1
    # a model folder is known by its own record: what it was made from travels with it
    assert provenance.model_identity(str(out)) == {"made_by": provenance.file_sha256(out / "provenance.json")}


def test_an_output_without_a_record_is_not_reused(samples, tmp_path):
    """An output that no record vouches for (an older stepkto, a file put there by hand) is not reused."""
    out = tmp_path / "labels.jsonl"
    jsonl.write_jsonl_atomic(out, [{"id": "x"}])
    line = refusal(run("label.py", *label_args(samples, out), check=False))
    assert "made by an unknown run (no provenance record)" in line


def test_record_compares_content_not_paths(tmp_path):
    a = provenance.make_record("s", {"x": {"sha256": "1", "path": "/a/x"}}, {}, {"lr": 1})
    moved = provenance.make_record("s", {"x": {"sha256": "1", "path": "/b/x"}}, {}, {"lr": 1})
    other = provenance.make_record("s", {"x": {"sha256": "2", "path": "/b/x"}}, {"model": {"name": "m"}}, {"lr": 2})
    assert provenance.same(a, moved) and not provenance.same(a, other)
    assert provenance.changes(a, other) == "from other x (x changed), with another --model, with other settings (--lr 1 -> 2)"


def test_model_identity_of_a_folder_is_its_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1")
    before = provenance.model_identity(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"2")
    assert "sha256" in before and provenance.model_identity(str(tmp_path)) != before
    assert provenance.model_identity("some-org/served-name") == {"name": "some-org/served-name"}
