"""Two-process CPU DDP (gloo) through the real command line: slow tier."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_and_exports(tmp_path, shared_data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EFIN_ROOT": str(tmp_path), "EFIN_DATA_DIR": str(shared_data_dir)}
    cmd = [
        sys.executable, "-m", "efin.train", "data=tiny", "encoder=tiny", "logger=csv", "name=ddp",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "trainer.max_epochs=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "outputs/ddp/encoder/artifact/artifact.json").exists()
    assert "test/cer/test" in proc.stdout + proc.stderr
