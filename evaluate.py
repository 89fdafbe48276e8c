"""Evaluate a model: Pass@1 with greedy decoding and the stepwise error rate (paper Section 3, Tables 1 and 3).

* Pass@1: one greedy solution per problem, graded against the gold answer (math-verify, hard timeout), with a 95%
  confidence interval (Wilson).
* Stepwise error rate (paper Table 3): among the solutions whose final answer is correct, the share that contains at
  least one wrong step according to the step labeller (``--prm``), over the judged ones: a solution with no wrong
  step but a step without a verdict is undetermined and left out (``n_correct_unjudged``, beside ``prm_failures``).
* Optionally (``--sample_k K``) K sampled solutions per problem: mean Pass@1 over the K samples, the unbiased pass@k
  for k = 1, 2, 4, ... and K (Chen et al. 2021), Maj@K (majority vote, votes grouped by grading equivalence) and
  the stepwise error rate of samples.

Writes OUTPUT_DIR/{greedy_samples,greedy_labels}.jsonl (resumable, through generate.generate_rows and
label.label_file) and OUTPUT_DIR/result.json (jsonl.RESULT), and with ``--report_to tensorboard|wandb`` logs its
numbers as eval/<metric> at step ``--step`` into OUTPUT_DIR/tracking. The evaluation's name (printed, and the
tracker's run name) is OUTPUT_DIR's folder name: M<i> in run.sh's layout, whose results table is stepkto/report.py's.

The default budget, 2048 new tokens, is the Qwen2.5-Math evaluation harness's (MATH-500 solutions run to 1,000+
tokens); its prompt is ``--prompt_style qwen25-math-cot`` and it decodes greedily. With --num_shards N every
process samples and labels its own chunks (one engine at a time: the policy's, then the judge's), and the last to
finish writes result.json. Usage:

    python evaluate.py --model runs/seed0/step-kto/M1 --benchmark runs/seed0/data/test.jsonl --max_new_tokens 160 \
        --output_dir runs/seed0/step-kto/eval/M1
    python evaluate.py --model meta-llama/Llama-3.1-8B-Instruct --benchmark math500 --engine vllm \
        --prompt_style qwen25-math-cot --output_dir eval/math500 --sample_k 8 --sample_temperature 0.7 \
        --report_to tensorboard --step 0
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np

import generate
import label
from stepkto import cli, engines, grading, jsonl, options, provenance, sharding, tracking
from stepkto.cli import option


@dataclass(frozen=True, kw_only=True)
class Args(sharding.ShardArgs, generate.Policy, label.Settings):
    """evaluate.py's command line: the evaluated policy (generate.Policy), the step labeller (label.Settings, as
    label.py takes them), the benchmark and the tracker; --prm mc rolls out the evaluated model (or --policy_model)."""

    max_new_tokens: int = option(2048, help="Maximum tokens per solution (2048: the Qwen2.5-Math harness's budget).")
    seed: int = option(0, help="Seed of --sample_k's samples and of mc rollouts; chunks are seeded from (seed, chunk).")
    benchmark: str = option(help="Test problems: a JSONL path or math500|amc23|aime24|gsm8k.")
    output_dir: str = option(help="Folder for this evaluation's samples, labels and result.json.")
    max_problems: int = option(0, help="Use only the first N problems (0 = all).")
    sample_k: int = option(0, help="K samples per problem: mean Pass@1, pass@k (k = 1, 2, 4, ..., K), Maj@K (0 = off).")
    sample_temperature: float = option(1.0, help="Temperature of the K samples.")
    num_threads: int = option(0, help="torch CPU threads (0 = default).")
    report_to: tracking.ReportTo = option("none", help=(
        "Log result.json's numbers to none | tensorboard | wandb (offline unless WANDB_MODE=online), in OUTPUT_DIR."))
    step: Optional[int] = option(None, help=(
        "--report_to: the step the numbers are logged at (run.sh: the iteration i of M_i, Section 2.4; default 0)."))
    on_change: provenance.OnChange = option("stop", help=provenance.ON_CHANGE_HELP)


def check_args(args: Args) -> None:
    """Refuse bad settings before any model is loaded, not after an hour of generation."""
    cli.check_choices(args)
    options.refuse_inapplicable("evaluate.py", args, engine=lambda: engines.resolve_engine(args.engine),
                                judge_engine=lambda: engines.resolve_engine(args.judge_engine))
    label.check_args(label_settings(args))
    for name, least in (("max_new_tokens", 1), ("sample_k", 0), ("step", 0)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise ValueError(f"--{name} must be >= {least}, got {getattr(args, name)}")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest at small n (AIME24 has 30 problems)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def judged_solutions(rows: list[dict]) -> tuple[int, int, int]:
    """(flawed, clean, undetermined) correct-answer solutions: a step wrong; every step right; neither (no evidence)."""
    correct = [r["labels"] for r in rows if r["outcome"]]
    flawed = sum(False in labels for labels in correct)
    clean = sum(all(step_label is True for step_label in labels) for labels in correct)
    return flawed, clean, len(correct) - flawed - clean


def stepwise_error_rate(rows: list[dict]) -> float | None:
    """Share of the judged correct-answer solutions with a wrong step (paper Table 3); None when none is judged."""
    flawed, clean, _ = judged_solutions(rows)
    return flawed / (flawed + clean) if flawed + clean else None


def greedy_metrics(rows: list[dict]) -> dict:
    n, solved = len(rows), sum(r["outcome"] for r in rows)
    flawed, clean, undetermined = judged_solutions(rows)
    return {"n_problems": n, "pass@1": solved / n, "pass@1_ci95": wilson_interval(solved, n),
            "stepwise_error_rate": stepwise_error_rate(rows),
            "stepwise_error_rate_ci95": wilson_interval(flawed, flawed + clean),  # over the judged correct solutions
            "n_correct": solved, "n_correct_with_wrong_step": flawed,
            "n_correct_unjudged": undetermined,  # left out of the rate: no wrong step, but a step without a verdict
            "prm_failures": sum(r["prm_failures"] for r in rows),  # steps without a verdict
            "truncated": sum(r["finish_reason"] == "length" for r in rows)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` of ``n`` samples correct (Chen et al. 2021, Sec. 2.1):
    1 - C(n-c, k) / C(n, k), the chance that k of the n samples, drawn without replacement, hold a correct
    one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i): the binomials themselves overflow for large n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_k_values(k: int) -> list[int]:
    """The k of the reported pass@k: 1, 2, 4, ... up to K, and K itself."""
    return sorted({2**i for i in range(k.bit_length())} | {k})


def sampled_metrics(rows: list[dict], k: int, timeout_s: float = 5.0) -> dict:
    """Mean Pass@1 over K samples, unbiased pass@k, and Maj@K with votes grouped by grading equivalence."""
    by_problem = defaultdict(list)
    for r in rows:
        by_problem[r["problem_id"]].append(r)
    groups = list(by_problem.values())
    votes = [[r["pred"] for r in group if r["pred"] is not None] for group in groups]
    majority = grading.majority_answers(votes, timeout_s=timeout_s)  # one worker pool for all problems
    maj_correct = sum(grading.grade_answers([group[0]["answer"] for group in groups], majority, timeout_s=timeout_s))
    counts = [(len(group), sum(r["outcome"] for r in group)) for group in groups]
    # named "_over_K" (the n of the estimator) so as not to clash with the greedy "pass@1"
    return {f"mean_pass@1_over_{k}": sum(r["outcome"] for r in rows) / len(rows),
            **{f"pass@{j}_over_{k}": float(np.mean([pass_at_k(m, c, j) for m, c in counts])) for j in pass_k_values(k)},
            f"maj@{k}": maj_correct / len(groups), f"maj@{k}_ci95": wilson_interval(maj_correct, len(groups)),
            "stepwise_error_rate_sampled": stepwise_error_rate(rows)}


def options_of(args: Args, settings_class) -> dict:
    """The options of ``args`` that ``settings_class`` (generate.Policy, label.Settings) holds."""
    return {f.name: getattr(args, f.name) for f in fields(settings_class)}


def label_settings(args: Args) -> label.Settings:
    """How the solutions are labelled: label.py's settings as given; mc rolls out with the evaluated model."""
    return label.Settings(**options_of(args, label.Settings) | {"policy_model": args.policy_model or args.model})


