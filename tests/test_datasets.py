"""Tests for the training sets in grading.BENCHMARKS whose gold answer is the last \\boxed{} of the
reference solution (math_train: DigitalLearningGmbH/MATH-lighteval; numina_cot: AI-MO/NuminaMath-CoT),
read from files written in the hub's field layout, and for the same rule in a user's problem file.
Nothing here reaches the hub: the offline tests set the offline variables, the hub test fakes datasets."""

import json
import re
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from stepkto import grading

DROPPED = "without a final \\boxed{} answer in their solution"

# MATH-lighteval's fields: problem, level, solution, type
MATH_ROWS = [
    {"problem": "What is $1/2$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "One half is $\\boxed{\\frac{1}{2}}$."},  # nested braces
    {"problem": "Show that it holds.", "level": "Level 5", "type": "Algebra",
     "solution": "It holds, as shown."},  # no \boxed{}: cannot be graded, dropped
    {"problem": "Pick one.", "level": "Level 2", "type": "Counting & Probability",
     "solution": "First $\\boxed{3}$, corrected: the answer is $\\boxed{007}$."},  # the last box
]


def _numina_row(problem: str, solution: str) -> dict:
    """A row in NuminaMath-CoT's layout: source, problem, solution, messages."""
    messages = [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]
    return {"source": "synthetic_math", "problem": problem, "solution": solution, "messages": messages}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _fake_datasets(monkeypatch, load_dataset):
    for variable in grading._OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(HF_HUB_OFFLINE=False), load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_training_sets_take_gold_from_the_solution_box():
    assert grading.BENCHMARKS["math_train"] == grading.Benchmark(
        "math_train.jsonl", "DigitalLearningGmbH/MATH-lighteval", "default", "train", grading.SOLUTION_BOX
    )
    assert grading.BENCHMARKS["numina_cot"] == grading.Benchmark(
        "numina_cot.jsonl", "AI-MO/NuminaMath-CoT", None, "train", grading.SOLUTION_BOX
    )
    others = [b for name, b in grading.BENCHMARKS.items() if name not in ("math_train", "numina_cot")]
    assert all(b.gold == grading.ANSWER_FIELD for b in others)


def test_math_train_local_file_drops_and_counts_rows_without_a_box(tmp_path, capsys):
    _write_jsonl(tmp_path / "math_train.jsonl", MATH_ROWS)
    rows = grading.load_benchmark("math_train", data_dir=tmp_path)
    assert rows == [
        {"id": "math_train-1", "problem": "What is $1/2$?", "answer": "\\frac{1}{2}",
         "solution": "One half is $\\boxed{\\frac{1}{2}}$."},
        {"id": "math_train-3", "problem": "Pick one.", "answer": "7",  # "007" normalised as AIME's
         "solution": "First $\\boxed{3}$, corrected: the answer is $\\boxed{007}$."},
    ]
    assert capsys.readouterr().err == f"math_train: dropped 1 of 3 rows {DROPPED}\n"
    assert grading.load_benchmark("math_train", split="train", data_dir=tmp_path) == rows
    with pytest.raises(ValueError, match=r"holds only the 'train' split of math_train, not 'test'$"):
        grading.load_benchmark("math_train", split="test", data_dir=tmp_path)


def test_numina_cot_local_file_counts_drops_in_one_line(tmp_path, capsys):
    rows = [_numina_row(f"Prove {i}.", "Trivial.") for i in range(1000)]
    rows += [_numina_row("Sum?", "So $x = \\boxed{\\frac{1}{2}}$."), _numina_row("Empty?", "$\\boxed{ }$")]
    _write_jsonl(tmp_path / "numina_cot.jsonl", rows)
    assert grading.load_benchmark("numina_cot", data_dir=tmp_path) == [
        {"id": "numina_cot-1001", "problem": "Sum?", "answer": "\\frac{1}{2}",
         "solution": "So $x = \\boxed{\\frac{1}{2}}$."},
    ]
    err = capsys.readouterr().err
    assert err == f"numina_cot: dropped 1,001 of 1,002 rows {DROPPED}\n"  # an empty box is no answer


@pytest.mark.parametrize("name", ["math_train", "numina_cot"])
def test_training_set_with_every_row_dropped_raises(tmp_path, name):
    path = _write_jsonl(tmp_path / f"{name}.jsonl", [_numina_row("A?", "No box."), _numina_row("B?", "None.")])
    with pytest.raises(ValueError) as error:
        grading.load_benchmark(name, data_dir=tmp_path)
    assert str(error.value) == (
        f"{name}: none of the 2 rows of {path} has a final \\boxed{{}} answer in its solution, so none can be graded"
    )


@pytest.mark.parametrize(
    "name, hub",
    [
        ("math_train", "DigitalLearningGmbH/MATH-lighteval (config default, split train)"),
        ("numina_cot", "AI-MO/NuminaMath-CoT (split train)"),
    ],
)
def test_training_set_found_nowhere_raises_one_line_naming_both_places(tmp_path, monkeypatch, name, hub):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # also when datasets was imported before (by another test)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as error:
        grading.load_benchmark(name, data_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"benchmark {name!r} not found: no file {tmp_path / (name + '.jsonl')}, ")
    assert f"the hub dataset {hub} did not load: " in message
    assert re.search(r"did not load: \w+: \S", message), message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_math_train_from_the_hub_gives_the_local_file_rows(tmp_path, monkeypatch, capsys):
    calls = []
    _fake_datasets(monkeypatch, lambda *args, **kwargs: calls.append((args, kwargs)) or MATH_ROWS)
    from_hub = grading.load_benchmark("math_train", data_dir=tmp_path / "empty")
    assert calls == [(("DigitalLearningGmbH/MATH-lighteval", "default"), {"split": "train"})]
    assert capsys.readouterr().err == f"math_train: dropped 1 of 3 rows {DROPPED}\n"
    _write_jsonl(tmp_path / "math_train.jsonl", MATH_ROWS)
    assert from_hub == grading.load_benchmark("math_train", data_dir=tmp_path)
    assert [row["id"] for row in from_hub] == ["math_train-1", "math_train-3"]  # the local file's ids


def test_numina_cot_from_the_hub(tmp_path, monkeypatch, capsys):
    calls = []
    raw = [_numina_row("One?", "It is $\\boxed{1}$."), _numina_row("Why?", "Because.")]
    _fake_datasets(monkeypatch, lambda *args, **kwargs: calls.append((args, kwargs)) or raw)
    rows = grading.load_benchmark("numina_cot", data_dir=tmp_path)
    assert calls == [(("AI-MO/NuminaMath-CoT", None), {"split": "train"})]
    assert rows == [{"id": "numina_cot-1", "problem": "One?", "answer": "1", "solution": "It is $\\boxed{1}$."}]
    assert capsys.readouterr().err == f"numina_cot: dropped 1 of 2 rows {DROPPED}\n"


def test_problem_file_row_without_answer_takes_its_solution_box(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        {"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},  # no answer field
        {"problem": "Two?", "answer": "2", "solution": "Say $\\boxed{3}$."},  # the answer field wins
    ])
    assert grading.load_benchmark(str(path)) == [
        {"id": "mine-1", "problem": "Half?", "answer": "\\frac{1}{2}", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"id": "mine-2", "problem": "Two?", "answer": "2", "solution": "Say $\\boxed{3}$."},
    ]
    assert capsys.readouterr().err == ""  # a user's file drops nothing


@pytest.mark.parametrize(
    "row",
    [
        {"problem": "p"},
        {"problem": "p", "solution": "no box here"},
        {"problem": "p", "solution": "an empty $\\boxed{}$"},
        {"problem": "p", "solution": "cut off $\\boxed{\\frac{1"},
    ],
)
def test_problem_file_row_without_answer_or_box_names_file_line_and_field(tmp_path, row):
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"problem": "q", "answer": "1"}, row])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing field 'answer'") + r" \(and no .*'solution'\)$"):
        grading.load_benchmark(str(path))
