"""bench/gpu_check.sh, the one script a lent GPU runs, in its CPU mode (SMOKE=1: toy sizes, gloo): every stage
runs, the killed-and-resumed training ends with the uninterrupted run's losses, and the MFU table is printed.
A broken script would otherwise be found only on the GPU, whose minutes are few."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_on_cpu(tmp_path):
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-5000:]
    assert "the killed job ended with status" in log  # the first training run was killed, not finished
    assert re.search(r"resuming from \S+ after step [1-9]", log)
    assert "max difference 0.0" in log, log[-3000:]  # resumed == uninterrupted, exactly (same machine)
    result = json.loads((tmp_path / "result_M1.json").read_text())
    assert result["n_problems"] == 16 and 0 <= result["pass@1"] <= 1
    assert re.search(r"\| step-kto \| \d+ \| [\d.]+ \| [\d.]+% \|", log)
    assert "== done" in log
