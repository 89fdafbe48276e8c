"""Evaluate a model: Pass@1 with greedy decoding and the stepwise error rate (paper Tables 1 and 3).

* Pass@1: one greedy solution per problem, graded against the gold answer (math-verify, hard timeout);
  reported with a 95% confidence interval (Wilson).
* Stepwise error rate (paper Table 3): among the solutions whose final answer is correct, the share
  that contains at least one wrong step according to the step labeller (``--prm``).
* Optionally (``--sample_k K``) K sampled solutions per problem: mean Pass@1 over the K samples, the
  unbiased pass@k for k = 1, 2, 4, ... and K (Chen et al. 2021), Maj@K (majority vote, votes grouped by
  grading equivalence) and the stepwise error rate of samples.

Writes OUTPUT_DIR/{greedy_samples,greedy_labels}.jsonl (resumable, as every stage), OUTPUT_DIR/result.json,
replaces-or-appends this model's row in the run's results table (``--results_table``, JSONL), and with
``--report_to tensorboard|wandb`` logs result.json's numbers as eval/<metric> at step --iteration into
OUTPUT_DIR/tracking.

The default budget, 2048 new tokens, is the Qwen2.5-Math evaluation harness's (MATH-500 solutions run to
1,000+ tokens); its prompt is ``--prompt_style qwen25-math-cot`` and it decodes greedily. Usage:

    python evaluate.py --model runs/stepkto/M1 --benchmark runs/stepkto/data/test.jsonl --max_new_tokens 160 \
        --output_dir runs/stepkto/eval/M1 --results_table runs/stepkto/results.jsonl --name M1 --iteration 1
    python evaluate.py --model meta-llama/Llama-3.1-8B-Instruct --benchmark math500 --engine vllm \
        --prompt_style qwen25-math-cot --output_dir eval/math500 --sample_k 8 --sample_temperature 0.7 \
        --report_to tensorboard
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from transformers import HfArgumentParser

import common
import generate
import grading
import label


@dataclass
class Args:
    model: str = field(metadata={"help": "Model folder or hub id."})
    benchmark: str = field(metadata={"help": "Test problems: a JSONL path or math500|amc23|aime24|gsm8k."})
    output_dir: str = field(metadata={"help": "Folder for this evaluation's samples, labels and result.json."})
    results_table: str = field(default="", metadata={"help": "Run-level results JSONL to add this model's row to."})
    name: str = field(default="", metadata={"help": "Row name in the results table (e.g. M1); default: the model path."})
    iteration: int = field(default=-1, metadata={"help": "Step-KTO iteration of the model (0 = seed), for the table and as the --report_to step (-1: step 0)."})
    objective: str = field(default="", metadata={"help": "Training objective of the model, for the table."})
    run_seed: int = field(default=0, metadata={"help": "Seed of the run the model belongs to, for the table."})
    prm: str = field(default="check", metadata={"help": "Step labeller for the stepwise error rate (label.py --prm)."})
    judge_model: str = field(default="", metadata={"help": "--prm judge: the judge model (label.py --judge_model)."})
    judge_engine: str = field(default="auto", metadata={"help": "--prm judge: its engine (label.py --judge_engine)."})
    judge_protocol: str = field(default="step", metadata={"help": "--prm judge: step | first_error (label.py --judge_protocol)."})
    judge_dtype: str = field(default="", metadata={"help": "--prm judge: the judge's dtype (default: --dtype)."})
    judge_tensor_parallel_size: int = field(default=1, metadata={"help": "--prm judge: the judge's vLLM tensor parallel size."})
    sample_k: int = field(default=0, metadata={"help": "Also draw K samples per problem for mean Pass@1, pass@k (k = 1, 2, 4, ..., K) and Maj@K (0 = off)."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Temperature of the K samples."})
    max_new_tokens: int = field(default=2048, metadata={"help": "Maximum tokens generated per solution (2048: the Qwen2.5-Math harness's budget)."})
    max_problems: int = field(default=0, metadata={"help": "Use only the first N problems (0 = all)."})
    prompt_style: str = field(default="instruct", metadata={"help": "Prompt template: instruct | minimal | qwen25-math-cot (the Qwen2.5-Math harness's)."})
    engine: str = field(default="auto", metadata={"help": "transformers | vllm | auto."})
    chunk_size: int = field(default=256, metadata={"help": "Problems per generation chunk."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})
    seed: int = field(default=0, metadata={"help": "Sampling seed (greedy decoding ignores it)."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = default)."})
    report_to: str = field(default="none", metadata={"help": "Log result.json's numbers to none | tensorboard | wandb, in OUTPUT_DIR/tracking (wandb offline unless WANDB_MODE=online)."})


def check_args(args: Args) -> None:
    """Refuse bad settings before any model is loaded, not after an hour of generation."""
    if args.prompt_style not in common.PROMPT_TEMPLATES:
        raise ValueError(f"--prompt_style {args.prompt_style!r}: must be one of {' | '.join(common.PROMPT_TEMPLATES)}")
    if args.report_to not in common.REPORT_TO:
        raise ValueError(f"--report_to {args.report_to!r}: must be one of {' | '.join(common.REPORT_TO)}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.sample_k < 0:
        raise ValueError(f"--sample_k must be >= 0 (0 = off), got {args.sample_k}")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest at small n (AIME24 has 30 problems)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def stepwise_error_rate(rows: list[dict]) -> tuple[float | None, int]:
    """Share of correct-answer solutions with at least one wrong step (paper Table 3); None if none correct."""
    correct = [r for r in rows if r["outcome"]]
    if not correct:
        return None, 0
    flawed = sum(1 for r in correct if not all(r["labels"]))
    return flawed / len(correct), flawed


def greedy_metrics(rows: list[dict]) -> dict:
    n, solved = len(rows), sum(r["outcome"] for r in rows)
    ser, flawed = stepwise_error_rate(rows)
    return {
        "n_problems": n,
        "pass@1": solved / n,
        "pass@1_ci95": wilson_interval(solved, n),
        "stepwise_error_rate": ser,
        "n_correct": solved,
        "n_correct_with_wrong_step": flawed,
        "truncated": sum(r["finish_reason"] == "length" for r in rows),
    }


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
    pids = list(by_problem)
    votes = [[r["pred"] for r in by_problem[pid] if r["pred"] is not None] for pid in pids]
    majority = grading.majority_answers(votes, timeout_s=timeout_s)  # one worker pool for all problems
    golds = [by_problem[pid][0]["answer"] for pid in pids]
    maj_correct = grading.grade_answers(golds, majority, timeout_s=timeout_s)
    ser, _ = stepwise_error_rate(rows)
    n = len(pids)
    counts = [(len(by_problem[pid]), sum(r["outcome"] for r in by_problem[pid])) for pid in pids]
    return {
        f"mean_pass@1_over_{k}": sum(r["outcome"] for r in rows) / len(rows),
        # named "_over_K" (the n of the estimator) so as not to clash with the greedy "pass@1"
        **{f"pass@{j}_over_{k}": float(np.mean([pass_at_k(m, c, j) for m, c in counts])) for j in pass_k_values(k)},
        f"maj@{k}": sum(maj_correct) / n,
        f"maj@{k}_ci95": wilson_interval(sum(maj_correct), n),
        "stepwise_error_rate_sampled": ser,
    }


def sample_and_label(args: Args, problems: list[dict], tag: str, n: int, temperature: float) -> list[dict]:
    """Generate (resumable) and label (resumable) one set of solutions; returns the labelled rows."""
    out = Path(args.output_dir)
    gen_args = generate.Args(
        model=args.model, problems=args.benchmark, output=str(out / f"{tag}_samples.jsonl"), num_samples=n,
        temperature=temperature, max_new_tokens=args.max_new_tokens, seed=args.seed, engine=args.engine,
        prompt_style=args.prompt_style, chunk_size=args.chunk_size, dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    if not Path(gen_args.output).exists():
        generate.generate_rows(gen_args, problems, gen_args.output, desc=f"eval {tag}")
    label_args = label.Args(
        input=gen_args.output, output=str(out / f"{tag}_labels.jsonl"), prm=args.prm,
        judge_model=args.judge_model, judge_engine=args.judge_engine, judge_protocol=args.judge_protocol,
        dtype=args.judge_dtype or args.dtype, tensor_parallel_size=args.judge_tensor_parallel_size,
    )
    label.main(label_args)
    return common.read_jsonl(label_args.output)


def add_to_results_table(path: str, row: dict) -> None:
    """Replace this model's row (a rerun after a crash must not duplicate it) or append it."""
    table = Path(path)
    rows = [json.loads(l) for l in table.read_text().splitlines() if l.strip()] if table.exists() else []
    rows = [r for r in rows if r.get("name") != row["name"]] + [row]
    common.write_jsonl_atomic(table, rows)


