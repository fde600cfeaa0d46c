"""Two-process CPU DDP (gloo) through the real command line: slow tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest

from efin.artifacts import load_artifact
from tests.conftest import TRANSCRIPTS_LM

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_trains_and_exports(tmp_path, shared_data_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EFIN_ROOT": str(tmp_path), "EFIN_DATA_DIR": str(shared_data_dir)}
    cmd = [
        sys.executable, "-m", "efin.train", "data=tiny", "encoder=tiny", "logger=csv", "name=ddp",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
        "trainer.max_epochs=1", TRANSCRIPTS_LM,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    artifact = load_artifact(tmp_path / "outputs/ddp/encoder/artifact", expected_stage="encoder")
    assert artifact["encoder"]["config"]["d_model"] == 32
    # Rank 0 wrote the transcripts of every test utterance exactly once (the sampler shards
    # batches across the two ranks; the stage gathers them), and its CER is what they give.
    run = next((tmp_path / "outputs/ddp/encoder/runs").iterdir())
    rows = [json.loads(line) for line in (run / "decode/test.hyps.jsonl").open()]
    manifest = shared_data_dir / "synthetic-tiny" / "test.jsonl"
    assert sorted(r["id"] for r in rows) == sorted(json.loads(line)["id"] for line in manifest.open())
    metrics = json.loads((run / "decode/test.metrics.json").read_text())
    assert metrics["cer"] == pytest.approx(jiwer.cer([r["ref"] for r in rows], [r["hyp"] for r in rows]))
