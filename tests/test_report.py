"""stepkto/report.py's uncertainty (one seed: the run's 95% Wilson interval; several: mean ± spread) and its plot of every
objective; bench/ablation.py's commands (--dry_run only: nothing is trained here) and its table; bench/paired.py's
comparison of the objectives; run.sh's TASK and MAX_PROBLEMS settings. run.sh is read through a copy whose PYTHON only logs the stage commands: no stage runs."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.figure
import pytest
from transformers import HfArgumentParser

import ablation  # bench/ablation.py (tests/conftest.py)
from stepkto import jsonl, report
import evaluate
import paired  # bench/paired.py (tests/conftest.py)
import train

REPO = Path(__file__).resolve().parents[1]


def result(solved: int, flawed: int, n: int = 500, ci95: tuple | None = None) -> dict:
    """A result.json as evaluate.py writes it (its pass@1_ci95 is evaluate.wilson_interval(solved, n))."""
    return {"model": "m", "benchmark": "b", "prm": "check", "n_problems": n, "pass@1": solved / n,
            "pass@1_ci95": list(ci95 or evaluate.wilson_interval(solved, n)),
            "stepwise_error_rate": flawed / solved if solved else None,
            "stepwise_error_rate_ci95": list(evaluate.wilson_interval(flawed, solved)), "n_correct": solved,
            "n_correct_with_wrong_step": flawed, "truncated": 0}


def test_report_one_seed_shows_the_runs_interval_and_plots_every_objective(tmp_path, capsys, monkeypatch):
    layout = {"seed0/eval/M0": result(287, 68), "seed0/step-kto/eval/M1": result(434, 21),
              "seed0/kto/eval/M1": result(430, 120, ci95=(0.1, 0.9))}
    for folder, row in layout.items():
        jsonl.write_json_atomic(tmp_path / folder / "result.json", row)
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    report.main(report.Args(runs=str(tmp_path), plot=str(tmp_path / "results.png")))
    out = capsys.readouterr().out
    # Pass@1 287/500 and 68 of the 287 correct solutions with a wrong step: Wilson intervals, not "± 0.0"
    assert "| step-kto | M0 | 1 | 57.4 [53.0, 61.7] | 23.7 [19.1, 28.9] |" in out
    assert "| kto | M1 | 1 | 86.0 [10.0, 90.0] |" in out  # Pass@1's interval is result.json's pass@1_ci95
    assert "± 0.0" not in out and report.FOOTNOTE in out
    (fig,) = figures
    for ax in fig.axes:  # one line per objective on both panels, M0 (shared) and M1 each
        assert [c.get_label() for c in ax.containers] == ["kto", "step-kto"]
        assert [list(c.lines[0].get_xdata()) for c in ax.containers] == [[0, 1], [0, 1]]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["kto", "step-kto"]


def test_report_summarise_several_seeds_and_missing_rates():
    rows = [result(250, 50), result(300, 30), result(0, 0)]
    cell = report.summarise(rows, "pass@1")
    assert cell.text == "36.7 ± 32.1" and cell.down == cell.up  # mean ± sample standard deviation over 3 seeds
    assert report.summarise(rows, "stepwise_error_rate").text == "15.0 ± 7.1"  # the seeds that have a rate
    assert report.summarise(rows[1:], "stepwise_error_rate").text == "10.0 [7.1, 13.9]"  # only one has: its interval
    assert report.summarise([result(0, 0)], "stepwise_error_rate").text == "n/a"


def logged_run(tmp_path, **env) -> Path:
    """A run folder whose commands.log run.sh wrote (through a stub python that runs nothing): RUNS/seed0."""
    runs = tmp_path / f"runs_{'_'.join(env.values()) or 'default'}"
    if not (runs / "seed0" / "commands.log").exists():
        run_sh_commands(tmp_path / runs.name, ITERATIONS="1", RUNS=str(runs), **env)
    return runs / "seed0"


def dry_run(tmp_path, capsys, *extra, run: Path | None = None) -> list[list[str]]:
    run = run or logged_run(tmp_path)
    ablation.main(["--run", str(run), "--out", str(tmp_path / "out"), "--dry_run", *extra])
    return [line.split() for line in capsys.readouterr().out.splitlines()]


def test_ablation_dry_run_commands_carry_each_settings_options(tmp_path, capsys):
    commands = dry_run(tmp_path, capsys, "--seeds", "0", "2")
    assert len(commands) == 2 * 2 * len(ablation.SETTINGS)  # train + evaluate per setting and seed
    trains, run = [c for c in commands if c[1] == "train.py"], logged_run(tmp_path)
    _, run_sh = ablation.logged_command(run, "train.py", run / "step-kto" / "M1")
    for cmd in trains:
        (args,) = HfArgumentParser(train.Args).parse_args_into_dataclasses(args=cmd[2:])
        name = Path(args.output_dir).parts[-3]
        expected = {**options(["train.py", *(x for kv in run_sh.items() for x in kv)]), **ablation.SETTINGS[name]}
        for option, value in expected.items():  # the setting's value wins over run.sh's, each option once
            assert cmd.count(option) == 1 and cmd[cmd.index(option) + 1] == value
        assert args.model == str(run / "M0") and args.seed in (0, 2)
        assert args.data == str(run / "step-kto" / "iter1" / "labels.jsonl")  # the same samples
    parsed = {Path(c[c.index("--output_dir") + 1]).parts[-3]: c for c in trains}
    (z0,) = HfArgumentParser(train.Args).parse_args_into_dataclasses(args=parsed["step_z0=step"][2:])
    (off,) = HfArgumentParser(train.Args).parse_args_into_dataclasses(args=parsed["balance_lambdas=off"][2:])
    assert z0.step_z0 == "step" and off.balance_lambdas is False and z0.balance_lambdas is True
    evals = [c for c in commands if c[1] == "evaluate.py"]
    for cmd in evals:
        (args,) = HfArgumentParser(evaluate.Args).parse_args_into_dataclasses(args=cmd[2:])
        assert (args.max_new_tokens, args.prm, args.prompt_style, args.sample_k) == (96, "check", "minimal", 0)
        assert args.benchmark == str(run / "data" / "test.jsonl")


def test_ablation_skips_finished_stages_and_tabulates(tmp_path, capsys):
    work = tmp_path / "out" / "beta=0.3"
    for seed, solved in ((0, 440), (1, 430)):
        jsonl.write_json_atomic(work / f"seed{seed}" / "eval" / "result.json", result(solved, 10))
    model = work / "seed2" / "M1"  # a complete model not yet evaluated: only its evaluation is left
    model.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "tokenizer_config.json"):
        (model / name).write_text("{}")
    commands = dry_run(tmp_path, capsys, "--only", "beta=0.3,default")  # seeds 0 1 2, seed by seed
    assert [(c[1], Path(c[c.index("--output_dir") + 1]).parts[-3:]) for c in commands] == [
        ("train.py", ("default", "seed0", "M1")), ("evaluate.py", ("default", "seed0", "eval")),
        ("train.py", ("default", "seed1", "M1")), ("evaluate.py", ("default", "seed1", "eval")),
        ("train.py", ("default", "seed2", "M1")), ("evaluate.py", ("default", "seed2", "eval")),
        ("evaluate.py", ("beta=0.3", "seed2", "eval"))]  # seeds 0 and 1 of beta=0.3 are evaluated: skipped
    jsonl.write_json_atomic(logged_run(tmp_path) / "eval" / "M0" / "result.json", result(287, 68))
    args = ablation.parse_args(["--run", str(logged_run(tmp_path)), "--out", str(tmp_path / "out"),
                                "--only", "beta=0.3,default"])
    lines = ablation.table(args).splitlines()
    assert "| M0 (no training) |  | 1 | 57.4 [53.0, 61.7] | 23.7 [19.1, 28.9] |" in lines
    assert "| default | (run.sh's) | 0 | n/a | n/a |" in lines
    assert "| beta=0.3 | --beta 0.3 | 2 | 87.0 ± 1.4 | 2.3 ± 0.0 |" in lines


def test_ablation_rejects_unknown_settings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dry_run(tmp_path, capsys, "--only", "w_step=3")


def run_sh_commands(tmp_path, **env) -> list[list[str]]:
    """The stage commands run.sh issues, from a copy of it whose PYTHON only logs its arguments (nothing runs; so
    one objective, since a second one copies the first one's iteration-1 samples, which a stub never writes)."""
    tmp_path.mkdir(exist_ok=True)
    shutil.copy(REPO / "run.sh", tmp_path / "run.sh")
    stub, log = tmp_path / "python", tmp_path / "log"
    # run.sh's own python -c calls (the token limit, the settings line) run for real; every stage is logged
    stub.write_text(f'#!/bin/bash\n[ "$1" = -c ] && PYTHONPATH={REPO} exec {sys.executable} "$@"\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    proc = subprocess.run(["bash", str(tmp_path / "run.sh")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(stub), "OBJECTIVES": "step-kto", **env})
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in log.read_text().splitlines()]


def options(cmd: list[str], drop=("--model", "--data", "--output_dir", "--seed", "--num_threads", "--benchmark")):
    return {k: v for k, v in zip(cmd[1::2], cmd[2::2]) if k not in drop}


def test_ablation_trains_and_evaluates_as_run_sh(tmp_path, capsys):
    """The ablation's train.py and evaluate.py are run.sh's own iteration-1 commands of the run (its commands.log),
    with the setting's changes: for the default tokenizer and the char one (their token limits differ)."""
    for tokenizer, limit in (("phrase", "96"), ("char", "160")):
        run = logged_run(tmp_path, SCRATCH_TOKENIZER=tokenizer)
        logged = [shlex.split(line) for line in (run / "commands.log").read_text().splitlines()]
        run_train = next(c[2:] for c in logged if c[2] == "train.py" and "step-kto" in c)
        run_eval = next(c[2:] for c in logged if c[2] == "evaluate.py" and "M1" in c[c.index("--model") + 1])
        ours = {c[1]: c[1:] for c in dry_run(tmp_path, capsys, "--only", "default", "--seeds", "1", run=run)}
        assert options(ours["train.py"]) == options(run_train) and options(ours["evaluate.py"]) == options(run_eval)
        assert ours["train.py"][ours["train.py"].index("--seed") + 1] == "1"
        assert run_eval[run_eval.index("--max_new_tokens") + 1] == limit


def test_run_sh_task_hard_has_its_own_runs_folder_and_longer_chains(tmp_path):
    default = run_sh_commands(tmp_path / "default", ITERATIONS="1")
    hard = run_sh_commands(tmp_path / "hard", ITERATIONS="1", TASK="hard")
    assert default[0][:4] == ["-m", "stepkto.arith_task", "--output_dir", "runs/seed0/data"]
    assert "--max_ops" not in default[0]
    assert hard[0][:4] == ["-m", "stepkto.arith_task", "--output_dir", "runs_hard/seed0/data"]
    assert hard[0][-4:] == ["--min_ops", "4", "--max_ops", "8"]
    assert all("runs/" not in " ".join(c) for c in hard) and hard[-1][:6] == ["-m", "stepkto.report", "--runs", "runs_hard",
                                                                               "--plot", "runs_hard/results.png"]
    assert {c[c.index("--max_new_tokens") + 1] for c in hard if "--max_new_tokens" in c} == {"128"}
    hard_char = run_sh_commands(tmp_path / "hard_char", ITERATIONS="1", TASK="hard", SCRATCH_TOKENIZER="char")
    assert {c[c.index("--max_new_tokens") + 1] for c in hard_char if "--max_new_tokens" in c} == {"200"}
    assert any(c[0] == "train.py" and c[c.index("--scratch_tokenizer") + 1] == "char" for c in hard_char)


def test_run_sh_max_problems_samples_from_the_first_problems_only(tmp_path):
    """MAX_PROBLEMS reaches generate.py at every iteration (README "Where step feedback pays": less feedback); by
    default every training problem is sampled from."""
    generate = lambda commands: [c for c in commands if c[0] == "generate.py"]
    default = generate(run_sh_commands(tmp_path / "default", ITERATIONS="2"))
    fewer = generate(run_sh_commands(tmp_path / "fewer", ITERATIONS="2", MAX_PROBLEMS="250"))
    assert len(default) == len(fewer) == 2
    assert [c[c.index("--max_problems") + 1] for c in default] == ["0", "0"]
    assert [c[c.index("--max_problems") + 1] for c in fewer] == ["250", "250"]


def write_eval(folder: Path, right: list[bool]) -> None:
    """An evaluation folder as evaluate.py writes it: result.json and one greedy label row per problem."""
    folder.mkdir(parents=True)
    result = {"model": "m", "benchmark": "b", "prm": "check", "n_problems": len(right), "pass@1": sum(right) / len(right),
              "pass@1_ci95": [0.0, 1.0], "stepwise_error_rate": 0.0, "stepwise_error_rate_ci95": [0.0, 1.0],
              "n_correct": sum(right), "n_correct_with_wrong_step": 0, "truncated": 0}
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "greedy_labels.jsonl").write_text("".join(json.dumps({"problem_id": f"p{i}", "outcome": r}) + "\n"
                                                        for i, r in enumerate(right)))


