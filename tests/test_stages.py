"""generate.py, label.py, evaluate.py and stepkto/report.py: their JSONL contracts, resuming after kill -9, their
outputs on the built-in task with a real tiny model, and the results table built from run.sh's layout."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stepkto import arith_task, jsonl, models, report
import evaluate
import label

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    jsonl.write_jsonl_atomic(path, arith_task.make_split("test", 12, seed=0))
    return path


def run(script, *args, check=True):
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def gen_args(model, problems, out, chunk_size=4):
    return ["--model", model, "--problems", problems, "--output", out, "--num_samples", 2, "--temperature", 1.0,
            "--max_new_tokens", 24, "--seed", 3, "--chunk_size", chunk_size, "--prompt_style", "minimal"]


def test_generate_schema_and_determinism(tiny_model, problems, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    run("generate.py", *gen_args(tiny_model, problems, a))
    run("generate.py", *gen_args(tiny_model, problems, b, chunk_size=4))
    rows = jsonl.read_jsonl(a, {"id": str, "prompt": str, "completion": str, "finish_reason": str, "gen": dict})
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    assert rows[0]["prompt"].startswith("Problem: Compute") and rows[0]["gen"]["temperature"] == 1.0
    assert all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert a.read_text() == b.read_text()  # same seed, same output
    assert "nothing to do" in run("generate.py", *gen_args(tiny_model, problems, a)).stdout


def kill_when_partial_has_rows(cmd, partial: Path, min_lines: int):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if partial.exists() and partial.read_bytes().count(b"\n") >= min_lines:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    return proc.returncode


def test_generate_resumes_after_kill(tiny_model, problems, tmp_path):
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    run("generate.py", *gen_args(tiny_model, problems, ref, chunk_size=2))
    cmd = [sys.executable, str(REPO / "generate.py"), *map(str, gen_args(tiny_model, problems, out, chunk_size=2))]
    rc = kill_when_partial_has_rows(cmd, Path(str(out) + ".partial"), min_lines=5)
    assert rc == -signal.SIGKILL and not out.exists(), "the kill must come before the output is complete"
    run("generate.py", *gen_args(tiny_model, problems, out, chunk_size=2))
    assert out.read_text() == ref.read_text()  # no duplicate, lost or different rows


def sample_row(i, completion, answer="7"):
    return {"id": f"p{i}#0", "problem_id": f"p{i}", "problem": "Compute 3 + 4.", "answer": answer,
            "prompt": "Problem: Compute 3 + 4.\nSolution:\n", "completion": completion, "finish_reason": "stop"}


def test_label_outcome_steps_and_trl_fields(tmp_path):
    rows = [
        sample_row(0, "3 + 4 = 7\n\nThe answer is \\boxed{7}."),
        sample_row(1, "3 + 4 = 8\n\n8 - 1 = 7\n\nThe answer is \\boxed{7}."),  # right answer, wrong step
        sample_row(2, "3 + 4 = 8\n\nThe answer is \\boxed{8}."),
        sample_row(3, "3 + 4 = 7"),  # no boxed answer
    ]
    src, out = tmp_path / "s.jsonl", tmp_path / "l.jsonl"
    jsonl.write_jsonl_atomic(src, rows)
    run("label.py", "--input", src, "--output", out, "--chunk_size", 3)
    got = jsonl.read_jsonl(out, {"prompt": str, "completions": list, "labels": list, "outcome": bool})
    assert [r["outcome"] for r in got] == [True, True, False, False]
    assert [r["labels"] for r in got] == [[True, True], [False, False, False], [False, True], [True]]
    assert got[1]["completions"] == ["3 + 4 = 8", "8 - 1 = 7", "The answer is \\boxed{7}."]
    assert evaluate.stepwise_error_rate(got) == 0.5


TRL_PRM = REPO / ".venv" / "trl-prm"  # TRL 0.29 (setup.sh): TRL 1.16 no longer ships PRMTrainer


@pytest.mark.skipif(not TRL_PRM.exists(), reason="TRL 0.29 for PRMTrainer not installed (bash setup.sh)")
def test_label_feeds_trl_prm_tokenisation(tmp_path):
    """TRL's PRMTrainer tokenises our rows as they are, with its own tokenize_row."""
    rows = label.label_rows([sample_row(0, "3 + 4 = 8\n\n8 - 1 = 7\n\nThe answer is \\boxed{7}.")], label.Settings(prm="check"))
    jsonl.write_jsonl_atomic(tmp_path / "labels.jsonl", rows)
    code = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from trl.experimental.prm import PRMTrainer