def compute_result(args: Args, problems: list[dict]) -> dict:
    """result.json's content: greedy metrics, and sampled ones with --sample_k."""
    result = {"model": args.model, "benchmark": args.benchmark, "prm": args.prm}
    result.update(greedy_metrics(sample_and_label(args, problems, "greedy", 1, 0.0)))
    if args.sample_k:
        rows = sample_and_label(args, problems, "sampled", args.sample_k, args.sample_temperature)
        result.update(sampled_metrics(rows, args.sample_k))
    return result


def main(args: Args) -> None:
    check_args(args)
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    problems = generate.load_problems(args.benchmark, args.max_problems)
    step = max(args.iteration, 0)  # the x axis of M0..M3; a model outside the loop (-1) goes at 0
    # opened before generating, so that a missing tensorboard/wandb fails now and not after the evaluation
    tracking = common.open_tracker(args.report_to, Path(args.output_dir) / "tracking", args.name or Path(args.model).name,
                                   asdict(args), start_step=step)
    with tracking:
        result = compute_result(args, problems)
        common.write_json_atomic(Path(args.output_dir) / "result.json", result)
        tracking.log({f"eval/{key}": value for key, value in result.items()}, step)
    if args.results_table:
        meta = {"name": args.name or args.model, "iteration": args.iteration, "objective": args.objective, "seed": args.run_seed}
        add_to_results_table(args.results_table, {**meta, **result})
    ser = result["stepwise_error_rate"]
    print(f"{args.name or args.model}: Pass@1 {result['pass@1']:.3f}  stepwise error rate {ser if ser is None else round(ser, 3)}")


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    try:
        main(parsed)
    except ValueError as e:  # common.DataError and grading's loader errors name file, line and field
        sys.exit(f"error: {e}")
