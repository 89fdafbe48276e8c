"""ProcessBench (GSM8K split) with label.py's step labellers, through label.py's own interface.

Each ProcessBench row becomes a label.py row (completion = its steps joined by blank lines, which
common.split_steps splits back into the same steps) and is labelled by ``label.LABELLERS[name](rows,
args)``; a step without a verdict gets label.py's UNPARSEABLE_STEP_LABEL (wrong). Predicted first
error = first step labelled wrong, -1 if none. Metric (ProcessBench, arXiv 2412.06559): F1 = harmonic
mean of the accuracy on rows with an error (exact first-error index) and on rows without one (-1).

Labellers: ``check`` (exact, no model) and ``judge`` (an LLM judge; by default a tiny UNTRAINED
char-level Llama built here, which scores what an untrained model scores; ``--judge_model`` takes a
real one). ``mc`` needs a gold answer per problem, which the ProcessBench rows do not carry: it is
not scored (the report says why).

Run from the repo root: .venv/bin/python bench/processbench_labellers.py   (writes
notes/bench_processbench_labellers.md)
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
import common  # noqa: E402
import label  # noqa: E402

DATA = REPO.parent / "shared" / "data"
COMMAND = ".venv/bin/python bench/processbench_labellers.py"


def as_label_rows(bench_rows: list[dict]) -> list[dict]:
    """ProcessBench rows as generate.py rows; no gold answer or reference solution exists for them."""
    rows = []
    for row in bench_rows:
        completion = "\n\n".join(row["steps"])
        if len(common.split_steps(completion)) != len(row["steps"]):
            raise ValueError(f"{row['id']}: field 'steps': a step holds a blank line, so it would split in two")
        rows.append({"id": row["id"], "problem": row["problem"], "answer": "", "prompt": "", "completion": completion})
    return rows


def first_errors(rows: list[dict], args: label.Args, chunk_size: int) -> tuple[list[int], int, int]:
    """(predicted first-error index per row, steps without a verdict, steps) with labeller args.prm."""
    predicted, failures, steps = [], 0, 0
    for chunk in common.chunked(rows, chunk_size):
        for verdicts in label.LABELLERS[args.prm](chunk, args):
            labels, row_failures = label.labels_from_verdicts(verdicts)
            predicted.append(labels.index(False) if False in labels else -1)
            failures, steps = failures + row_failures, steps + len(labels)
    return predicted, failures, steps


def f1_scores(gold: list[int], predicted: list[int]) -> dict:
    error_hits = sum(g == p for g, p in zip(gold, predicted) if g != -1)
    clean_hits = sum(p == -1 for g, p in zip(gold, predicted) if g == -1)
    error_rows, clean_rows = sum(g != -1 for g in gold), gold.count(-1)
    error_acc, clean_acc = error_hits / error_rows, clean_hits / clean_rows
    f1 = 2 * error_acc * clean_acc / (error_acc + clean_acc) if error_acc + clean_acc else 0.0
    return dict(error_hits=error_hits, error_rows=error_rows, clean_hits=clean_hits, clean_rows=clean_rows,
                error_acc=error_acc, clean_acc=clean_acc, f1=f1)


def build_tiny_judge(folder: Path) -> str:
    """The tests' tiny char-level Llama (untrained, seed 0), with room for ProcessBench's long prompts."""
    tok = common.make_char_tokenizer()
    common.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=128, max_len=8192, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def judge_reply_example(rows: list[dict], args: label.Args) -> str:
    """The judge's raw reply to the first step of the first row (the cached model, no reload)."""
    generate_fn, tokenizer = label.load_generator(
        args.judge_model, args.judge_engine, 1, 0.0, args.judge_max_new_tokens, args.seed, args.dtype
    )
    prompt = label.build_judge_prompt(tokenizer, rows[0]["problem"], None, [], common.split_steps(rows[0]["completion"])[0])
    return generate_fn([prompt], args.seed)[0][0][0]


def score(rows: list[dict], gold: list[int], args: label.Args, chunk_size: int) -> dict:
    """F1 scores of labeller args.prm, plus its steps without a verdict and its wall time."""
    start = time.perf_counter()
    predicted, failures, steps = first_errors(rows, args, chunk_size)
    return {**f1_scores(gold, predicted), "failures": failures, "steps": steps, "seconds": time.perf_counter() - start}


def table_row(name: str, s: dict) -> str:
    return (f"| {name} | {s['error_acc']:.4f} ({s['error_hits']}/{s['error_rows']}) | "
            f"{s['clean_acc']:.4f} ({s['clean_hits']}/{s['clean_rows']}) | **{s['f1']:.4f}** | "
            f"{s['failures']}/{s['steps']} | {s['seconds']:.1f} |")


UNTRAINED_JUDGE_READING = """  An untrained model says neither "correct" nor "incorrect" ({failures}/{steps} steps without a
  verdict), so its steps are labelled wrong and every row is predicted to fail at step 0: it is right
  on the {step0} judged rows whose first error is step 0 and on none of the rows without an error.
  This row checks the plumbing, not a judge; a real judge is scored with `--judge_model PATH` (e.g.
  on a GPU with `--judge_engine vllm`)."""


