"""Exact mid-epoch resume through `python -m efin.train`'s code path, with the real LR schedule.

A run is killed (an exception in a callback, after the step's batch ran, before any checkpoint
of that step) at a step that is no multiple of the checkpoint interval nor of the epoch length,
resumed with ``ckpt_path=last``, and compared with an uninterrupted run: the utterance ids of
every step and the final weights must be identical.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from efin.artifacts import load_artifact
from efin.train import train
from tests.conftest import compose_config

QUIET = ["~logger", "~callbacks.progress_bar", "~callbacks.lr_monitor", "test_after_fit=false"]
TINY = ["data=tiny", "encoder=tiny", *QUIET]
ENCODER = [*TINY, "stage.module.lm=null"]


class Killed(RuntimeError):
    """Stands in for SIGKILL: nothing after the raising hook runs."""


class StepRecorder(Callback):
    """Appends ``[global_step, epoch, ids]`` of every training batch to a JSONL file; raises
    :class:`Killed` after the batch of ``kill_at_step``, before the checkpoint callbacks run."""

    def __init__(self, path: str, kill_at_step: int | None = None):
        self.path = path
        self.kill_at_step = kill_at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step, trainer.current_epoch, batch["ids"]]) + "\n")
        if trainer.global_step == self.kill_at_step:
            raise Killed(f"killed after step {trainer.global_step}")


def _run(root: Path, data_dir: Path, overrides: list[str], run: str, kill_at_step: int | None = None) -> list:
    cfg = compose_config(overrides, root, data_dir, run=run)
    root.mkdir(parents=True, exist_ok=True)
    record = root / f"{run}.steps.jsonl"
    with open_dict(cfg):
        cfg.callbacks.recorder = {
            "_target_": f"{__name__}.StepRecorder",
            "path": str(record),
            "kill_at_step": kill_at_step,
        }
    if kill_at_step is None:
        train(cfg)
    else:
        with pytest.raises(Killed):
            train(cfg)
    return [json.loads(line) for line in open(record)]


def _last_state(root: Path, stage_dir: str, run: str) -> dict:
    ckpt = torch.load(
        Path(stage_dir) / "runs" / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    return ckpt


def _assert_exact_resume(root: Path, data_dir: Path, overrides: list[str], every: int, kill: int) -> None:
    overrides = [*overrides, f"callbacks.latest_checkpoint.every_n_train_steps={every}"]
    stage_dir = compose_config(overrides, root / "ref", data_dir).paths.stage_dir
    reference = _run(root / "ref", data_dir, overrides, "ref")
    killed = _run(root / "resumed", data_dir, overrides, "a", kill_at_step=kill)
    resumed = _run(root / "resumed", data_dir, [*overrides, "ckpt_path=last"], "b")

    saved = (kill // every) * every  # the newest checkpoint before the kill
    assert killed[-1][0] == kill and resumed[0][0] == saved + 1
    # the killed run up to its checkpoint, then the resumed run: every step's batch as uninterrupted
    assert killed[:saved] + resumed == reference
    ref = _last_state(root / "ref", stage_dir, "ref")
    res = _last_state(root / "resumed", compose_config(overrides, root / "resumed", data_dir).paths.stage_dir, "b")
    assert ref["global_step"] == res["global_step"] == reference[-1][0]
    assert ref["state_dict"].keys() == res["state_dict"].keys()
    for key, value in ref["state_dict"].items():
        assert torch.equal(value, res["state_dict"][key]), key
    assert ref["lr_schedulers"] == res["lr_schedulers"]
    assert stage_dir  # (kept for the error message of a failing comparison)


def test_encoder_stage_resumes_mid_epoch_exactly(tmp_path, shared_data_dir):
    # data=tiny: 11 batches per epoch; checkpoints every 5 steps (and at the epoch end, 11);
    # killed at step 18, resumed from step 15 (epoch 1, its 4th batch).
    _assert_exact_resume(tmp_path, shared_data_dir, [*ENCODER, "trainer.max_epochs=2"], every=5, kill=18)


@pytest.fixture(scope="module")
def projector_artifact(tmp_path_factory, shared_data_dir) -> Path:
    root = tmp_path_factory.mktemp("resume_chain")
    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]
    train(compose_config([*ENCODER, *short], root, shared_data_dir))
    cfg = compose_config(["stage=projector", "llm=tiny", "projector=tiny", *TINY, *short], root, shared_data_dir)
    train(cfg)
    return Path(cfg.paths.stage_dir) / "artifact"


def test_llm_stage_resumes_mid_epoch_exactly(tmp_path, shared_data_dir, projector_artifact):
    # One epoch (stage llm's default): checkpoints every 4 steps must happen inside it.
    overrides = ["stage=llm", "llm=tiny", "projector=tiny", *TINY, "trainer.limit_train_batches=9",
                 "+trainer.limit_val_batches=1", f"init_from={projector_artifact}"]
    _assert_exact_resume(tmp_path, shared_data_dir, overrides, every=4, kill=7)


def test_resume_onto_another_dataset_warns(tmp_path, shared_data_dir, caplog):
    overrides = [*ENCODER, "trainer.max_epochs=1", "callbacks.latest_checkpoint.every_n_train_steps=5"]
    _run(tmp_path, shared_data_dir, overrides, "a", kill_at_step=7)
    fewer = [*overrides, "ckpt_path=last", "trainer.max_steps=8", "data.max_batch_seconds=10"]
    with caplog.at_level(logging.WARNING, logger="efin.data.sampler"):
        _run(tmp_path, shared_data_dir, fewer, "b")
    assert "batch plan" in caplog.text and "differs" in caplog.text


def test_artifact_records_the_resolved_run_it_came_from(projector_artifact):
    artifact = load_artifact(projector_artifact)
    origin = artifact["provenance"]
    encoder_dir = (projector_artifact.parent.parent / "encoder" / "artifact").resolve()
    # the projector started from the encoder artifact through the moving `encoder/artifact` link;
    # what it records is the resolved directory of that run
    assert origin["init_from"] == str(encoder_dir)
    assert origin["init_provenance"]["run_dir"] == str(encoder_dir.parent)
    assert origin["run_dir"] == str(projector_artifact.resolve().parent)
    assert len(origin["config_sha256"]) == 64 and "git_commit" in origin
    config = (projector_artifact / "config.yaml").read_text()
    assert f"init_from: {encoder_dir}" in config
