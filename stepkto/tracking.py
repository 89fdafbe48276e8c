"""Experiment tracking: where train.py's and evaluate.py's scalar metrics go besides their own files
(TensorBoard, Weights & Biases, or nowhere), behind one Tracker whose callers never branch on --report_to."""

from __future__ import annotations

import importlib
import math
import numbers
import os
import string
import typing
from pathlib import Path

from stepkto import cli, jsonl

ReportTo = typing.Literal["none", "tensorboard", "wandb"]
REPORT_TO = typing.get_args(ReportTo)


class Tracker:
    """Where a stage's scalar metrics go, whatever the backend: train.py and evaluate.py call ``log`` and
    ``close`` and never branch on --report_to ("none" is a Tracker that does nothing and writes nothing)."""

    def __init__(self, write=None, close=None):
        self._write, self._close, self.closed = write, close, False

    def log(self, metrics: dict, step: int) -> None:
        """Log the finite int/float values of ``metrics`` at ``step``; the rest is skipped (see scalar_metrics)."""
        if self.closed:
            raise RuntimeError("log() on a closed tracker")
        scalars = scalar_metrics(metrics)
        if self._write is not None and scalars:
            self._write(scalars, int(step))

    def close(self) -> None:
        """Flush and close the backend; a second close (a `finally` after an explicit one) does nothing."""
        if not self.closed and self._close is not None:
            self._close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The plottable values: finite ints and floats (numpy scalars and 0-d tensors too, so that a loss logged
    without .item() is not lost). result.json also holds strings, lists (confidence intervals) and None (no
    correct solution), which no backend plots; a bool is skipped because True plotted as 1.0 would pass for a rate."""
    scalars = {}
    for key, value in metrics.items():
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            scalars[key] = float(value)
    return scalars


def open_tracker(report_to: str, log_dir: str | Path, run_name: str, config: dict, start_step: int = 0) -> Tracker:
    """A Tracker writing to ``log_dir`` with the backend ``report_to`` (one of REPORT_TO).

    ``start_step`` is the first step this run will log: tensorboard drops the events at steps >= start_step
    that an earlier attempt wrote (killed after logging up to step T, resumed from a checkpoint before T), so
    each step appears once. Pass the first step logged, not the last one done: a checkpoint's own step, logged
    by the killed run and not again by the resumed one, must survive. wandb cannot (its history is append-only,
    and it ignores a step below its last one). The backends are imported here, so that only runs that ask for
    one need it installed. ``config`` is recorded with the credentials of its URLs redacted (safe_config).
    """
    if report_to not in REPORT_TO:
        raise ValueError(f"unknown report_to {report_to!r}: {' | '.join(REPORT_TO)}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if report_to == "none":
        return Tracker()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if report_to == "tensorboard":
        return _tensorboard_tracker(log_dir, start_step)
    return _wandb_tracker(log_dir, run_name, safe_config(config))


def safe_config(config: dict) -> dict:
    """``config`` (a stage's asdict(args)) as a tracker may record it: every URL in its strings without its user,
    password or secret query values (cli.redact_urls), in nested dicts and lists too."""
    def safe(value):
        if isinstance(value, str):
            return cli.redact_urls(value)
        if isinstance(value, dict):
            return {k: safe(v) for k, v in value.items()}
        return [safe(v) for v in value] if isinstance(value, (list, tuple)) else value

    return safe(config)


def check_tracker_backend(report_to: str) -> None:
    """Import --report_to's backend now, so that a missing one fails before the work it would log."""
    if report_to != "none":
        importlib.import_module({"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[report_to])


def _tensorboard_tracker(log_dir: Path, start_step: int) -> Tracker:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step writes a restart marker: TensorBoard then ignores the earlier files' events at steps >=
    # start_step. Also at 0: a run restarted from scratch replaces, rather than doubles, the killed one's curve.
    writer = SummaryWriter(str(log_dir), purge_step=start_step)

    def write(scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
        writer.flush()  # a kill -9 must not lose what was already logged

    return Tracker(write, writer.close)


def _wandb_tracker(log_dir: Path, run_name: str, config: dict) -> Tracker:
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "stepkto"), name=run_name, dir=str(log_dir), config=config,
        # offline by default: the machines this runs on often have no network (`wandb sync` uploads later)
        mode=os.environ.get("WANDB_MODE", "offline"), id=wandb_run_id(log_dir), resume="allow",
    )
    return Tracker(lambda scalars, step: run.log(scalars, step=step), run.finish)


def wandb_run_id(log_dir: str | Path) -> str:
    """The wandb run id of ``log_dir``, created once and kept in log_dir/wandb_run_id.txt: a rerun after a
    crash continues the same wandb run instead of opening a second one."""
    path = Path(log_dir) / "wandb_run_id.txt"
    if not path.exists():
        import secrets

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's own form
        jsonl.write_text_atomic(path, run_id + "\n")  # never a half-written id
    return path.read_text().strip()
