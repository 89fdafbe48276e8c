"""Tests of the embedded arithmetic task: generator, splits, solutions, flaws and both checkers."""
import json
import random
import re
from pathlib import Path

import pytest

from stepkto import jsonl
from stepkto.equations import check_equations, label_steps_by_equations
import step_errors  # bench/step_errors.py (tests/conftest.py)
from stepkto.arith_task import (Args, FlawRates, check_steps, is_arith_problem, is_hard_step,
                        is_test_problem, main, make_split, random_expression,
                        slipped_result, tokenize, write_solution)

PROCESSBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "processbench_gsm8k.json"
STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def expression_of(problem: str) -> str:
    return problem.removeprefix("Compute ").removesuffix(".")


def steps_of(solution: str) -> list[str]:
    return solution.split("\n\n")


# ----------------------------------------------------------------------------- generator and splits
@pytest.mark.parametrize("n_ops", [2, 3, 4, 5, 6])
def test_random_expression_has_n_ops_and_small_numbers(n_ops):
    rng = random.Random(n_ops)
    for _ in range(200):
        expression = random_expression(rng, n_ops, max_number=50)
        tokens = tokenize(expression)
        assert sum(token in "+-*" for token in tokens) == n_ops
        assert max(int(token) for token in tokens if token.isdigit()) <= 50


def test_rows_answer_equals_python_eval_and_every_step_is_a_small_nonnegative_integer():
    rows = make_split("train", 300, seed=0)
    for row in rows:
        assert row["answer"] == str(eval(expression_of(row["problem"])))  # oracle: digits, + - * ( )
        for a, op, b, c in (STEP.fullmatch(step).groups() for step in steps_of(row["solution"])[:-1]):
            assert int(c) >= 0
            if op == "*":
                assert 2 <= int(a) <= 12 and 2 <= int(b) <= 12


def test_ops_range_ids_and_determinism():
    rows = make_split("test", 200, seed=3, min_ops=3, max_ops=4)
    ops = {sum(t in "+-*" for t in tokenize(row["problem"])) for row in rows}
    assert ops == {3, 4}
    assert [row["id"] for row in rows[:2]] == ["arith-test-000000", "arith-test-000001"]
    assert len({row["problem"] for row in rows}) == 200
    assert rows == make_split("test", 200, seed=3, min_ops=3, max_ops=4)
    assert rows != make_split("test", 200, seed=4, min_ops=3, max_ops=4)


def test_train_and_test_are_disjoint_over_seeds():
    train = {row["problem"] for seed in range(3) for row in make_split("train", 1000, seed, 2, 2)}
    test = {row["problem"] for seed in range(3) for row in make_split("test", 1000, seed, 2, 2)}
    assert train.isdisjoint(test)
    assert all(is_test_problem(problem) for problem in test)
    assert not any(is_test_problem(problem) for problem in train)
    assert len(train) > 2500  # the seeds do give different problems


def test_bad_split_name_is_rejected():
    with pytest.raises(ValueError, match="split"):
        make_split("valid", 1, seed=0)


# ----------------------------------------------------------------------------- flawless solutions
def test_solution_of_the_example_in_canonical_order():
    solution, flaw, answer = write_solution(random.Random(0), "Compute (12 + 7) * 3 - 45.", FlawRates(0, 0, 0))
    assert flaw == "none" and answer == "12"
    assert solution == "12 + 7 = 19\n\n19 * 3 = 57\n\n57 - 45 = 12\n\nThe answer is \\boxed{12}."
    solution, *_ = write_solution(random.Random(0), "2 + 3 * 4 - 5 * 2 + (9 - 1)", FlawRates(0, 0, 0))
    assert steps_of(solution)[:-1] == ["9 - 1 = 8", "3 * 4 = 12", "5 * 2 = 10", "2 + 12 = 14",
                                       "14 - 10 = 4", "4 + 8 = 12"]


def test_flawless_solutions_have_one_step_per_op_and_pass_the_checker():
    for row in make_split("test", 200, seed=1):
        steps = steps_of(row["solution"])
        n_ops = sum(t in "+-*" for t in tokenize(row["problem"]))
        assert len(steps) == n_ops + 1 and all(STEP.fullmatch(step) for step in steps[:-1])
        assert steps[-1] == f"The answer is \\boxed{{{row['answer']}}}."
        assert check_steps(row["problem"], steps) == [True] * len(steps)


