"""Tests for stepkto/grading.py: boxed extraction, math-verify grading in killable worker processes (a hung
answer is graded wrong within the timeout, from a non-main thread), Maj@K grouping, and benchmark
loading against the real files in ../shared/data (skipped, with the reason, when they are absent).
Numbers pinned here are measured in bench/notes/grading.md."""

import json
import re
import sys
import threading
import time
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from stepkto import grading, prompting

DATA_DIR = REPO_ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "math500.jsonl").is_file(), reason=f"benchmark files not found in {DATA_DIR}"
)
needs_gsm8k = pytest.mark.skipif(
    not all((DATA_DIR / f"gsm8k_{split}.jsonl").is_file() for split in ("test", "train")),
    reason=f"gsm8k_test.jsonl / gsm8k_train.jsonl not found in {DATA_DIR}",
)
HANG = "9^{9^{9^9}}"  # sympy evaluates this power tower forever; math-verify alone would hang


# ----------------------------------------------------------------------------- extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is $\\boxed{42}$.", "42"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box wins
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and finally \\fbox{4}", "4"),
        ("\\boxed {5}", "5"),  # space before the brace
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not groups
        ("\\boxed{}", ""),
        ("no box here: 42", None),
        ("\\boxed{1} then truncated \\boxed{\\frac{2", None),  # unclosed last box: no answer
        ("\\boxed 5", None),  # brace-less form is not supported
    ],
)
def test_extract_boxed(text, expected):
    assert grading.extract_boxed(text) == expected


# ----------------------------------------------------------------------------- grading


