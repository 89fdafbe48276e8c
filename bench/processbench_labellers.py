"""ProcessBench (GSM8K split): label.py's step labellers side by side on the same rows.

On one fixed subset of ProcessBench GSM8K (``--rows N``, evenly spaced: row i * 400 // N) it scores

* ``check``: label.py's exact labeller (no model);
* ``judge (step)``: label.JUDGE_PROTOCOLS["step"], one judge call per step;
* ``judge (first_error)``: label.JUDGE_PROTOCOLS["first_error"], one judge call per solution;
* ``mc``: label.mc_step_labels, Monte-Carlo rollouts with the judge model as rollout policy
  (``--mc_rollouts``, ``--mc_max_new_tokens``), graded against GSM8K's gold answer;
* ``reward_model`` (asked for by name): label.py's trained-PRM labeller (``--prm_model``, ``--prm_format``): its
  scores once, then F1 at every threshold 0.05, 0.10, ..., 0.95 (predicted first error = first step scored below
  it) and the threshold that maximises F1. Without ``--prm_model`` the PRM is a tiny RANDOM Qwen2 PRM built here
  (tests/helpers.py): a mechanical check, not a PRM. On a GPU, Qwen2.5-Math-PRM-7B (compare with the ProcessBench
  table of its paper, arXiv 2501.07301):

      python bench/processbench_labellers.py --labellers reward_model --prm_model Qwen/Qwen2.5-Math-PRM-7B --rows 0

ProcessBench rows carry no gold answer: its GSM8K problems are GSM8K test problems, so each row is
joined on its problem text with ../shared/data/gsm8k_test.jsonl (gold = the number after ``####``,
commas removed); a row without a match is an error. ``--with_reference`` also gives the judge the
matching GSM8K worked solution in the step format (grading.gsm8k_reference_solution); off by default, as
ProcessBench gives judges no reference.

Predicted first error = first step not labelled right, -1 if none: a step without a verdict (label.py's null
label) counts as wrong here, as ProcessBench's first-error metric has no undecided step. Metric (ProcessBench,
arXiv 2412.06559): F1 = harmonic mean of the accuracy on rows with an error (exact first-error index) and on rows
without one (-1).
Per labeller it also reports the share of verdicts that parse, the judge tokens per solution
(prompt + generated, counted from the engine's own ids) and the wall time.

Without ``--judge_model`` the judge is a tiny UNTRAINED char-level Llama built here: a plumbing check
that runs anywhere, not a judge. Run from the repo root (writes bench/notes/bench_processbench_labellers.md):

    .venv/bin/python bench/processbench_labellers.py --judge_model models/SmolLM2-135M-Instruct --rows 100
    .venv-vllm/bin/python bench/processbench_labellers.py --judge_model models/SmolLM2-135M-Instruct --judge_engine vllm --rows 100

Quick plumbing check (tiny judge, another output):

    OMP_NUM_THREADS=1 .venv/bin/python bench/processbench_labellers.py --rows 2 --out /tmp/pb.md
"""
import argparse
import functools
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from stepkto import engines, grading, jsonl, models, options, prompting, sharding

import label  # noqa: E402

DATA = REPO.parent / "shared" / "data"
LABELLERS = ("check", "judge_step", "judge_first_error", "mc", "reward_model")
TITLES = {"check": "check", "judge_step": "judge (`step`)", "judge_first_error": "judge (`first_error`)", "mc": "mc"}
THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]


# ----------------------------------------------------------------------------- data