def output_file(args: Args, tag: str, kind: str) -> str:
    return str(Path(args.output_dir) / f"{tag}_{kind}.jsonl")


def evaluation_provenance(args: Args, problems: list[dict]) -> dict:
    """OUTPUT_DIR's provenance record: the benchmark's problems, the evaluated model, how it samples and how its
    solutions are labelled (label.labelling_provenance's settings and models)."""
    labelling = label.labelling_provenance(label_settings(args), {}, args.chunk_size)
    policy = {k: v for k, v in options_of(args, generate.Policy).items() if k != "model"}
    sampled = {"sample_k": args.sample_k, "sample_temperature": args.sample_temperature if args.sample_k else None}
    return provenance.make_record("evaluate.py", {"benchmark": provenance.rows_input(problems, args.benchmark)},
                                  {"model": provenance.model_identity(args.model), **labelling["models"]},
                                  {**policy, **sampled, "labeller": labelling["settings"]})


def evaluate_shard(args: Args, problems: list[dict], shard: sharding.Shard) -> bool:
    """Generate, then label, this shard's chunks of every set of solutions (greedy; sampled with --sample_k): all
    generation first, so that the policy's engine runs once and the judge's after it. True when all are labelled."""
    sets = [("greedy", 1, 0.0)] + ([("sampled", args.sample_k, args.sample_temperature)] if args.sample_k else [])
    for tag, n, temperature in sets:
        settings = generate.Settings(**options_of(args, generate.Policy), num_samples=n, temperature=temperature)
        generate.generate_rows(problems, output_file(args, tag, "samples"), settings, shard, desc=f"eval {tag}",
                               source=args.benchmark)
    return all([label_set(args, problems, tag, n, shard) for tag, n, _ in sets])


