"""Count the kinds of arithmetic steps in a label.py / evaluate.py output of the embedded default.

    .venv/bin/python bench/step_errors.py runs/seed1/eval/M0/greedy_labels.jsonl
    .venv/bin/python bench/step_errors.py runs_hard/seed{0,1,2}/kto/eval/M3/greedy_labels.jsonl   # summed over files

For every `a op b = c` step: easy or hard (arith_task.is_hard_step), the operation, and whether c is the
true result, the seed data's habit (arith_task.slipped_result), an over-carry (an easy addition stated exactly
10 too high: a carry where there is none, docs/experiments.md "What it took", 4) or another number; "(wrong start)" marks a
right equation that starts from a value the previous steps did not produce. Then the counts of
(right answer, every step right) over the completions. The diagnosis behind docs/experiments.md "What it took".
"""
import collections
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkto import arith_task, jsonl

NAMES = {"+": "add", "-": "sub", "*": "mul"}


def step_kind(step: str, label: bool) -> str:
    parts = step.split()
    try:
        a, op, b, c = int(parts[0]), parts[1], int(parts[2]), int(parts[4])
    except (ValueError, IndexError):
        return "unparsed"
    if op not in NAMES or len(parts) != 5:
        return "unparsed"
    hard = arith_task.is_hard_step(a, op, b)
    kind = ("hard " if hard else "easy ") + NAMES[op]
    if c == int(arith_task.apply_op(op, Fraction(a), Fraction(b))):
        return kind + " right" + ("" if label else " (wrong start)")
    if c == arith_task.slipped_result(a, op, b):
        return kind + " habit"
    return kind + (" over-carry" if op == "+" and not hard and c == a + b + 10 else " other")


def main(paths: list[str]) -> None:
    steps, outcomes = collections.Counter(), collections.Counter()
    for row in (row for path in paths for row in jsonl.read_jsonl(path, jsonl.LABELLED_ROW)):
        outcomes[(row["outcome"], all(row["labels"]))] += 1
        for step, label in zip(row["completions"][:-1], row["labels"][:-1]):
            steps[step_kind(step, label)] += 1
    for kind in sorted(steps):
        print(f"{kind:28s} {steps[kind]}")
    for (right, clean), n in sorted(outcomes.items()):
        print(f"right answer {right!s:5s} every step right {clean!s:5s} {n}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