# ----------------------------------------------------------------------------- flaws
def test_slips_are_the_documented_habits():
    assert slipped_result(58, "+", 67) == 115 and is_hard_step(58, "+", 67)  # dropped carry
    assert slipped_result(52, "-", 17) == 45 and is_hard_step(52, "-", 17)  # borrow not paid back
    assert slipped_result(7, "*", 8) == 63 and is_hard_step(7, "*", 8)  # one row too many
    assert slipped_result(12, "+", 7) == 20 and not is_hard_step(12, "+", 7)  # off by one
    assert slipped_result(5, "+", 7) == 13 and not is_hard_step(5, "+", 7)  # carry only out of the top
    assert slipped_result(3, "*", 4) == 15 and not is_hard_step(3, "*", 4)


def flawed_samples(rates: FlawRates, n: int, seed: int = 0, shape: str = "tree"):
    """(problem, gold answer, flawless steps, flawed steps, flaw, slip index or None)."""
    rng = random.Random(seed)
    for row in make_split("train", n, seed, shape=shape):
        text, flaw, _ = write_solution(rng, row["problem"], rates)
        clean, steps = steps_of(row["solution"]), steps_of(text)
        slip = next((i for i, (x, y) in enumerate(zip(clean, steps)) if x != y), None)
        yield row["problem"], row["answer"], clean, steps, flaw, slip


def boxed(steps: list[str]) -> str:
    return re.search(r"\\boxed\{(-?\d+)\}", steps[-1]).group(1)


def false_equations(steps: list[str]) -> list[int]:
    """Indices of the `a op b = c` steps whose equation is false."""
    out = []
    for i, step in enumerate(steps[:-1]):
        a, op, b, c = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)", step).groups()
        if {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] != int(c):
            out.append(i)
    return out


def test_propagating_slips_give_a_wrong_answer_and_only_the_slips_are_flagged():
    rates = FlawRates(p_slip_easy=0.3, p_slip_hard=0.3, p_silent_add=0.0, p_silent_sub=0.0, p_silent_mul=0.0)
    seen, several = 0, 0
    for problem, answer, clean, steps, flaw, slip in flawed_samples(rates, 300):
        if flaw == "none":
            assert steps == clean
            continue
        seen += 1
        slips = false_equations(steps)
        several += len(slips) > 1
        assert flaw == "propagating" and slips[0] == slip
        labels = check_steps(problem, steps)
        assert [i for i, ok in enumerate(labels) if not ok] == slips  # later steps start from what was stated
        assert boxed(steps) != answer or len(slips) > 1  # two slips can cancel out, one cannot
    assert seen > 100 and several > 20  # steps slip independently


def test_silent_slips_keep_the_answer_and_flag_each_slip_and_its_consumer():
    rates = FlawRates(p_slip_easy=0.3, p_slip_hard=0.3, p_silent_add=1.0, p_silent_sub=1.0, p_silent_mul=1.0)
    seen = 0
    for problem, answer, clean, steps, flaw, slip in flawed_samples(rates, 300):
        if flaw == "none":
            continue
        seen += 1
        assert flaw == "silent" and boxed(steps) == answer
        slips = false_equations(steps)
        assert slips == [i for i, (x, y) in enumerate(zip(clean, steps)) if x != y]  # later steps use the truth
        wrong = [i for i, ok in enumerate(check_steps(problem, steps)) if not ok]
        assert set(slips) <= set(wrong) and len(wrong) > len(slips)  # a consumer starts from an unstated value
    assert seen > 100


def test_silent_slip_by_hand_in_a_middle_and_in_the_last_step():
    steps = ["2 * 3 = 7", "4 * 5 = 20", "6 + 20 = 26", "The answer is \\boxed{26}."]
    assert check_steps("Compute 2 * 3 + 4 * 5.", steps) == [False, True, False, True]
    steps = ["2 * 3 = 6", "4 * 5 = 20", "6 + 20 = 27", "The answer is \\boxed{26}."]
    assert check_steps("Compute 2 * 3 + 4 * 5.", steps) == [True, True, False, False]