def evenly_spaced(rows: list, n: int) -> list:
    return rows if not n or n >= len(rows) else [rows[i * len(rows) // n] for i in range(n)]


def join_gsm8k(bench_rows: list[dict], data_dir: Path) -> list[dict]:
    """Each ProcessBench row plus ``gold`` and ``reference`` of the GSM8K test row with its exact problem
    (grading.load_benchmark("gsm8k"): gold after ``####``, reference in the step format)."""
    by_problem = {row["problem"]: row for row in grading.load_benchmark("gsm8k", data_dir=data_dir)}
    missing = [r["id"] for r in bench_rows if r["problem"] not in by_problem]
    if missing:
        raise ValueError(f"{data_dir}/gsm8k_test.jsonl: no GSM8K question equals the problem of {len(missing)} "
                         f"ProcessBench row(s), e.g. {missing[:5]}: mc has no gold answer for them")
    return [{**r, "gold": by_problem[r["problem"]]["answer"], "reference": by_problem[r["problem"]]["solution"]}
            for r in bench_rows]


def as_label_rows(bench_rows: list[dict], tokenizer, with_reference: bool) -> list[dict]:
    """label.py rows: completion = the steps joined by blank lines (split_steps gives them back), answer =
    GSM8K gold, prompt = the rollout policy's (the judge model's) prompt, solution = reference if asked."""
    rows = []
    for row in bench_rows:
        completion = prompting.STEP_SEPARATOR.join(row["steps"])
        if len(prompting.step_spans(completion)) != len(row["steps"]):
            raise ValueError(f"{row['id']}: field 'steps': a step holds a blank line, so it would split in two")
        rows.append({"id": row["id"], "problem": row["problem"], "answer": row["gold"], "completion": completion,
                     "prompt": prompting.build_prompt(tokenizer, row["problem"]),
                     **({"solution": row["reference"]} if with_reference else {})})
    return rows


# ----------------------------------------------------------------------------- token counting


class CountingEngine:
    """A engines.Engine for label.py's labellers (their ``engine`` argument) that counts, per prompt, its
    prompt ids once and the generated ids of every sample (mc samples K per prompt: one prefill, K
    continuations). Keeps the first reply."""

    def __init__(self, engine):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.prompt_tokens = self.generated_tokens = 0
        self.example = None

    def generate(self, prompts: list[str], sampling, seed: int) -> list[list]:
        outs = self.engine.generate(prompts, sampling, seed)
        for samples in outs:
            self.prompt_tokens += len(samples[0].prompt_ids) if samples else 0
            self.generated_tokens += sum(len(s.completion_ids) for s in samples)
        if self.example is None and outs and outs[0]:
            self.example = outs[0][0].text
        return outs


# ----------------------------------------------------------------------------- labellers


def chunk_verdicts(name: str, chunk: list[dict], counter: CountingEngine | None, settings: label.Settings) -> list[list]:
    """Verdicts (True / False / None / judging.CUT_OFF per step) of labeller ``name`` on one chunk of rows: label.py's labeller,
    through the counting engine."""
    settings = labeller_settings(name, settings)
    spans = [prompting.step_spans(r["completion"]) for r in chunk]
    return label.LABELLERS[settings.prm](chunk, spans, settings, counter)


def predicted_first_error(verdicts: list) -> int:
    """The first step not labelled right: wrong, or without a verdict (ProcessBench's metric has no undecided step,
    so a step nobody judged counts as the error); -1 if every step is right."""
    labels, _, _ = label.labels_from_verdicts(verdicts)
    return next((k for k, step_label in enumerate(labels) if step_label is not True), -1)


def f1_scores(gold: list[int], predicted: list[int]) -> dict:
    """ProcessBench's metric: accuracies on rows with an error (exact index) and without one (-1), F1."""
    error_hits = sum(g == p for g, p in zip(gold, predicted) if g != -1)
    clean_hits = sum(p == -1 for g, p in zip(gold, predicted) if g == -1)
    error_rows, clean_rows = sum(g != -1 for g in gold), gold.count(-1)
    error_acc = error_hits / error_rows if error_rows else float("nan")
    clean_acc = clean_hits / clean_rows if clean_rows else float("nan")
    f1 = 2 * error_acc * clean_acc / (error_acc + clean_acc) if error_acc + clean_acc else 0.0
    return dict(error_hits=error_hits, error_rows=error_rows, clean_hits=clean_hits, clean_rows=clean_rows,
                error_acc=error_acc, clean_acc=clean_acc, f1=f1)


def parse_share(name: str, verdicts: list[list]) -> tuple[int, int] | None:
    """(parsed, total): steps with a verdict (step protocol), solutions whose reply parsed (first_error); a reply cut
    off at the token budget gives none."""
    labels = [label.labels_from_verdicts(vs)[0] for vs in verdicts]
    if name == "judge_step":
        return sum(v is not None for vs in labels for v in vs), sum(map(len, labels))
    if name == "judge_first_error":  # an unparsed reply leaves every step of its solution without a verdict
        return sum(None not in vs for vs in labels if vs), sum(bool(vs) for vs in labels)
    return None


def run_labeller(name: str, rows: list[dict], gold: list[int], engine, settings: label.Settings, chunk_size: int) -> dict:
    """Scores of one labeller on ``rows``, chunk by chunk, with its token counts and wall time."""
    counter = None if name == "check" else CountingEngine(engine)
    start, verdicts = time.perf_counter(), []
    for chunk in tqdm(sharding.chunked(rows, chunk_size), desc=name):
        verdicts += chunk_verdicts(name, chunk, counter, settings)
    predicted = [predicted_first_error(v) for v in verdicts]
    return {**f1_scores(gold, predicted), "name": name, "predicted": predicted, "seconds": time.perf_counter() - start,
            "parsed": parse_share(name, verdicts), "rows": len(rows),
            "prompt_tokens": counter and counter.prompt_tokens, "generated_tokens": counter and counter.generated_tokens,
            "example": counter and counter.example}


# ----------------------------------------------------------------------------- report


def table_row(s: dict) -> str:
    parsed = f"{s['parsed'][0] / s['parsed'][1]:.3f} ({s['parsed'][0]}/{s['parsed'][1]})" if s["parsed"] else "n/a"
    tokens = "0"
    if s["prompt_tokens"] is not None:
        p, g = s["prompt_tokens"] / s["rows"], s["generated_tokens"] / s["rows"]
        tokens = f"{p + g:.0f} ({p:.0f} + {g:.0f})"
    return (f"| {TITLES[s['name']]} | {s['error_acc']:.3f} ({s['error_hits']}/{s['error_rows']}) | "
            f"{s['clean_acc']:.3f} ({s['clean_hits']}/{s['clean_rows']}) | **{s['f1']:.3f}** | {parsed} | "
            f"{tokens} | {s['seconds']:.1f} |")


TABLE_HEAD = """| labeller | accuracy on rows with an error (exact index) | accuracy on rows without one (-1) | F1 | verdicts that parse | judge tokens per solution (prompt + generated) | seconds |
| --- | --- | --- | --- | --- | --- | --- |"""


def prediction_note(s: dict) -> str:
    """What the labeller predicts: how often -1, how often step 0, and its first-error index otherwise."""
    n, p = len(s["predicted"]), s["predicted"]
    return (f"{TITLES[s['name']]}: predicts -1 (no error) on {p.count(-1)}/{n} rows, step 0 on {p.count(0)}/{n}, "
            f"a later step on {n - p.count(-1) - p.count(0)}/{n}")


def machine() -> str:
    cpu = f"{os.cpu_count()}-core CPU"
    return f"{torch.cuda.get_device_name(0)} GPU + {cpu}" if torch.cuda.is_available() else f"{cpu}, no GPU"


def model_caveat(model: str) -> str:
    """The model folder's own provenance note (setup.sh writes source.json for a dequantized GGUF)."""
    source = Path(model) / "source.json"
    if not source.exists():
        return ""
    note = jsonl.read_json(source)
    return f" **Weights: {note.get('note', '')}** ({note.get('gguf', '?')}); every number here is of those weights."


def command_line() -> str:
    python = sys.executable
    if python.startswith(str(REPO) + os.sep):
        python = os.path.relpath(python, REPO)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ)
    return " ".join(filter(None, [env, python, "bench/processbench_labellers.py", *sys.argv[1:]]))


def judge_description(cli, engine_name: str, chunk_size: int, load_seconds: float) -> str:
    model = (f"`{cli.judge_model}`" if cli.judge_model else
             "a tiny UNTRAINED char-level Llama (hidden 64, 1 layer, seed 0): a plumbing check, not a judge")
    reference = ("the matching GSM8K worked solution (calculator annotations removed), `--with_reference`"
                 if cli.with_reference else "none (ProcessBench gives judges no reference; the prompt says so)")
    return (f"* Judge and mc rollout policy: {model}.{model_caveat(cli.judge_model) if cli.judge_model else ''}\n"
            f"* Engine: `{engine_name}` (engines.get_engine, dtype {cli.dtype}; loaded once in {load_seconds:.1f} s, "
            f"not counted in the seconds below); {chunk_size} rows per generation call.\n"
            f"* Judge: greedy, `--judge_max_new_tokens {cli.judge_max_new_tokens}`; reference solution: {reference}."
            + (mc_description(cli) if "mc" in cli.labellers.split(",") else ""))


def mc_description(cli) -> str:
    return (f"\n* mc: `--mc_rollouts {cli.mc_rollouts}` at temperature {cli.mc_temperature}, "
            f"`--mc_max_new_tokens {cli.mc_max_new_tokens}`, a step is right when >= {cli.mc_threshold} rollout(s) "
            f"reach GSM8K's gold answer (last \\boxed{{}} of prefix + rollout, math-verify). Rollout prompt: "
            f"prompting.build_prompt (instruct template in the policy's chat template) + the steps so far.")


def subset_description(scores: list[dict], n_all: int) -> str:
    s = scores[0]
    n = s["error_rows"] + s["clean_rows"]
    spacing = "all rows" if n == n_all else f"{n} evenly spaced rows (row i * {n_all} // {n})"
    return (f"`../shared/data/processbench_gsm8k.json` ({n_all} rows): {spacing}, {s['error_rows']} with an "
            f"error and {s['clean_rows']} without; gold answers joined from `../shared/data/gsm8k_test.jsonl` "
            f"on the problem text (all matched).")


def examples(scores: list[dict]) -> str:
    shown = [s for s in scores if s["example"] is not None]
    return "\n".join(f"  * {TITLES[s['name']]} (first request of the first chunk): `{s['example'][:300]!r}`"
                     + (" (cut at 300 characters)" if len(s["example"]) > 300 else "") for s in shown)


READING = """* Predicted first error = first step not labelled right, -1 if none: a step without a verdict
  (label.py's null label) counts as wrong here, as ProcessBench's metric has no undecided step. F1 = harmonic
  mean of the two accuracies (ProcessBench, arXiv 2412.06559).
* Verdicts that parse: `step` = steps with a verdict / steps; `first_error` = solutions whose reply
  named a step or "none" / solutions (an unparsed reply leaves all its steps without a verdict); a reply
  cut off at `--judge_max_new_tokens` gives no verdict, whatever its text says; n/a
  for check (exact) and mc (a count of rollouts reaching the gold answer always decides).
* Judge tokens per solution: prompt + generated token ids as the engine consumed and sampled them
  (engines.Sample.prompt_ids / completion_ids, judge tokenizer), summed over the labeller's calls and
  divided by the rows. A prompt counts once per request: for mc once per step prefix, while its
  `--mc_rollouts` continuations all count as generated. check uses no model.
* Seconds: wall time of the labeller on the subset (model load excluded), indicative on a shared machine."""

UNTRAINED = """* The tiny untrained judge said neither "correct" nor "incorrect" nor a step number (no reply parsed),
  so its steps got no verdict and counted as wrong: this run checks the plumbing, not a judge."""


def untrained_unparsed(scores: list[dict], cli) -> bool:
    """The tiny untrained judge ran and none of its replies parsed (the expected outcome)."""
    judged = [s["parsed"] for s in scores if s["parsed"]]
    return not cli.judge_model and bool(judged) and not any(parsed for parsed, _ in judged)


def report(scores: list[dict], cli, engine_name: str, chunk_size: int, load_seconds: float, n_all: int) -> str:
    return "\n".join([
        "# ProcessBench GSM8K: label.py's step labellers side by side", "",
        f"Command (repo root): `{command_line()}`", "",
        f"Machine: {machine()}. Data: {subset_description(scores, n_all)}", "",
        TABLE_HEAD, *map(table_row, scores), "",
        judge_description(cli, engine_name, chunk_size, load_seconds),
        READING, *([UNTRAINED] if untrained_unparsed(scores, cli) else []),
        "* What each labeller predicts:", *(f"  * {prediction_note(s)}" for s in scores),
        "* One raw reply per model labeller:", examples(scores), "",
    ])


# ----------------------------------------------------------------------------- main


def build_tiny_judge(folder: Path) -> str:
    """The tests' tiny char-level Llama (untrained, seed 0), with room for ProcessBench's long prompts."""
    tok = models.make_char_tokenizer()
    model = models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=128, max_len=8192, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def parse_cli(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with processbench_gsm8k.json and gsm8k_test.jsonl")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "notes" / "bench_processbench_labellers.md")
    parser.add_argument("--rows", type=int, default=100, help="N evenly spaced rows, row i * 400 // N (0 = all 400)")
    parser.add_argument("--labellers", default=",".join(LABELLERS[:4]), help=f"comma-separated subset of {','.join(LABELLERS)}")
    parser.add_argument("--prm_model", default="", help="reward_model: the PRM (default: a tiny random Qwen2 PRM)")
    parser.add_argument("--prm_format", default="qwen_prm", help="reward_model: qwen_prm | step_tag")
    parser.add_argument("--judge_model", default="",
                        help="judge (and mc policy) folder or hub id (default: a tiny untrained char Llama)")
    parser.add_argument("--judge_engine", default="auto", help="transformers | vllm | auto")
    parser.add_argument("--judge_max_new_tokens", type=int, default=16, help="greedy tokens per judge reply")
    parser.add_argument("--with_reference", action="store_true", help="give the judge GSM8K's worked solution")
    parser.add_argument("--mc_rollouts", type=int, default=4)
    parser.add_argument("--mc_max_new_tokens", type=int, default=256)
    parser.add_argument("--mc_temperature", type=float, default=1.0)
    parser.add_argument("--mc_threshold", type=int, default=1,
                        help="a step is right when >= this many rollouts reach the gold answer")
    parser.add_argument("--chunk_size", type=int, default=0,
                        help="rows per generation call (0: 8 with transformers, 100 with vllm)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args(argv)
    unknown = set(cli.labellers.split(",")) - set(LABELLERS)
    if unknown:
        parser.error(f"unknown --labellers {sorted(unknown)}; choose from {','.join(LABELLERS)}")
    return cli


def label_settings(cli, judge_model: str) -> label.Settings:
    settings = label.Settings(
        prm="judge", judge_model=judge_model, judge_engine=cli.judge_engine, policy_model=judge_model,
        engine=cli.judge_engine, judge_max_new_tokens=cli.judge_max_new_tokens, mc_rollouts=cli.mc_rollouts,
        mc_threshold=cli.mc_threshold, mc_temperature=cli.mc_temperature, mc_max_new_tokens=cli.mc_max_new_tokens,
        seed=cli.seed, dtype=cli.dtype, judge_dtype=cli.dtype,
    )
    for name in judged_labellers(cli):  # each labeller's own, as label.py checks them
        label.check_args(labeller_settings(name, settings))
    return settings


def labeller_settings(name: str, settings: label.Settings) -> label.Settings:
    """Labeller ``name``'s settings (check | judge_step | judge_first_error | mc): its prm and judge protocol, and of
    the command line's options those that it uses."""
    prm, _, protocol = name.partition("_")
    settings = replace(settings, prm=prm, **({"judge_protocol": protocol} if protocol else {}))
    resolved = {field: functools.partial(engines.resolve_engine, getattr(settings, field))
                for field in ("engine", "judge_engine")}
    return options.applicable("label.py", settings, **resolved)


def judged_labellers(cli) -> list[str]:
    """The labellers of --labellers that run on the judge's engine (or on none: check)."""
    return [name for name in cli.labellers.split(",") if name != "reward_model"]


def run(cli, judge_model: str, prm_model: str = "") -> None:
    """Every labeller of --labellers on the same rows, then the report."""
    all_rows = jsonl.read_json(cli.data / "processbench_gsm8k.json")
    bench_rows = join_gsm8k(evenly_spaced(all_rows, cli.rows), cli.data)
    gold, text = [r["label"] for r in bench_rows], []
    if judged_labellers(cli):
        text.append(judge_run(cli, judge_model, bench_rows, gold, len(all_rows)))
    if "reward_model" in cli.labellers.split(","):
        text.append(prm_run(cli, prm_model, bench_rows, gold))
    cli.out.parent.mkdir(parents=True, exist_ok=True)
    cli.out.write_text("\n".join(text))
    print(f"wrote {cli.out}")


def judge_run(cli, judge_model: str, bench_rows: list[dict], gold: list[int], n_all: int) -> str:
    settings, engine_name = label_settings(cli, judge_model), engines.resolve_engine(cli.judge_engine)
    chunk_size = cli.chunk_size or (100 if engine_name == "vllm" else 8)
    start = time.perf_counter()
    engine = engines.get_engine(judge_model, label.judge_engine_settings(settings))
    load_seconds = time.perf_counter() - start
    rows, scores = as_label_rows(bench_rows, engine.tokenizer, cli.with_reference), []
    for name in judged_labellers(cli):
        scores.append(run_labeller(name, rows, gold, engine, settings, chunk_size))
        print(table_row(scores[-1]), flush=True)
    print(f"\n{TABLE_HEAD}\n" + "\n".join(map(table_row, scores)))
    return report(scores, cli, engine_name, chunk_size, load_seconds, n_all)


# ----------------------------------------------------------------------------- a trained PRM: F1 per threshold


def prm_run(cli, prm_model: str, bench_rows: list[dict], gold: list[int]) -> str:
    """The PRM's scores of every row (label.reward_model_labeller, 8 rows a call), then F1 at each threshold."""
    settings = label.Settings(prm="reward_model", prm_model=prm_model, prm_format=cli.prm_format)
    tokenizer, _, _ = label.get_prm(settings)
    rows = as_label_rows(bench_rows, tokenizer, with_reference=False)
    start, scores = time.perf_counter(), []
    for chunk in tqdm(sharding.chunked(rows, 8), desc="reward_model"):
        scores += label.reward_model_labeller(chunk, [prompting.step_spans(r["completion"]) for r in chunk], settings)
    seconds = time.perf_counter() - start
    sweep = [{"threshold": t, **f1_scores(gold, [next((k for k, p in enumerate(row) if p < t), -1) for row in scores])}
             for t in THRESHOLDS]
    best = max(sweep, key=lambda s: s["f1"])
    lines = [f"# ProcessBench GSM8K: a trained PRM ({cli.prm_format}) at every threshold", "",
             f"Command (repo root): `{command_line()}`", "",
             f"PRM: `{cli.prm_model}`" if cli.prm_model else "PRM: a tiny RANDOM Qwen2 PRM (tests/helpers.py): a "
             "mechanical check of the path, not a PRM.",
             f"{len(rows)} rows, scored in {seconds:.1f} s (model load excluded). Predicted first error = first step "
             "scored below the threshold, -1 if none.", "",
             "| threshold | accuracy on rows with an error | accuracy on rows without one | F1 |", "| --- | --- | --- | --- |"]
    lines += [f"| {s['threshold']:.2f} | {s['error_acc']:.3f} ({s['error_hits']}/{s['error_rows']}) | "
              f"{s['clean_acc']:.3f} ({s['clean_hits']}/{s['clean_rows']}) | {s['f1']:.3f} |" for s in sweep]
    lines += ["", f"Best threshold: **{best['threshold']:.2f}** (F1 {best['f1']:.3f}).", ""]
    print("\n".join(lines))
    return "\n".join(lines)


def build_tiny_prm(folder: Path) -> str:
    """A tiny random Qwen2ForProcessRewardModel (the tests'), with room for ProcessBench's solutions."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import save_tiny_qwen_prm

    save_tiny_qwen_prm(folder, max_len=8192)
    return str(folder)


def main() -> None:
    cli = parse_cli()
    with tempfile.TemporaryDirectory() as tmp:
        judge = cli.judge_model or (build_tiny_judge(Path(tmp) / "judge") if judged_labellers(cli) else "")
        prm = cli.prm_model or (build_tiny_prm(Path(tmp) / "prm") if "reward_model" in cli.labellers else "")
        run(cli, judge, prm)


if __name__ == "__main__":
    main()
