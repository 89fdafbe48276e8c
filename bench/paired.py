"""Step-KTO against KTO on the same seeds, problem by problem (README "Where step feedback pays in Pass@1").

    .venv/bin/python bench/paired.py runs_hard runs_hard_loop/SAMPLES=1

Each argument is a runs folder of run.sh's layout holding both objectives (seed<S>/{step-kto,kto}/eval/M<i>). Per
folder: Step-KTO's Pass@1 minus KTO's at every iteration, per seed and its mean; then, at the last iteration both
objectives reached, pooled over the seeds, the test problems that only one of the two solves (greedy) and a two-sided
sign test on them. Both models of a seed answer the same 500 problems from the same M0, so the paired count sees a
difference that the seeds' spread (each seed's M0 and samples differ) hides.
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkto import jsonl, report

OBJECTIVES = ("step-kto", "kto")


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial test of a successes against b at p = 1/2 (the discordant pairs of a paired test)."""
    n, k = a + b, min(a, b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def right_answers(eval_dir: Path) -> dict[str, bool]:
    """{problem id: greedy answer right} from evaluate.py's greedy_labels.jsonl."""
    rows = jsonl.read_jsonl(eval_dir / "greedy_labels.jsonl", {"problem_id": str, "outcome": bool})
    return {row["problem_id"]: row["outcome"] for row in rows}


def seed_runs(runs: Path) -> dict[str, dict[str, dict[int, tuple[Path, float]]]]:
    """{seed<S>: {objective: {iteration: (evaluation folder, Pass@1)}}} for the seeds that ran both objectives."""
    found = {}
    for run in report.run_dirs(runs):
        pass_at_1 = {row["iteration"]: row["pass@1"] for row in report.run_table(run)}
        found.setdefault(run.parent.name, {})[run.name] = {i: (d, pass_at_1[i]) for i, d in report.evaluations(run)}
    return {seed: runs_of for seed, runs_of in found.items() if all(o in runs_of for o in OBJECTIVES)}


def compare(runs: Path) -> dict:
    """Per-seed Pass@1 differences per iteration, and the last common iteration's discordant problems pooled."""
    seeds = seed_runs(runs)
    if not seeds:
        raise jsonl.DataError(f"{runs}: no seed<S> folder with both {' and '.join(OBJECTIVES)} evaluated")
    last = min(max(evals, default=0) for runs_of in seeds.values() for evals in runs_of.values())
    if last < 1:
        raise jsonl.DataError(f"{runs}: some seed has no iteration past M0 evaluated under both objectives")
    diffs, only = {i: [] for i in range(1, last + 1)}, [0, 0]
    for runs_of in seeds.values():
        ours, theirs = (runs_of[o] for o in OBJECTIVES)
        for i in diffs:
            diffs[i].append(100 * (ours[i][1] - theirs[i][1]))
        a, b = right_answers(ours[last][0]), right_answers(theirs[last][0])
        only[0] += sum(a[p] and not b.get(p, False) for p in a)
        only[1] += sum(b[p] and not a.get(p, False) for p in b)
    return {"seeds": len(seeds), "last": last, "diffs": diffs, "only": only, "p": sign_test(*only)}


def table(results: dict[str, dict]) -> str:
    """One markdown row per runs folder."""
    last = max(r["last"] for r in results.values())
    lines = ["| runs | seeds | " + " | ".join(f"Step-KTO - KTO at M{i}: mean (per seed)" for i in range(1, last + 1))
             + " | last M: right only under Step-KTO / KTO (sign test p) |", "|---" * (last + 3) + "|"]
    for name, r in results.items():
        cells = [f"{sum(d) / len(d):+.1f} ({', '.join(f'{x:+.1f}' for x in d)})" for d in r["diffs"].values()]
        cells += ["n/a"] * (last - r["last"])
        lines.append(f"| {name} | {r['seeds']} | " + " | ".join(cells)
                     + f" | M{r['last']}: {r['only'][0]} / {r['only'][1]} (p = {r['p']:.2g}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(table({arg: compare(Path(arg)) for arg in sys.argv[1:]}))
