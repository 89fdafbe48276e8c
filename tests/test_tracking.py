"""tracking.open_tracker, the experiment tracking train.py and evaluate.py share: tensorboard (read back with
TensorBoard's own loader, purge on resume), wandb offline (a run folder, one run id across reruns), none."""

import re
import time

import pytest


from stepkto import tracking


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard loads them (it applies the purge markers)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def scalar_tags(log_dir) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return sorted(acc.Tags()["scalars"])


def test_tensorboard_logs_only_finite_numbers(tmp_path):
    import numpy as np
    import torch

    metrics = {"train/loss": 0.25, "count": 3, "model": "M1", "ci95": [0.1, 0.2], "ser": None, "flag": True,
               "np_flag": np.bool_(True), "nan": float("nan"), "np": np.float32(0.5), "t": torch.tensor(1.5),
               "vector": torch.ones(2)}
    with tracking.open_tracker("tensorboard", tmp_path, "run", {}) as tracker:
        tracker.log(metrics, step=7)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert scalar_tags(tmp_path) == ["count", "np", "t", "train/loss"]
    assert scalars(tmp_path, "train/loss") == [(7, 0.25)] and scalars(tmp_path, "count") == [(7, 3.0)]
    assert scalars(tmp_path, "np") == [(7, 0.5)] and scalars(tmp_path, "t") == [(7, 1.5)]
    with pytest.raises(RuntimeError, match="closed"):
        tracker.log({"train/loss": 1.0}, step=8)


def log_steps(log_dir, steps, value_of, start_step: int) -> None:
    with tracking.open_tracker("tensorboard", log_dir, "run", {}, start_step=start_step) as tracker:
        for step in steps:
            tracker.log({"loss": value_of(step)}, step)


def test_tensorboard_resume_drops_the_killed_runs_later_steps(tmp_path):
    """Killed after logging step 4, resumed from the checkpoint of step 2: steps 3 and 4 once, the new values."""
    log_steps(tmp_path, [1, 2, 3, 4], lambda s: s, start_step=0)
    time.sleep(1.1)  # a resumed process starts seconds later: its event file sorts after the first one
    log_steps(tmp_path, [3, 4], lambda s: 10 * s, start_step=3)
    assert scalars(tmp_path, "loss") == [(1, 1), (2, 2), (3, 30), (4, 40)]


def test_tensorboard_restart_from_scratch_replaces_the_curve(tmp_path):
    log_steps(tmp_path, [0, 1, 2], lambda s: s, start_step=0)
    time.sleep(1.1)
    log_steps(tmp_path, [0, 1], lambda s: 5 + s, start_step=0)
    assert scalars(tmp_path, "loss") == [(0, 5), (1, 6)]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb's default mode here (offline), its config and caches kept inside the test's folder."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    return tmp_path / "tracking"


def test_wandb_offline_writes_a_run_and_reuses_its_id(wandb_env):
    log_dir = wandb_env
    with tracking.open_tracker("wandb", log_dir, "M1", {"lr": 1e-5}) as tracker:
        tracker.log({"eval/pass@1": 0.5, "model": "M1"}, step=1)
    run_id = (log_dir / "wandb_run_id.txt").read_text().strip()
    assert re.fullmatch(r"[a-z0-9]{8}", run_id)
    with tracking.open_tracker("wandb", log_dir, "M1", {"lr": 1e-5}) as tracker:  # a rerun after a crash
        tracker.log({"eval/pass@1": 0.6}, step=2)
    assert (log_dir / "wandb_run_id.txt").read_text().strip() == run_id
    runs = sorted((log_dir / "wandb").glob("offline-run-*"))
    # wandb names a run's folder offline-run-<time>-<id>, adding -1, -2 ... when a rerun starts within the same second
    assert runs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r.name) for r in runs)
    files = [r / f"run-{run_id}.wandb" for r in runs]
    assert all(f.exists() for f in files)
    assert any(b"eval/pass@1" in f.read_bytes() for f in files)  # the history record is in the run file


def test_none_writes_nothing(tmp_path):
    with tracking.open_tracker("none", tmp_path / "tracking", "run", {}) as tracker:
        tracker.log({"loss": 1.0}, step=0)
    assert not (tmp_path / "tracking").exists()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape("none | tensorboard | wandb")):
        tracking.open_tracker("mlflow", tmp_path, "run", {})
    with pytest.raises(ValueError, match="start_step"):
        tracking.open_tracker("tensorboard", tmp_path, "run", {}, start_step=-1)
    assert tracking.REPORT_TO == ("none", "tensorboard", "wandb")
    assert not list(tmp_path.iterdir())  # refused before anything is written