def test_slip_rates_follow_step_difficulty_and_silent_share_follows_the_operation():
    rates = FlawRates(p_slip_easy=0.1, p_slip_hard=0.4, p_silent_add=0.8, p_silent_sub=0.5, p_silent_mul=0.2)
    first_step = {True: [], False: []}  # hardness of the first step -> slipped there?
    silent = {"+": [], "-": [], "*": []}  # operation of a slipped first step -> silent?
    for _, _, clean, steps, _, slip in flawed_samples(rates, 12000, seed=7, shape="chain"):
        a, op, b, _ = STEP.fullmatch(clean[0]).groups()
        first_step[is_hard_step(int(a), op, int(b))].append(slip == 0)
        if slip == 0 and len(steps) > 2:  # a chain: silent iff step 1 starts from step 0's true value
            silent[op].append(steps[1].split()[0] == clean[0].split()[-1])
    for hard, expected in ((True, 0.4), (False, 0.1)):
        assert len(first_step[hard]) > 500
        assert abs(sum(first_step[hard]) / len(first_step[hard]) - expected) < 0.04
    for kind, expected in (("+", 0.8), ("-", 0.5), ("*", 0.2)):
        assert len(silent[kind]) > 60
        assert abs(sum(silent[kind]) / len(silent[kind]) - expected) < 0.12


def test_extreme_rates_and_invalid_rates():
    for _, _, clean, steps, flaw, slip in flawed_samples(FlawRates(1.0, 1.0, 0.0, 0.0, 0.0), 50):
        assert flaw == "propagating" and slip == 0 and false_equations(steps) == list(range(len(steps) - 1))
    assert all(flaw == "none" for *_, flaw, _ in flawed_samples(FlawRates(0.0, 0.0, 0.5, 0.5, 0.5), 50))
    with pytest.raises(ValueError, match="p_silent_sub"):
        FlawRates(p_silent_sub=1.5)


def test_default_rates_make_the_careless_result_the_habit_on_hard_steps():
    """The default seed data prefers the careless result on hard steps (so greedy decoding keeps the
    flaw, module docstring) and rarely slips elsewhere."""
    rates = FlawRates()
    assert rates.p_slip_hard > 0.5 > rates.p_slip_easy
    assert rates.p_silent_sub > 0.5 > max(rates.p_silent_add, rates.p_silent_mul)


# ----------------------------------------------------------------------------- exact step checker
@pytest.mark.parametrize("steps, labels", [
    (["2 + 3 = 5", "5 * 4 = 20", "The answer is \\boxed{20}."], [False, False, False]),  # precedence
    (["3 * 4 = 12", "blah", "2 + 12 = 14", "\\boxed{14}"], [True, False, True, True]),  # garbage
    (["3 * 4 = 12", "2 + 12 = 14", "The answer is \\boxed{15}."], [True, True, False]),  # wrong answer
    (["3 * 4 = 12", "The answer is \\boxed{14}."], [True, False]),  # boxed before fully reduced
    (["3 * 4 = 12", "2 + 12 = 14", "The answer is \\boxed{fourteen}."], [True, True, False]),
    (["First, 3 * 4 = 12.", "Then 2+12=14.", "So \\boxed{14}"], [True, True, True]),  # extra text
    (["2 + 12 = 14", "\\boxed{14}"], [False, True]),  # a skipped step is wrong, then re-syncs
])
def test_checker_on_hand_written_cases(steps, labels):
    assert check_steps("Compute 2 + 3 * 4.", steps) == labels


def test_checker_judges_later_steps_against_the_stated_wrong_value():
    steps = ["12 + 7 = 20", "20 * 3 = 60", "60 - 45 = 15", "The answer is \\boxed{15}."]
    assert check_steps("Compute (12 + 7) * 3 - 45.", steps) == [False, True, True, True]
    steps = ["3 - 8 = -5", "-5 + 10 = 5", "The answer is \\boxed{5}."]
    assert check_steps("Compute 3 - 8 + 10.", steps) == [True, True, True]