def label_set(args: Args, problems: list[dict], tag: str, n: int, shard: sharding.Shard) -> bool:
    """Label a set's samples in the chunks they were generated in (a chunk of problems is a chunk of labels), so
    that every shard labels its own chunks without waiting for the others' samples."""
    (samples, labels), settings = [output_file(args, tag, kind) for kind in ("samples", "labels")], label_settings(args)
    # the samples as their provenance record states them: a shard's own part may be all it can read yet
    inputs = {"samples": {"sha256": provenance.file_sha256(provenance.record_path(samples)), "path": samples}}
    if provenance.settle_jsonl(labels, label.labelling_provenance(settings, inputs, args.chunk_size), args.on_change):
        return True
    chunk_ids = [generate.sample_ids(c, n) for c in sharding.chunked(problems, args.chunk_size)]
    rows = sharding.shard_rows(Path(samples), chunk_ids, shard)
    # a benchmark may have no reference solutions (AMC23): say how many rows the judge sees none for, never refuse
    label.check_references([r for chunk in rows.values() for r in chunk],
                           replace(settings, allow_missing_reference=True), samples)
    return label.label_chunks(chunk_ids, rows.__getitem__, labels, settings, shard)


def main(args: Args) -> None:
    check_args(args)
    cli.set_num_threads(args.num_threads)
    tracking.check_tracker_backend(args.report_to)  # a missing tensorboard / wandb fails now, not after the evaluation
    shard, out = args.shard(), Path(args.output_dir)
    problems = generate.load_problems(args.benchmark, args.max_problems)
    record = evaluation_provenance(args, problems)
    if provenance.settle_folder(out, record, args.on_change, [out / "result.json"],
                                list(out.iterdir()) if out.is_dir() else []):
        return
    if not evaluate_shard(args, problems, shard):
        print(f"shard {shard.index} of {shard.count} done: the last shard to finish writes result.json")
        return
    result = {"model": args.model, "benchmark": args.benchmark, "prm": args.prm, "provenance": record,
              **greedy_metrics(jsonl.read_jsonl(output_file(args, "greedy", "labels"), jsonl.LABELLED_ROW))}
    if args.sample_k:
        result |= sampled_metrics(jsonl.read_jsonl(output_file(args, "sampled", "labels"), jsonl.LABELLED_ROW),
                                  args.sample_k)
    jsonl.write_json_atomic(out / "result.json", result, jsonl.RESULT)
    step, name = args.step or 0, out.name  # the evaluation's name: M<i> in run.sh's layout
    with tracking.open_tracker(args.report_to, out / "tracking", name, asdict(args), step) as tracker:
        tracker.log({f"eval/{key}": value for key, value in result.items()}, step)
    ser = result["stepwise_error_rate"]
    print(f"{name}: Pass@1 {result['pass@1']:.3f}  stepwise error rate {ser if ser is None else round(ser, 3)}")


if __name__ == "__main__":
    cli.run_cli(Args, main)
