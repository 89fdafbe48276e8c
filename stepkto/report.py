"""The M0..M3 table and plot over every run under a folder (mean and spread over seeds; paper Section 3).

Reads run.sh's layout (paper Section 2.4: M0, then one model per iteration): RUNS/seed<S>/eval/M0/result.json (the
seed model, shared by every objective of seed S) and RUNS/seed<S>/<objective>/eval/M<i>/result.json. Writes each run's
results table RUNS/seed<S>/<objective>/results.jsonl (jsonl.RESULTS_TABLE_ROW per model), prints a markdown table of
Pass@1 and the stepwise error rate per objective and iteration, and plots them:

    python -m stepkto.report --runs runs --plot runs/results.png
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict, namedtuple
from dataclasses import dataclass
from pathlib import Path

from stepkto import cli, jsonl, options
from stepkto.cli import option

# the folders of RUNS/seed<S> that every objective shares (run.sh): the others are runs, one per objective
SHARED = ("data", "M0", "eval")


@dataclass
class Args:
    runs: str = option("runs", help="Folder holding run.sh's runs: seed<S>/eval/M0 and seed<S>/<objective>/eval/M<i>.")
    plot: str = option("", help="PNG path for the plot (empty = no plot).")
    title: str = option("", help="What the runs are, for the plot's title (empty: M0's benchmark and model).")


def run_dirs(runs: Path) -> list[Path]:
    """Every run folder RUNS/seed<S>/<objective>."""
    seeds = [p for p in sorted(runs.glob("seed*")) if re.fullmatch(r"seed\d+", p.name)]
    return [p for seed in seeds for p in sorted(seed.iterdir()) if p.is_dir() and p.name not in SHARED]


def evaluations(run: Path) -> list[tuple[int, Path]]:
    """(iteration, evaluation folder) of every evaluated model of a run, M0 (the seed's) first."""
    own = [(int(p.name[1:]), p) for p in (run / "eval").glob("M*") if re.fullmatch(r"M\d+", p.name)]
    return sorted((i, p) for i, p in [(0, run.parent / "eval" / "M0")] + own if (p / "result.json").exists())


def run_table(run: Path) -> list[dict]:
    """The run's results table: its models' result.json, named by the layout."""
    seed = int(run.parent.name.removeprefix("seed"))
    return [{"name": f"M{i}", "iteration": i, "objective": run.name, "seed": seed,
             **jsonl.read_json(path / "result.json", jsonl.RESULT)} for i, path in evaluations(run)]


def collect(runs: Path) -> dict:
    """{objective: {iteration: [row per seed]}} of every run under ``runs``; writes each run's results.jsonl."""
    table = defaultdict(lambda: defaultdict(list))
    for run in run_dirs(runs):
        if rows := run_table(run):
            jsonl.write_jsonl_atomic(run / "results.jsonl", rows, jsonl.RESULTS_TABLE_ROW)
        for row in rows:
            table[row["objective"]][row["iteration"]].append(row)
    return table


METRICS = {"pass@1": "Pass@1 (%)", "stepwise_error_rate": "stepwise error rate among correct (%)"}
FOOTNOTE = ("Several seeds: mean ± sample standard deviation over the seeds. One seed: that run's value "
            "[95% Wilson interval] (over the problems for Pass@1, over the correct solutions for the error rate).")


# one table cell and plot point, in percent: value with error bars down / up (NaN: no value)
Cell = namedtuple("Cell", "value down up text")


def summarise(rows: list[dict], key: str) -> Cell:
    """Several seeds: mean ± sample standard deviation; one seed: its value and 95% Wilson interval."""
    rows = [r for r in rows if r[key] is not None]  # a run without a correct solution has no error rate
    if not rows:
        return Cell(float("nan"), float("nan"), float("nan"), "n/a")
    if len(rows) == 1:
        value, (lo, hi) = 100 * rows[0][key], (100 * x for x in rows[0][f"{key}_ci95"])  # evaluate.py's
        return Cell(value, value - lo, hi - value, f"{value:.1f} [{lo:.1f}, {hi:.1f}]")
    values = [100 * r[key] for r in rows]
    mean, spread = statistics.mean(values), statistics.stdev(values)
    return Cell(mean, spread, spread, f"{mean:.1f} ± {spread:.1f}")


def markdown_table(table: dict) -> str:
    lines = [f"| objective | model | seeds | {' | '.join(METRICS.values())} |", "|---|---|---|---|---|"]
    for objective in sorted(table):
        for it in sorted(table[objective]):
            rows = table[objective][it]
            cells = " | ".join(summarise(rows, key).text for key in METRICS)
            lines.append(f"| {objective} | M{it} | {len(rows)} | {cells} |")
    return "\n".join(lines + ["", FOOTNOTE])


def plot(table: dict, path: str, title: str = "") -> None:
    """One line per objective, error bars as in the table, on a panel per metric; titled by plot_title."""
    from matplotlib.figure import Figure  # without pyplot: no display backend needed

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, (key, label) in zip(axes, METRICS.items()):
        for objective in sorted(table):
            its = sorted(table[objective])
            cells = [summarise(table[objective][i], key) for i in its]
            ax.errorbar(its, [c.value for c in cells], yerr=[[c.down for c in cells], [c.up for c in cells]],
                        marker="o", capsize=3, label=objective)
        ax.set_xticks(ticks := range(max(max(t) for t in table.values()) + 1), [f"M{i}" for i in ticks])
        ax.set_xlabel("model (iteration of the loop, paper Sec. 2.4)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(plot_title(table, title), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def plot_title(table: dict, what: str = "") -> str:
    """``what`` was run (default: M0's benchmark and model), the seeds and what the bars are."""
    rows = [row for iterations in table.values() for seeds in iterations.values() for row in seeds]
    seeds = sorted({row["seed"] for row in rows})
    m0 = next((row for row in rows if row["iteration"] == 0), rows[0])
    what = what or f"{Path(m0['benchmark']).name}, M0 = {Path(m0['model']).name}"
    bars = "mean ± sd over seeds" if len(seeds) > 1 else "bars: its 95% Wilson interval"
    return f"{what}; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} ({bars})"


def main(args: Args) -> None:
    options.refuse_inapplicable("stepkto/report.py", args)
    table = collect(Path(args.runs))
    if not table:
        raise SystemExit(f"error: no results under {args.runs}/seed*/ (eval/M0 or <objective>/eval/M<i>)")
    print(markdown_table(table))
    if args.plot:
        plot(table, args.plot, args.title)


if __name__ == "__main__":
    cli.run_cli(Args, main)