# ----------------------------------------------------------------------------- equations in any text
RIGHT = ["12 + 7 = 19", "3 * $4 = $12", "48/2 = 24", "2 x 3 = 6", "10 × 2 = 20", "1,000 + 5 = 1,005",
         "0.5 * 8 = 4", "So 2 + 3 = 5 + 1 = 6 apples.", "10/3 = 3.33", "\\(18 - 6 = 12\\) flamingos",
         "\\frac{1}{3} \\times 18 = 6", "20% of 50 = 10", "The increase is 25 - 20 = 5%.",
         "33 classes * 15 students/class = 495 students", "100 - 124 = -24", "No equation here.",
         "1 hour = 60 minutes", "2x + 3 = 7", "\\[ 6 = 1.5x \\]", "Time to 400 degrees = 20 + 8 = 28.",
         "**Step 2:** 5 * 3 = 15", "The cost is $7.50 * 4 = $30.00.", "(1)/(2) = (1)/(x)",
         "370 cups / 110 cups per bag = 3.363... bags", "\\frac{3}{4} \\text{ gallons} \\times 8 = 6",
         "9 (red) + 14 (blue) = 23", "$q(1) = (1^2 - 1)p(1) - 1 = -1.$", "so $a_1^3 + 1 = 0.$",
         "\\[4\\dfrac{5}{8} = 4 + \\dfrac{5}{8} = \\dfrac{37}{8}.\\]",
         "$-11+50 = 39$ and $-11+2\\cdot 50 = 89$",
         "Since $90^3=729,\\!000$", "\\[ \\pi(2^2) - \\pi(1^2) = 3\\pi \\]", "costs 10/3 = 3.34 each"]
WRONG = ["495 students * $15/student = $7455.", "2 + 3 = 6", "10/3 = 3.5", "2^{10} = 1000",
         "\\frac{1}{2} + \\frac{1}{3} = \\frac{2}{5}", "10 × 2 = 21", "20% of 50 = 15",
         "$4.20 + $9.45 + $1.35 = $14.99",
         "7 * 70 - 40 = 470 - 40 = 430", "52,500 + 11,250 + 67,500 = 129,250", "\\( \\frac{40}{5} = 3 \\)",
         "So 2 + 3 = 5 + 1 = 7.", "First 3 * 4 = 12, then 12 + 5 = 18."]


@pytest.mark.parametrize("text", RIGHT)
def test_check_equations_accepts_right_or_unparseable_text(text):
    assert check_equations(text)


@pytest.mark.parametrize("text", WRONG)
def test_check_equations_flags_false_equations(text):
    assert not check_equations(text)


def test_label_steps_by_equations_labels_each_step():
    assert label_steps_by_equations(["2 + 2 = 4", "2 + 2 = 5", "text"]) == [True, False, True]


def test_processbench_gsm8k_scores_are_pinned():
    """Numbers measured by bench/processbench_check.py (bench/notes/bench_processbench_check.md)."""
    if not PROCESSBENCH.exists():
        pytest.skip(f"ProcessBench data not found at {PROCESSBENCH} (../shared/data beside the repo)")
    rows = json.loads(PROCESSBENCH.read_text())
    hits = {"error": 0, "clean": 0}
    for row in rows:
        labels = label_steps_by_equations(row["steps"])
        predicted = next((i for i, ok in enumerate(labels) if not ok), -1)
        hits["clean" if row["label"] == -1 else "error"] += predicted == row["label"]
    assert (len(rows), hits["error"], hits["clean"]) == (400, 16, 193)


# ----------------------------------------------------------------------------- input too large to check
SUM = " + ".join(["1"] * 1000)  # a tree 1000 levels deep: Python's recursion limit
NEGATIONS = "- " * 1000 + "1"  # 1000 nested unary minus
NESTED = "(" * 150 + "2 + 2" + ")" * 150
TOWER = "(((((((9^12)^12)^12)^12)^12)^12)^12)"  # 9^(12^7): about 1.1e8 bits


@pytest.mark.parametrize("step", [f"{SUM} = 1000", f"0 {NEGATIONS} = 1", f"{NESTED} = 4", f"{TOWER} = 5",
                                  "2^2^2^2^2^2 = 7", "9^9^9^9 = 5", "1" * 5000 + " + 1 = 2",
                                  " + ".join(["1"] * 120) + " = 120"])
def test_an_equation_too_large_to_evaluate_is_a_wrong_step(step):
    assert label_steps_by_equations(["2 + 2 = 4", step, "3 * 3 = 9"]) == [True, False, True]


def test_equations_within_the_limits_are_still_checked():
    assert check_equations("2^20 = 1048576") and not check_equations("2^20 = 1048577")
    assert check_equations(" + ".join(["1"] * 90) + " = 90") and not check_equations(" + ".join(["1"] * 90) + " = 91")
    assert check_equations("0^(-1) = 5")  # not evaluated, as 1/0 = 5


