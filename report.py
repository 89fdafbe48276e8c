"""The M0..M3 table and plot over every run under a folder (mean and spread over seeds).

Reads RUNS/seed*/<objective>/results.jsonl (written by evaluate.py), prints a markdown table of
Pass@1 and the stepwise error rate per objective and iteration, and writes a PNG plot.

    python report.py --runs runs --plot runs/results.png
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser


@dataclass
class Args:
    runs: str = field(default="runs", metadata={"help": "Folder holding seed*/<objective>/results.jsonl."})
    plot: str = field(default="", metadata={"help": "PNG path for the plot (empty = no plot)."})


def collect(runs: Path) -> dict:
    """{objective: {iteration: [row per seed]}}"""
    table = defaultdict(lambda: defaultdict(list))
    for path in sorted(runs.glob("seed*/*/results.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                table[row["objective"]][row["iteration"]].append(row)
    return table


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed), in percent."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(table: dict) -> str:
    lines = [
        "| objective | model | seeds | Pass@1 (%) | stepwise error rate among correct (%) |",
        "|---|---|---|---|---|",
    ]
    for objective in sorted(table):
        for it in sorted(table[objective]):
            rows = table[objective][it]
            p, ps = mean_spread([r["pass@1"] for r in rows])
            e, es = mean_spread([r["stepwise_error_rate"] for r in rows])
            lines.append(f"| {objective} | M{it} | {len(rows)} | {p:.1f} ± {ps:.1f} | {e:.1f} ± {es:.1f} |")
    return "\n".join(lines)


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    metrics = [("pass@1", "Pass@1 (%)"), ("stepwise_error_rate", "correct solutions with a wrong step (%)")]
    for ax, (key, title) in zip(axes, metrics):
        for objective in sorted(table):
            its = sorted(table[objective])
            stats = [mean_spread([r[key] for r in table[objective][i]]) for i in its]
            ax.errorbar(its, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=objective)
        ax.set_xticks(range(max(max(t) for t in table.values()) + 1))
        ax.set_xticklabels([f"M{i}" for i in ax.get_xticks()])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(args: Args) -> None:
    table = collect(Path(args.runs))
    if not table:
        raise SystemExit(f"error: no results under {args.runs}/seed*/*/results.jsonl")
    print(markdown_table(table))
    if args.plot:
        plot(table, args.plot)


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    main(parsed)