def test_paired_counts_the_problems_only_one_objective_solves(tmp_path):
    """bench/paired.py: Pass@1 differences per seed and iteration, the discordant problems at the last iteration
    both objectives reached, pooled over seeds, and an exact two-sided sign test on them."""
    write_eval(tmp_path / "seed0" / "eval" / "M0", [False] * 6)
    write_eval(tmp_path / "seed0" / "step-kto" / "eval" / "M1", [True] * 5 + [False])
    write_eval(tmp_path / "seed0" / "kto" / "eval" / "M1", [True] + [False] * 5)
    write_eval(tmp_path / "seed1" / "eval" / "M0", [False] * 6)
    write_eval(tmp_path / "seed1" / "step-kto" / "eval" / "M1", [False] * 6)
    write_eval(tmp_path / "seed1" / "kto" / "eval" / "M1", [False] * 5 + [True])
    write_eval(tmp_path / "seed1" / "kto" / "eval" / "M2", [True] * 6)  # Step-KTO has no M2: compared at M1
    write_eval(tmp_path / "seed2" / "eval" / "M0", [False] * 6)  # one objective only: not a pair
    write_eval(tmp_path / "seed2" / "step-kto" / "eval" / "M1", [True] * 6)
    result = paired.compare(tmp_path)
    assert result["seeds"] == 2 and result["last"] == 1 and result["only"] == [4, 1]
    assert [round(d, 1) for d in result["diffs"][1]] == [66.7, -16.7]
    assert result["p"] == pytest.approx(2 * (1 + 5) / 2**5)  # P(X <= 1 | n = 5), both tails
    assert paired.sign_test(3, 3) == 1.0 and paired.sign_test(0, 0) == 1.0
    assert "| 2 | +25.0 (+66.7, -16.7) | M1: 4 / 1 (p = 0.38) |" in paired.table({"x": result})
    with pytest.raises(jsonl.DataError, match="no seed"):
        paired.compare(tmp_path / "seed2")
    write_eval(tmp_path / "m0_only" / "seed0" / "eval" / "M0", [True] * 6)  # both objectives started, none evaluated
    for objective in ("step-kto", "kto"):
        (tmp_path / "m0_only" / "seed0" / objective).mkdir()
    with pytest.raises(jsonl.DataError, match="no iteration past M0"):
        paired.compare(tmp_path / "m0_only")
