"""Experiment tracking: where train.py's and evaluate.py's scalar metrics go besides their own files
(TensorBoard, Weights & Biases, or nowhere), behind one Tracker whose callers never branch on --report_to."""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import secrets
import typing
from pathlib import Path

from stepkto import cli, jsonl

ReportTo = typing.Literal["none", "tensorboard", "wandb"]
REPORT_TO = typing.get_args(ReportTo)


class Tracker:
    """Where a stage's scalar metrics go, whatever the backend ("none": a Tracker that writes nothing)."""

    def __init__(self, write=None, close=None):
        self._write, self._close, self.closed = write, close, False

    def log(self, metrics: dict, step: int) -> None:
        """Log the plottable values of ``metrics`` at ``step``: finite reals, numpy scalars and 0-d tensors too; not a
        bool, which plotted as 1.0 would pass for a rate."""
        if self.closed:
            raise RuntimeError("log() on a closed tracker")
        scalars = {}
        for key, value in metrics.items():
            if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
                value = value.item()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                scalars[key] = float(value)
        if self._write is not None and scalars:
            self._write(scalars, int(step))

    def close(self) -> None:
        """Flush and close the backend; a second close does nothing."""
        if not self.closed and self._close is not None:
            self._close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tracker(report_to: str, log_dir: str | Path, run_name: str, config: dict, start_step: int = 0) -> Tracker:
    """A Tracker writing to ``log_dir`` with ``report_to``'s backend. tensorboard drops the events at steps >=
    start_step (the first step this run logs) a killed attempt wrote, so each step appears once."""
    if report_to not in REPORT_TO:
        raise ValueError(f"unknown report_to {report_to!r}: {' | '.join(REPORT_TO)}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if report_to == "none":
        return Tracker()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        # A restart marker, also at 0: a run restarted from scratch replaces the killed one's curve.
        writer = SummaryWriter(str(log_dir), purge_step=start_step)

        def write(scalars: dict, step: int) -> None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            writer.flush()  # a kill -9 must not lose what was already logged

        return Tracker(write, writer.close)
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "stepkto"), name=run_name, dir=str(log_dir),
                     config=safe_config(config), id=wandb_run_id(log_dir), resume="allow",
                     mode=os.environ.get("WANDB_MODE", "offline"))  # these machines often have no network
    return Tracker(lambda scalars, step: run.log(scalars, step=step), run.finish)


def safe_config(config: dict) -> dict:
    """``config`` with every URL in its strings redacted (cli.redact_urls' URLs end before a quote: within a string)."""
    return json.loads(cli.redact_urls(json.dumps(config)))


def check_tracker_backend(report_to: str) -> None:
    """Import --report_to's backend now, so that a missing one fails before the work it would log."""
    if report_to != "none":
        importlib.import_module({"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[report_to])


def wandb_run_id(log_dir: str | Path) -> str:
    """The wandb run id kept in log_dir/wandb_run_id.txt: a rerun after a crash continues the same wandb run."""
    path = Path(log_dir) / "wandb_run_id.txt"
    if not path.exists():
        jsonl.write_text_atomic(path, secrets.token_hex(4) + "\n")  # 8 characters of [a-z0-9], as wandb's own
    return path.read_text().strip()
