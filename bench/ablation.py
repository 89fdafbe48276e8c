"""The ablation table of our reading of Step-KTO (embedded default): one iteration from a
finished run's M0 on the SAME labelled samples, one model per setting and training seed, each evaluated
greedily on the run's 500 test problems.

    bash run.sh                                                  # runs/seed0: data, M0, step-kto/iter1/labels.jsonl
    .venv/bin/python bench/ablation.py --run runs/seed0 --out runs_ablation --seeds 0 1 2
    .venv/bin/python bench/ablation.py --run runs/seed0 --out runs_ablation --only default,beta=0.3 --dry_run

Each setting is a name and the train.py options it changes from run.sh's iteration 1 (its command as run.sh
logged it in RUN/commands.log; options run.sh does not pass keep train.py's defaults). Every setting trains
M1 from RUN/M0 (reference RUN/M0) on RUN/step-kto/iter1/labels.jsonl (run.sh's iteration-1 samples: M0,
1,000 train problems x 4, temperature 1) with train.py --seed S for each --seeds S, then runs evaluate.py with run.sh's
own evaluation command of the run (RUN/commands.log: greedy, its labeller, prompt and token limit). The stages are subprocesses,
as in run.sh, with OMP_NUM_THREADS (default 2) threads. Layout, resumable (a setting's seed whose result.json
is written is skipped, a complete model is not trained again, train.py / evaluate.py resume partial work):

    OUT/<setting>/seed<S>/M1                the model (save_pretrained)
    OUT/<setting>/seed<S>/eval/result.json  evaluate.py's result (Pass@1, stepwise error rate)
    OUT/ablation.md                         the table printed at the end

The table: per setting, Pass@1 and the share of correct solutions with a wrong step, mean ± sample standard
deviation over the seeds (one seed: its value and 95% Wilson interval, as stepkto/report.py), and the number of
seeds; M0's own evaluation (RUN/eval/M0) on top. Training seed 1 is run.sh's seed for iteration 1 of seed 0
(--seed SEED * 1000 + i), so the default setting at seed 1 retrains runs/seed0/step-kto/M1.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
from stepkto import jsonl, models, report

SETTINGS = {  # name: the train.py options it changes from run.sh's iteration 1
    "default": {},
    "step_span=prefix": {"--step_span": "prefix"},  # step reward over the prefix through the step, not the step
    "step_aggregation=sum": {"--step_aggregation": "sum"},  # a completion's step losses summed, not averaged
    "w_step=0.5": {"--w_step": "0.5"},
    "w_step=2": {"--w_step": "2.0"},
    "step_z0=step": {"--step_z0": "step"},  # the step level's z0 from step pairs, not the outcome level's
    "step_scope=first_error": {"--step_scope": "first_error"},  # steps through the first wrong one only
    "balance_lambdas=off": {"--balance_lambdas": "False"},
    "nll_weight=0": {"--nll_weight": "0.0"},  # no NLL anchor (the paper's loss alone)
    "beta=0.05": {"--beta": "0.05"},
    "beta=0.3": {"--beta": "0.3"},
    "lr=3e-6": {"--lr": "3e-6"},  # the learning rate (a real model's sweep: README "A real pretrained model")
    "lr=3e-5": {"--lr": "3e-5"},
    "kto": {"--objective": "kto"},  # reference: outcome-only KTO on the same samples (run.sh's kto/iter1 are these too)
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (module docstring: `python bench/ablation.py --run runs/seed0 --out runs_ablation`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/seed0", help="A finished run's seed folder: M0, data/test.jsonl, "
                        "eval/M0 and step-kto/iter1/labels.jsonl.")
    parser.add_argument("--out", default="runs_ablation", help="Work folder: OUT/<setting>/seed<S>/{M1,eval}.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.py --seed values.")
    parser.add_argument("--only", default="", help=f"Comma-separated setting names (default all: {','.join(SETTINGS)})")
    parser.add_argument("--labels", default="", help="Labelled samples (default RUN/step-kto/iter1/labels.jsonl).")
    parser.add_argument("--dry_run", action="store_true", help="Print the commands that would run, run nothing.")
    args = parser.parse_args(argv)
    unknown = [name for name in args.only.split(",") if name and name not in SETTINGS]
    if unknown:
        parser.error(f"--only: unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    args.labels = args.labels or str(Path(args.run) / "step-kto" / "iter1" / "labels.jsonl")
    return args


def selected(args: argparse.Namespace) -> list[str]:
    """The settings to run, in SETTINGS order."""
    names = [name for name in args.only.split(",") if name]
    return [name for name in SETTINGS if not names or name in names]


def script(name: str) -> str:
    """A stage's path relative to the working directory (train.py from the repository root), as run.sh calls it."""
    return os.path.relpath(REPO / name)


def flat(options: dict) -> list[str]:
    """{"--beta": "0.3"} -> ["--beta", "0.3"]."""
    return [part for key, value in options.items() for part in (key, value)]