def test_checker_steps_with_numbers_too_large_are_wrong():
    huge = "9" * 5000
    steps = [f"{huge} * {huge} = 1", "3 * 4 = 12", "2 + 12 = 14", f"\\boxed{{{huge}}}", "\\boxed{14}"]
    assert check_steps("Compute 2 + 3 * 4.", steps) == [False, True, True, False, True]
    big = "9" * 2000  # within MAX_DIGITS; a product of two such is beyond MAX_VALUE_BITS
    steps = [f"1 + 1 = {big}", f"1 + 1 = {big}", f"{big} * {big} = 1", "\\boxed{1}"]
    assert check_steps("Compute (1 + 1) * (1 + 1).", steps) == [False, False, False, True]


@pytest.mark.parametrize("expression, refusal", [(SUM, "an expression of 1999 tokens"),
                                                 (NEGATIONS, "an expression of 1001 tokens"),
                                                 (NESTED, "an expression of 303 tokens"),
                                                 (" + ".join(["1"] * 120), "an expression 120 levels deep")])
def test_a_problem_too_large_to_check_is_refused_naming_the_file_and_row(tmp_path, expression, refusal):
    import label

    row = {"id": "big#0", "problem": f"Compute {expression}.", "answer": "1", "problem_id": "big", "prompt": "",
           "completion": "1 + 1 = 2\n\nThe answer is \\boxed{2}.", "finish_reason": "stop"}
    samples = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(samples, [row], jsonl.SAMPLE_ROW)
    assert is_arith_problem(row["problem"])
    message = rf"samples.jsonl: row 'big#0': field 'problem': {refusal}, more than \d+ \(MAX_\w+\): it cannot be checked"
    with pytest.raises(jsonl.DataError, match=message):
        label.label_file(str(samples), str(tmp_path / "labels.jsonl"), label.Settings(prm="check"))


# ----------------------------------------------------------------------------- command line
def test_is_arith_problem():
    assert is_arith_problem("Compute (12 + 7) * 3 - 45.")
    assert not is_arith_problem("Compute (12 + 7 * 3.")  # unbalanced
    assert not is_arith_problem("Sue lives in a fun neighborhood. How many flamingos (1 + 2)?")


def test_command_line_writes_disjoint_train_test_and_flawed_sft(tmp_path):
    from transformers import HfArgumentParser

    argv = ["--output_dir", str(tmp_path), "--num_train", "50", "--num_test", "20", "--num_sft", "300"]
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)  # the parser cli.run_cli uses
    main(args)
    schemas = {"train": jsonl.PROBLEM_ROW, "test": jsonl.PROBLEM_ROW, "sft": jsonl.SFT_ROW}
    read = {name: jsonl.read_jsonl(tmp_path / f"{name}.jsonl", schema) for name, schema in schemas.items()}
    assert [len(read[name]) for name in ("train", "test", "sft")] == [50, 20, 300]
    assert {r["problem"] for r in read["sft"]}.isdisjoint(r["problem"] for r in read["test"])
    assert {r["flaw"] for r in read["sft"]} == {"none", "propagating", "silent"}
    for row in read["sft"]:
        right_answer = row["completion"].endswith(f"\\boxed{{{row['answer']}}}.")
        assert right_answer or row["flaw"] == "propagating"
    propagating = [r for r in read["sft"] if r["flaw"] == "propagating"]
    assert sum(not r["completion"].endswith(f"\\boxed{{{r['answer']}}}.") for r in propagating) > 0.9 * len(propagating)
    (tmp_path / "sft.jsonl").write_text("")  # complete outputs are never rewritten
    main(args)
    assert (tmp_path / "sft.jsonl").read_text() == ""


def test_step_errors_names_each_kind_of_step():
    """bench/step_errors.py's kinds (docs/experiments.md "What it took"): the habit, an easy addition carried where there is no
    carry (exactly 10 too high), any other wrong number, and a right equation started from a wrong value."""
    assert not is_hard_step(12, "+", 5)
    assert step_errors.step_kind("12 + 5 = 17", True) == "easy add right"
    assert step_errors.step_kind("12 + 5 = 17", False) == "easy add right (wrong start)"
    assert step_errors.step_kind("12 + 5 = 27", False) == "easy add over-carry"
    assert step_errors.step_kind("12 + 5 = 26", False) == "easy add other"
    assert step_errors.step_kind(f"18 + 5 = {slipped_result(18, '+', 5)}", False) == "hard add habit"
    assert step_errors.step_kind("18 + 5 = 33", False) == "hard add other"  # a carry too many on a hard step: not easy
    assert step_errors.step_kind("The answer is 17", True) == "unparsed"