EQUIVALENCES = [  # (gold, pred, equal?): the table in bench/notes/grading.md
    ("25", "025", True),
    ("025", "25", True),
    ("27", "27.0", True),
    ("27.0", "27", True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "1/2", True),
    ("\\frac{1}{2}", "\\dfrac12", True),
    ("\\frac{1}{3}", "0.333333", True),
    ("\\frac{1}{3}", "0.333", False),  # floats are compared rounded to 6 decimals
    ("\\pi", "3.14159265358979", True),
    ("\\pi", "3.14159", False),
    ("1", "0.9999999", False),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
    ("\\frac{\\sqrt{2}}{2}", "1/\\sqrt{2}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("(1,2)", "(2,1)", False),  # ordered pairs keep their order
    ("1,2", "2,1", True),  # a bare list is read as a set
    ("[2,5)", "(2,5)", False),
    ("\\text{(C)}", "C", True),
    ("\\text{(C)}", "(C)", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{Evelyn}", "evelyn", True),
    ("5", "x=5", True),  # lenient: the right-hand side of an equation
    ("x=5", "5", True),
    ("10\\%", "10", True),  # lenient about percent
    ("10\\%", "0.1", True),
    ("5\\text{ cm}", "5", True),
    ("90^\\circ", "90", True),
    ("\\$18.90", "18.9", True),
    ("1000", "1,000", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("25", "$25$", True),
    ("25", "The answer is \\boxed{25}.", True),
    ("25", "The answer is 25", False),  # preds are answers: extract_boxed a completion first
    ("3", "4", False),
    ("10", "10.5", False),
    ("\\frac{1}{2}", "0.51", False),
    ("25", None, False),
    ("25", "  ", False),
]


def test_grade_answers_equivalences():
    golds, preds, expected = zip(*EQUIVALENCES)
    assert grading.grade_answers(list(golds), list(preds)) == list(expected)


def test_grade_answers_rejects_mismatched_lengths_and_non_strings():
    with pytest.raises(ValueError, match="2 gold answers but 1 predictions"):
        grading.grade_answers(["1", "2"], ["1"])
    with pytest.raises(TypeError, match="got float"):
        grading.grade_answers(["1"], [1.0])


def test_hung_answer_is_wrong_within_timeout_from_a_non_main_thread():
    timeout_s, slack_s = 2.0, 3.0  # slack: worker start-up (~0.3 s idle, more on a busy machine), kill
    out = {}

    def grade():
        start = time.monotonic()
        out["verdicts"] = grading.grade_answers(["1"], [HANG], timeout_s=timeout_s)
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=grade)  # SIGALRM-based timeouts cannot work here
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "grading hung"
    assert out["verdicts"] == [False]
    assert timeout_s <= out["elapsed"] < timeout_s + slack_s


def test_pool_replaces_a_killed_worker_and_keeps_grading():
    # one worker: the hung item kills it, the items after it must go to its replacement
    verdicts = grading.grade_answers(["1", "2", "3", "4"], [HANG, "2.0", "4", HANG], timeout_s=1.0, num_workers=1)
    assert verdicts == [False, True, False, False]


def test_worker_that_cannot_start_raises(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits at once, as python without math-verify would
    with pytest.raises(RuntimeError, match="exited while starting"):
        grading.grade_answers(["1"], ["1"])


# ----------------------------------------------------------------------------- Maj@K grouping


def test_group_equivalent_groups_by_grading_not_strings():
    answers = ["1/2", "\\frac{1}{2}", "2", None, "0.5", "\\frac{2}{4}", "2.0", "3"]
    assert grading.group_equivalent_many([answers]) == [[0, 0, 1, -1, 0, 0, 1, 2]]


def test_majority_answers_and_ties():
    lists = [["2", "0.5", "1/2", "\\frac{1}{2}", "2"], ["3", "4", "4.0", "3.0"], [None, None], []]
    assert grading.majority_answers(lists) == ["0.5", "3", None, None]  # 3 votes vs 2; a 2-2 tie: first-seen class


def test_many_lists_graded_in_one_pool():
    lists = [["1/2", "0.5", "1"], ["7", "7.0", None], [], ["x+1", "1+x", "x"]]
    assert grading.group_equivalent_many(lists) == [[0, 0, 1], [0, 0, -1], [], [0, 0, 1]]
    assert grading.majority_answers(lists) == ["1/2", "7", None, "x+1"]


# ----------------------------------------------------------------------------- real benchmarks


def _model_style(answer: str) -> str:
    """A MATH answer as a model tends to write it: \\frac not \\dfrac, no \\left/\\right,
    no degree sign, no \\text{} wrapper, no thin spaces or escaped dollars."""
    answer = re.sub(r"\\[dt]frac", r"\\frac", answer)
    answer = re.sub(r"\\left|\\right", "", answer)
    answer = re.sub(r"\^\{?\\circ\}?", "", answer)
    answer = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer)
    answer = re.sub(r"\\!\s*", "", answer).replace("\\$", "")
    return re.sub(r"\s+", " ", answer).strip()


@needs_data
def test_math500_reference_boxed_answers_grade_equal():
    rows = grading.load_benchmark("math500", data_dir=DATA_DIR)
    boxed = [grading.extract_boxed(row["solution"]) for row in rows]
    assert sum(b is None for b in boxed) == 0
    verdicts = grading.grade_answers([row["answer"] for row in rows], boxed)
    assert sum(verdicts) >= 500  # measured: 500 of 500 (bench/notes/grading.md)
    # ... and a wrong answer (the next row's) is not accepted: measured 3 of 500 "matches", all real
    # (two rows whose neighbour has the same answer, and gold "5" vs "x=5")
    shifted = grading.grade_answers([row["answer"] for row in rows], boxed[1:] + boxed[:1])
    assert sum(shifted) <= 3


@needs_data
def test_math500_answers_rewritten_the_way_models_write_them_grade_equal():
    golds = [row["answer"] for row in grading.load_benchmark("math500", data_dir=DATA_DIR)]
    changed = [(gold, _model_style(gold)) for gold in golds if _model_style(gold) != gold]
    assert len(changed) == 35  # measured
    verdicts = grading.grade_answers([g for g, _ in changed], [p for _, p in changed])
    assert sum(verdicts) == 35, [pair for pair, ok in zip(changed, verdicts) if not ok]


def _raw_answers(name: str) -> list:
    with open(DATA_DIR / f"{name}.jsonl") as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


@needs_data
@pytest.mark.parametrize("name, count", [("aime24", 30), ("amc23", 40)])
def test_competition_answers_written_as_models_write_them(name, count):
    rows = grading.load_benchmark(name, data_dir=DATA_DIR)
    raw = _raw_answers(name)  # AIME24: "025"; AMC23: 27.0
    assert len(rows) == count == len(raw)
    golds, preds = [], []
    for row, official in zip(rows, raw):
        model_writes = [row["answer"], f"\\boxed{{{row['answer']}}}", f"so the answer is $\\boxed{{{row['answer']}}}$."]
        for gold in (row["answer"], str(official)):  # loader-normalised gold and the file's own spelling
            golds += [gold] * (len(model_writes) + 1)
            preds += model_writes + [str(official)]
    assert all(grading.grade_answers(golds, preds))
    wrong = [str(int(row["answer"]) + 1) for row in rows]
    assert not any(grading.grade_answers([row["answer"] for row in rows], wrong))


# ----------------------------------------------------------------------------- loading


@needs_data
def test_load_benchmarks_normalise_answers():
    math500 = grading.load_benchmark("math500", data_dir=DATA_DIR)
    assert len(math500) == 500 and math500[0]["id"] == "test/precalculus/807.json"
    assert [row["answer"] for row in math500[:2]] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q"]  # LaTeX kept
    aime = {row["id"]: row for row in grading.load_benchmark("aime24", data_dir=DATA_DIR)}
    assert aime["67"]["answer"] == "25" and aime["85"]["answer"] == "80"  # were "025", "080"
    assert all(re.fullmatch(r"[1-9]\d*", row["answer"]) for row in aime.values())
    assert all("solution" in row for row in aime.values())
    amc = grading.load_benchmark("amc23", data_dir=DATA_DIR)
    assert [row["answer"] for row in amc[:3]] == ["27", "36", "45"]  # were 27.0, 36.0, 45.0
    assert {row["answer"] for row in amc} >= {"-1", "3159"}
    assert all(set(row) == {"id", "problem", "answer"} for row in amc)


def test_data_dir_defaults_to_env_then_shared_data(tmp_path, monkeypatch):
    monkeypatch.delenv("STEPKTO_DATA_DIR", raising=False)
    assert grading.default_data_dir() == DATA_DIR
    (tmp_path / "aime24.jsonl").write_text(json.dumps({"id": 1, "problem": "p?", "answer": "007"}) + "\n")
    monkeypatch.setenv("STEPKTO_DATA_DIR", str(tmp_path))
    assert grading.load_benchmark("aime24") == [{"id": "1", "problem": "p?", "answer": "7"}]


def test_jsonl_path_with_question_field_and_gsm8k_answers(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        {"question": "How many?", "answer": "3 + 4 = 7 apples.\n#### 1,234"},  # GSM8K format
        {"id": "q2", "problem": "Half?", "answer": "\\frac{1}{2}", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert grading.load_benchmark(str(path)) == [
        {"id": "train-1", "problem": "How many?", "answer": "1234",
         "solution": "3 + 4 = 7 apples.\n\nThe answer is \\boxed{1234}."},  # the step format
        {"id": "q2", "problem": "Half?", "answer": "\\frac{1}{2}", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    ]


GOOD = json.dumps({"id": 1, "problem": "p", "answer": "1"})


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "\n{not json\n", r":2: invalid JSON"),
        (json.dumps({"problem": "p"}) + "\n", r":1: missing field 'answer'"),
        (json.dumps({"answer": "1"}) + "\n", r":1: field 'problem' \(or 'question'\) must be a non-empty string"),
        (json.dumps({"problem": 3, "answer": "1"}) + "\n", r":1: field 'problem'"),
        (json.dumps({"problem": "p", "answer": [1]}) + "\n", r":1: field 'answer' must be .* got list"),
        (json.dumps({"problem": "p", "answer": True}) + "\n", r":1: field 'answer' must be .* got bool"),
        (json.dumps({"problem": "p", "answer": " "}) + "\n", r":1: field 'answer' is empty"),
        (json.dumps({"problem": "p", "answer": "1", "solution": 5}) + "\n", r":1: field 'solution' must be a string"),
        (GOOD + "\n" + GOOD + "\n", r":2: field 'id': duplicate id '1'"),
        ("[1, 2]\n", r":1: expected a JSON object, got list"),
        ("\n\n", r": no rows"),
    ],
)
def test_bad_problem_files_name_file_line_and_field(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        grading.load_benchmark(str(path))


def test_unknown_name_and_meaningless_split(tmp_path):
    with pytest.raises(ValueError, match="not a benchmark name"):
        grading.load_benchmark("math5000")
    path = tmp_path / "p.jsonl"
    path.write_text(GOOD + "\n")
    with pytest.raises(ValueError, match="no splits"):
        grading.load_benchmark(str(path), split="test")


@needs_data
def test_local_benchmark_file_holds_one_split():
    with pytest.raises(ValueError, match="holds only the 'test' split"):
        grading.load_benchmark("math500", split="train", data_dir=DATA_DIR)


# ----------------------------------------------------------------------------- GSM8K


def test_gsm8k_reference_solution_is_in_step_format():
    worked = "  Half of 48 is 48/2 = <<48/2=24>>24.\n\n \nSo $<<48+24=72>>72 in all. \n"
    assert grading.gsm8k_reference_solution(worked, "72") == (
        "Half of 48 is 48/2 = 24.\n\nSo $72 in all.\n\nThe answer is \\boxed{72}."
    )
    assert grading.gsm8k_reference_solution("", "5") == "The answer is \\boxed{5}."


@needs_gsm8k
def test_gsm8k_loads_from_the_local_files():
    test = grading.load_benchmark("gsm8k", data_dir=DATA_DIR)
    train = grading.load_benchmark("gsm8k_train", data_dir=DATA_DIR)
    assert (len(test), len(train)) == (1319, 7473)
    assert test[0] == {
        "id": "gsm8k_test-1",
        "problem": test[0]["problem"],
        "answer": "18",
        "solution": "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n\nThe answer is \\boxed{18}.",
    }
    assert test[0]["problem"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert test[146]["answer"] == "2125"  # "#### 2,125" in the file
    assert (train[0]["id"], train[0]["answer"]) == ("gsm8k_train-1", "72")
    ids = [row["id"] for row in test + train]
    assert len(set(ids)) == len(ids)  # stable (file and line) and unique across both splits
    with pytest.raises(ValueError, match=r"holds only the 'test' split of gsm8k, not 'train' \(use gsm8k_train\)"):
        grading.load_benchmark("gsm8k", split="train", data_dir=DATA_DIR)


@needs_gsm8k
@pytest.mark.parametrize("name, file", [("gsm8k", "gsm8k_test.jsonl"), ("gsm8k_train", "gsm8k_train.jsonl")])
def test_gsm8k_solutions_are_the_worked_lines_as_steps_plus_a_boxed_answer(name, file):

    with open(DATA_DIR / file, encoding="utf-8") as f:
        raw = [json.loads(line)["answer"] for line in f if line.strip()]
    rows = grading.load_benchmark(name, data_dir=DATA_DIR)
    assert len(rows) == len(raw)
    for row, answer in zip(rows, raw):
        worked, final = answer.split("\n#### ")
        assert row["answer"] == final.replace(",", "")
        assert "<<" not in row["solution"] and ">>" not in row["solution"] and "####" not in row["solution"]
        lines = [re.sub(r"<<.*?>>", "", line).strip() for line in worked.split("\n")]
        expected = [line for line in lines if line] + [f"The answer is \\boxed{{{row['answer']}}}."]
        assert prompting.step_texts(row["solution"], prompting.step_spans(row["solution"])) == expected, row["id"]
        assert grading.extract_boxed(row["solution"]) == row["answer"]


@pytest.mark.parametrize(
    "name, file, split", [("gsm8k", "gsm8k_test.jsonl", "test"), ("gsm8k_train", "gsm8k_train.jsonl", "train")]
)
def test_benchmark_found_nowhere_raises_one_line_naming_both_places(tmp_path, monkeypatch, name, file, split):
    monkeypatch.setenv("STEPKTO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # also when datasets was imported before (by another test)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError) as error:
        grading.load_benchmark(name)
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / file) in message
    assert f"openai/gsm8k (config main, split {split})" in message
    assert re.search(r"did not load: \w+: \S", message), message  # the hub error's type and first line
    assert error.value.__cause__ is None and error.value.__suppress_context__


def _fake_datasets(monkeypatch, load_dataset):
    for variable in grading._OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(HF_HUB_OFFLINE=False), load_dataset=load_dataset)
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_hub_fallback_gives_the_rows_and_ids_of_the_local_file(tmp_path, monkeypatch):
    raw = [{"question": "One?", "answer": "1 = <<1=1>>1\n#### 1"}, {"question": "Big?", "answer": "x\n#### 1,000"}]
    calls = []
    _fake_datasets(monkeypatch, lambda *args, **kwargs: calls.append((args, kwargs)) or raw)
    (tmp_path / "gsm8k_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in raw))
    from_hub = grading.load_benchmark("gsm8k", data_dir=tmp_path / "empty")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert from_hub == grading.load_benchmark("gsm8k", data_dir=tmp_path)
    assert [row["id"] for row in from_hub] == ["gsm8k_test-1", "gsm8k_test-2"]
    assert grading.load_benchmark("gsm8k", split="train", data_dir=tmp_path / "empty")[0]["id"] == "openai/gsm8k-0"


def test_hub_error_is_cut_to_its_first_line(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise FileNotFoundError("Dataset openai/gsm8k is not cached\nTraceback (most recent call last): ...")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(ValueError, match=r"did not load: FileNotFoundError: Dataset openai/gsm8k is not cached$"):
        grading.load_benchmark("gsm8k_train", data_dir=tmp_path)
