"""Label sampled solutions at two levels: the final answer (outcome) and every step (process).

Paper Sec. 3: the outcome label is a rule-based check of the final answer against the gold answer; the
step labels come from a process reward model. Step labellers (``--prm``):

* ``check``: exact, no model. On the built-in arithmetic task (arith_task.py) every step is checked
  against the problem's expression tree (a step is wrong when its equation is false or when it starts
  from a value the previous steps did not produce); on any other text a step is wrong when an
  arithmetic equation it states is false.

Output rows are the input rows plus

    {"completions": [step, ...], "labels": [bool per step], "outcome": bool, "pred": str | None, "prm": str}

where ``prompt`` / ``completions`` / ``labels`` are TRL's stepwise-supervision fields, so the file feeds
TRL's PRMTrainer as it is.

Usage:

    python label.py --input runs/stepkto/iter1/samples.jsonl --output runs/stepkto/iter1/labels.jsonl --prm check

Crash safety as in generate.py: OUTPUT.partial grows a chunk at a time; a rerun resumes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from transformers import HfArgumentParser

import arith_task
import common
import grading

# The fields label.py needs from generate.py's rows (the JSONL contract between the two stages).
SAMPLE_SCHEMA = {"id": str, "problem": str, "answer": str, "prompt": str, "completion": str}


@dataclass
class Args:
    input: str = field(metadata={"help": "Samples JSONL written by generate.py."})
    output: str = field(metadata={"help": "Labelled JSONL (written as OUTPUT.partial until complete)."})
    prm: str = field(default="check", metadata={"help": "Step labeller: check."})
    chunk_size: int = field(default=1024, metadata={"help": "Rows per chunk (the unit of resuming)."})
    grade_timeout_s: float = field(default=5.0, metadata={"help": "Hard per-answer timeout of the outcome grader."})


def check_labeller(rows: list[dict]) -> list[list[bool]]:
    """Exact step labels: the expression-tree checker on built-in problems, equations elsewhere."""
    labels = []
    for row in rows:
        steps = common.split_steps(row["completion"])
        if arith_task.is_arith_problem(row["problem"]):
            labels.append(arith_task.check_steps(row["problem"], steps))
        else:
            labels.append(arith_task.label_steps_by_equations(steps))
    return labels


LABELLERS = {"check": check_labeller}


def label_rows(rows: list[dict], prm: str, timeout_s: float) -> list[dict]:
    """Outcome label (math-verify, gold first, hard timeout) and one label per step."""
    preds = [grading.extract_boxed(r["completion"]) for r in rows]
    outcomes = grading.grade_answers([r["answer"] for r in rows], preds, timeout_s=timeout_s)
    step_labels = LABELLERS[prm](rows)
    out = []
    for row, pred, outcome, labels in zip(rows, preds, outcomes, step_labels):
        steps = common.split_steps(row["completion"])
        out.append({**row, "completions": steps, "labels": labels, "outcome": outcome, "pred": pred, "prm": prm})
    return out


def main(args: Args) -> None:
    if Path(args.output).exists():
        print(f"{args.output} is complete; nothing to do.")
        return
    if args.prm not in LABELLERS:
        sys.exit(f"error: unknown --prm {args.prm!r}; choose one of {sorted(LABELLERS)}")
    rows = common.read_jsonl(args.input, SAMPLE_SCHEMA)
    chunks = common.chunked(rows, args.chunk_size)
    _, done = common.resume_rows(args.output, [[r["id"] for r in c] for c in chunks])
    for chunk in tqdm(chunks[done:], desc="label", initial=done, total=len(chunks)):
        common.append_chunk(args.output, label_rows(chunk, args.prm, args.grade_timeout_s))
    common.finish_output(args.output)
    print(f"labelled {len(rows)} samples into {args.output}")


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    try:
        main(parsed)
    except ValueError as e:  # common.DataError and grading's loader errors name file, line and field
        sys.exit(f"error: {e}")