from stepkto import models
row = json.loads(open({str(tmp_path / "labels.jsonl")!r}).readline())
out = PRMTrainer.tokenize_row(row, models.make_char_tokenizer(), "\\n\\n", None, None, False, False)
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": str(TRL_PRM), "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [l for l in out["labels"] if l != -100] == [0, 0, 0]  # one label per step, from our bools
    decoded = models.make_char_tokenizer().decode(out["input_ids"], skip_special_tokens=True)
    assert decoded == rows[0]["prompt"] + rows[0]["completion"] + "\n\n"  # steps + separators = our text


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": "a", "problem": "x"}\n', ":1: missing field 'answer'"),
        ("not json\n", ":1: invalid JSON"),
        ("", "empty"),
    ],
)
def test_label_rejects_malformed_input_and_writes_nothing(tmp_path, text, message):
    src, out = tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    src.write_text(text)
    proc = run("label.py", "--input", src, "--output", out, check=False)
    assert proc.returncode != 0 and message in proc.stderr and str(src) in proc.stderr
    assert not out.exists()


def test_evaluate_writes_result_and_resumes(tiny_model, problems, tmp_path):
    args = ["--model", tiny_model, "--benchmark", problems, "--output_dir", tmp_path / "eval", "--max_new_tokens", 16,
            "--prompt_style", "minimal", "--sample_k", 2]
    run("evaluate.py", *args)
    result = jsonl.read_json(tmp_path / "eval" / "result.json", jsonl.RESULT)
    assert result["n_problems"] == 12 and 0 <= result["pass@1"] <= 1 and "maj@2" in result
    samples = (tmp_path / "eval" / "greedy_samples.jsonl").read_text()
    again = run("evaluate.py", *args)  # a rerun labels nothing again and writes the same result
    assert "nothing to do" in again.stdout and (tmp_path / "eval" / "greedy_samples.jsonl").read_text() == samples
    assert jsonl.read_json(tmp_path / "eval" / "result.json") == result


def fake_result(pass1: float, ser: float | None, n: int = 10) -> dict:
    """A result.json as evaluate.py writes it, with its 95% Wilson intervals."""
    solved = round(n * pass1)
    flawed = round((ser or 0) * solved)
    return {"model": "m", "benchmark": "b", "prm": "check", "n_problems": n, "pass@1": pass1,
            "pass@1_ci95": evaluate.wilson_interval(solved, n), "stepwise_error_rate": ser,
            "stepwise_error_rate_ci95": evaluate.wilson_interval(flawed, solved), "n_correct": solved,
            "n_correct_with_wrong_step": flawed, "truncated": 0}


def test_report_builds_each_runs_table_from_run_sh_layout(tmp_path, capsys):
    """seed<S>/eval/M0 is shared by the objectives of seed S; seed<S>/<objective>/eval/M<i> are the run's."""
    results = {"seed0/eval/M0": (0.5, 0.2), "seed0/step-kto/eval/M1": (0.6, 0.1), "seed0/step-kto/eval/M2": (0.7, None),
               "seed0/kto/eval/M1": (0.4, 0.25), "seed1/eval/M0": (0.3, 0.4), "seed1/step-kto/eval/M1": (0.8, 0.0)}
    for folder, (pass1, ser) in results.items():
        jsonl.write_json_atomic(tmp_path / folder / "result.json", fake_result(pass1, ser))
    (tmp_path / "seed0" / "data").mkdir()  # shared folders are not runs
    (tmp_path / "seed0" / "step-kto" / "eval" / "M3").mkdir()  # an evaluation that has not finished
    report.main(report.Args(runs=str(tmp_path), plot=str(tmp_path / "results.png")))
    table = jsonl.read_jsonl(tmp_path / "seed0" / "step-kto" / "results.jsonl", jsonl.RESULTS_TABLE_ROW)
    assert [(r["name"], r["iteration"], r["objective"], r["seed"], r["pass@1"]) for r in table] == [
        ("M0", 0, "step-kto", 0, 0.5), ("M1", 1, "step-kto", 0, 0.6), ("M2", 2, "step-kto", 0, 0.7)]
    assert list(table[0])[:5] == ["name", "iteration", "objective", "seed", "model"]
    assert [r["name"] for r in jsonl.read_jsonl(tmp_path / "seed0" / "kto" / "results.jsonl")] == ["M0", "M1"]
    out = capsys.readouterr().out
    assert "| step-kto | M0 | 2 | 40.0 ± 14.1 | 30.0 ± 14.1 |" in out  # M0 of both seeds: mean ± spread
    # one seed: the run's 95% Wilson interval, over 10 problems (7 right) and over the 4 correct solutions (1 flawed)
    assert "| step-kto | M2 | 1 | 70.0 [39.7, 89.2] | n/a |" in out  # no correct solution labelled: no rate
    assert "| kto | M1 | 1 | 40.0 [16.8, 68.7] | 25.0 [4.6, 69.9] |" in out
    assert "± 0.0 |" not in out.replace("30.0 ± 14.1", "") and report.FOOTNOTE in out
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_report_without_results_says_where_it_looked(tmp_path):
    with pytest.raises(SystemExit, match="no results under"):
        report.main(report.Args(runs=str(tmp_path)))


def test_wilson_interval():
    lo, hi = evaluate.wilson_interval(15, 30)
    assert lo < 0.5 < hi and hi - lo < 0.4
    assert evaluate.wilson_interval(0, 10)[0] == 0.0