def commands(args: argparse.Namespace, name: str, seed: int, threads: int) -> list[tuple[Path, list[str]]]:
    """(output that marks the stage done, command) of the setting's train.py and evaluate.py at one seed: run.sh's
    own iteration-1 commands of the run (RUN/commands.log), with this setting's changes, model, data and output."""
    run, work = Path(args.run), Path(args.out) / name / f"seed{seed}"
    train_python, train = logged_command(run, "train.py", run / "step-kto" / "M1")
    train |= SETTINGS[name] | {"--model": str(run / "M0"), "--data": args.labels, "--output_dir": str(work / "M1"),
                               "--seed": str(seed), "--num_threads": str(threads)}
    eval_python, evaluate = logged_command(run, "evaluate.py", run / "step-kto" / "eval" / "M1")
    evaluate |= {"--model": str(work / "M1"), "--output_dir": str(work / "eval"), "--num_threads": str(threads)}
    return [(work / "M1", [train_python, script("train.py"), *flat(train)]),
            (work / "eval" / "result.json", [eval_python, script("evaluate.py"), *flat(evaluate)])]


def logged_command(run: Path, stage: str, output: Path) -> tuple[str, dict]:
    """(interpreter, {option: value}) of the command run.sh logged for ``stage`` writing ``output`` (RUN/commands.log):
    evaluate.py runs where run.sh ran it (with ENGINE=vllm on a CPU: .venv-vllm)."""
    log = run / "commands.log"
    if not log.exists():
        raise SystemExit(f"error: {log} not found: run.sh writes it; run `bash run.sh` first")
    for line in log.read_text().splitlines():
        words = shlex.split(line)
        if stage in [Path(w).name for w in words] and output.resolve() in [Path(w).resolve() for w in words]:
            at = [Path(w).name for w in words].index(stage)
            python = words[1]  # after CUDA_VISIBLE_DEVICES=...; under torchrun its python runs train.py in one process
            python = python if Path(python).is_absolute() or "/" not in python else str(REPO / python)
            return python, dict(zip(words[at + 1 :: 2], words[at + 2 :: 2]))
    raise SystemExit(f"error: {log} has no {stage} command writing {output}")


def is_done(output: Path) -> bool:
    """A stage is done once its model folder is complete or its result.json written."""
    return output.is_file() if output.suffix == ".json" else models.is_complete_model_dir(output)


def run_all(args: argparse.Namespace, threads: int) -> None:
    """Every seed x setting (a seed's whole row first), train then evaluate, skipping finished stages;
    --dry_run prints the commands instead."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    for seed in args.seeds:
        for name in selected(args):
            stages = commands(args, name, seed, threads)
            if is_done(stages[-1][0]):
                continue  # evaluated: the model is not needed again
            for output, cmd in stages:
                if is_done(output):
                    continue
                print(("" if args.dry_run else f"== {name} seed {seed}: ") + shlex.join(cmd), flush=True)
                if not args.dry_run and subprocess.run(cmd, env=env).returncode != 0:
                    raise SystemExit(f"error: {name} seed {seed} failed: {shlex.join(cmd)}")


def results(folder: Path, seeds: list[int]) -> list[dict]:
    """The result.json of the seeds' evaluations under a setting's folder (those written so far)."""
    paths = [folder / f"seed{seed}" / "eval" / "result.json" for seed in seeds]
    return [jsonl.read_json(path, jsonl.RESULT) for path in paths if path.exists()]


def table(args: argparse.Namespace) -> str:
    """Markdown: M0, then each selected setting: options changed, seeds, Pass@1, wrong-step share."""
    lines = ["| setting | train.py options changed | seeds | Pass@1 (%) | correct solutions with a wrong step (%) |",
             "|---|---|---|---|---|"]
    m0 = Path(args.run) / "eval" / "M0" / "result.json"
    groups = [("M0 (no training)", "", [jsonl.read_json(m0, jsonl.RESULT)] if m0.exists() else [])]
    groups += [(name, " ".join(flat(SETTINGS[name])) or "(run.sh's)", results(Path(args.out) / name, args.seeds))
               for name in selected(args)]
    for name, changed, rows in groups:
        cells = [report.summarise(rows, key).text for key in ("pass@1", "stepwise_error_rate")]
        lines.append(f"| {name} | {changed} | {len(rows)} | {' | '.join(cells)} |")
    return "\n".join(lines + ["", report.FOOTNOTE])


def main(argv: list[str] | None = None) -> None:
    """`python bench/ablation.py --run runs/seed0 --out runs_ablation [--seeds 0 1 2] [--only a,b] [--dry_run]`."""
    args = parse_args(argv)
    threads = int(os.environ.get("OMP_NUM_THREADS") or 2)  # run.sh's THREADS default
    run = Path(args.run)
    missing = [str(p) for p in (run / "M0", run / "data" / "test.jsonl", Path(args.labels)) if not p.exists()]
    if missing and not args.dry_run:
        raise SystemExit(f"error: {args.run} is not a finished run's seed folder (missing {missing}): run.sh first")
    run_all(args, threads)
    if args.dry_run:
        return
    text = table(args)
    print(text)
    command = shlex.join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    Path(args.out, "ablation.md").write_text(f"{command}\n\n{text}\n")


if __name__ == "__main__":
    main()