def report(lines: list[str], judge: dict, mc_gold: dict, command: str) -> str:
    return f"""# ProcessBench GSM8K with label.py's step labellers

Command (repo root): `{command}` (CPU, 2 cores shared with other jobs: the seconds are indicative).
Data: `../shared/data/processbench_gsm8k.json`; {judge['subset']}. Each row is labelled through
`label.LABELLERS[prm](rows, args)`; a step without a verdict is labelled wrong
(`label.UNPARSEABLE_STEP_LABEL`). Predicted first error = first step labelled wrong, -1 if none.
F1 = harmonic mean of the two accuracies (ProcessBench, arXiv 2412.06559).

| `--prm` | accuracy on rows with an error (exact index) | accuracy on rows without one (-1) | F1 | steps without a verdict | seconds |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(lines)}
| mc | not scored | not scored | - | - | - |

* **check** is label.py's exact labeller (equations; notes/bench_processbench_check.md has the same numbers).
* **judge** = {judge['model']} (`--judge_engine {judge['engine']}`, greedy,
  `--judge_max_new_tokens {judge['max_new_tokens']}`, {judge['chunk_size']} rows per generation call).
  ProcessBench has no reference solutions, so every judge prompt says that none is available. The
  judge's reply to the first step of the first row: `{judge['example']!r}`.
{judge['reading']}
* **mc** is not scored: Monte-Carlo labels need the gold answer that the rollouts must reach, and the
  ProcessBench rows carry none (fields: {mc_gold['fields']}); GSM8K's gold answers (openai/gsm8k) are
  not available offline here. `final_answer_correct` gives the gold answer (the row's own last
  \\boxed{{}}, present in {mc_gold['boxed']} of them) only on the {mc_gold['final_answer_correct']} of {mc_gold['rows']} rows where it is
  true, and those are {mc_gold['clean']} rows without an error plus {mc_gold['error']} with one: an F1 there
  would measure almost only the rows without an error, not ProcessBench's F1.
"""


def evenly_spaced(rows: list, n: int) -> list:
    return rows if not n or n >= len(rows) else [rows[i * len(rows) // n] for i in range(n)]


def judge_notes(cli, judged: list[int], bench_rows: list[dict], scores: dict, example: str) -> dict:
    untrained = not cli.judge_model and scores["failures"] == scores["steps"]
    step0 = sum(bench_rows[i]["label"] == 0 for i in judged)
    reading = UNTRAINED_JUDGE_READING.format(failures=scores["failures"], steps=scores["steps"], step0=step0)
    subset = (f"all {len(bench_rows)} rows" if len(judged) == len(bench_rows) else
              f"check on all {len(bench_rows)} rows, judge on {len(judged)} evenly spaced rows (row i * {len(bench_rows)} // {len(judged)})")
    model = f"`{cli.judge_model}`" if cli.judge_model else "a tiny untrained char-level Llama (hidden 64, 1 layer, seed 0)"
    return dict(model=model, engine=cli.judge_engine, max_new_tokens=cli.judge_max_new_tokens, chunk_size=cli.chunk_size,
                example=example, subset=subset, reading=reading if untrained else "")


def mc_gold_notes(bench_rows: list[dict]) -> dict:
    """What ProcessBench offers as gold answers for mc: only final_answer_correct."""
    with_gold = [r for r in bench_rows if r["final_answer_correct"]]
    return dict(fields=", ".join(sorted(bench_rows[0])), rows=len(bench_rows), final_answer_correct=len(with_gold),
                clean=sum(r["label"] == -1 for r in with_gold), error=sum(r["label"] != -1 for r in with_gold),
                boxed=sum("\\boxed" in r["steps"][-1] for r in with_gold))


def parse_cli() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with processbench_gsm8k.json")
    parser.add_argument("--out", type=Path, default=REPO / "notes" / "bench_processbench_labellers.md")
    parser.add_argument("--judge_model", default="", help="judge folder or hub id (default: a tiny untrained char Llama)")
    parser.add_argument("--judge_engine", default="transformers", help="transformers | vllm | auto")
    parser.add_argument("--judge_max_new_tokens", type=int, default=16, help="tokens per verdict")
    parser.add_argument("--judge_rows", type=int, default=0, help="judge only N evenly spaced rows (0 = all)")
    parser.add_argument("--chunk_size", type=int, default=8, help="rows per judge generation call")
    return parser.parse_args()


def main() -> None:
    cli = parse_cli()
    bench_rows = json.loads((cli.data / "processbench_gsm8k.json").read_text())
    rows, gold = as_label_rows(bench_rows), [r["label"] for r in bench_rows]
    judged = evenly_spaced(list(range(len(rows))), cli.judge_rows)
    with tempfile.TemporaryDirectory() as tmp:
        judge_args = label.Args("", "", prm="judge", judge_model=cli.judge_model or build_tiny_judge(Path(tmp)),
                                judge_engine=cli.judge_engine, judge_max_new_tokens=cli.judge_max_new_tokens)
        check = score(rows, gold, label.Args("", "", prm="check"), cli.chunk_size)
        print(table_row("check", check))
        judge = score([rows[i] for i in judged], [gold[i] for i in judged], judge_args, cli.chunk_size)
        print(table_row("judge", judge))
        example = judge_reply_example(rows, judge_args)
    lines = [table_row("check", check), table_row("judge", judge)]
    notes = judge_notes(cli, judged, bench_rows, judge, example)
    cli.out.write_text(report(lines, notes, mc_gold_notes(bench_rows), " ".join([COMMAND] + sys.argv[1:])))


if __name__ == "__main__":
    main()
