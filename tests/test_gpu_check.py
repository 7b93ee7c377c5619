"""samples/gpu_check.sh on a machine without a GPU: one clear line, exit 1, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "samples" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run for real")
def test_without_a_gpu_the_check_says_so_and_runs_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("GPU_CHECK_DRY_RUN", None)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "work")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("gpu_check: no CUDA GPU visible to torch (torch "), done.stderr
    assert "run this on a machine with a GPU" in done.stderr
    assert list((tmp_path / "work").iterdir()) == []  # no compress ran
