"""Checkpoints that survive a kill: atomic writes, last.ckpt = newest state, best = validated
weights, and ckpt_path=last|auto falling back to the newest intact checkpoint."""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from efin.checkpoints import atomic_write, find_resume_checkpoint
from efin.train import resolve_ckpt_path, train
from tests.conftest import compose_config, with_values

TINY = ["data=tiny", "encoder=tiny", "stage.module.lm=null", "~logger", "~callbacks.progress_bar",
        "~callbacks.lr_monitor", "test_after_fit=false"]


class ValidatedWeights(Callback):
    """Keeps a copy of the weights at every validation end, by global step."""

    seen: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            ValidatedWeights.seen[trainer.global_step] = {
                k: v.detach().clone() for k, v in pl_module.state_dict().items()
            }


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data_dir):
    """Three epochs of 11 steps, a validation every 5 steps, mid-epoch saves every 4 steps."""
    root = tmp_path_factory.mktemp("ckpt_run")
    cfg = compose_config([*TINY, "trainer.max_epochs=3", "trainer.val_check_interval=5",
                          "callbacks.latest_checkpoint.every_n_train_steps=4"], root, shared_data_dir)
    ValidatedWeights.seen = {}
    with open_dict(cfg):
        cfg.callbacks.validated = {"_target_": f"{__name__}.ValidatedWeights"}
    train(cfg)
    return cfg, Path(cfg.paths.output_dir) / "checkpoints"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_last_is_the_newest_state_and_best_holds_validated_weights(run):
    cfg, ckpt_dir = run
    last = _load(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 3 * 11  # the final step, whatever the monitored metric did
    best = [p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    best_ckpt = _load(best[0])
    validated = ValidatedWeights.seen[best_ckpt["global_step"]]
    for key, value in best_ckpt["state_dict"].items():
        assert torch.equal(value, validated[key]), key
    assert not list(ckpt_dir.glob(".*"))  # no temp files left


def test_last_falls_back_to_the_newest_intact_checkpoint(run, caplog):
    cfg, ckpt_dir = run
    stage_dir = Path(cfg.paths.stage_dir)
    # an older, intact checkpoint of another run, and the newest ones broken in two ways
    other = stage_dir / "runs" / "older" / "checkpoints"
    other.mkdir(parents=True)
    intact = other / "last.ckpt"
    best = next(p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")  # a mid-run state
    intact.write_bytes(best.read_bytes())
    newer = stage_dir / "runs" / "newer" / "checkpoints"
    newer.mkdir(parents=True)
    (newer / "last.ckpt").write_bytes(b"")  # SIGKILL during a non-atomic write
    data = (ckpt_dir / "last.ckpt").read_bytes()
    (newer / "epoch02-step40.ckpt").write_bytes(data[: len(data) // 2])  # full disk: truncated
    stale = newer / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    for path in ckpt_dir.glob("*.ckpt"):  # the run's own checkpoints are older still
        os.utime(path, (old, old))
    now = time.time()
    os.utime(intact, (now - 60, now - 60))
    for path in newer.glob("*.ckpt"):
        os.utime(path, (now, now))

    with caplog.at_level(logging.INFO, logger="efin.checkpoints"):
        chosen = resolve_ckpt_path(with_values(cfg, ckpt_path="last"))
    assert chosen == str(intact)
    assert "skipped 2 newer checkpoint(s)" in caplog.text and "empty file" in caplog.text and "truncated" in caplog.text
    assert not stale.exists()
    assert find_resume_checkpoint(stage_dir, mode="auto") == str(intact)

    # and a resumed run from it works (the interrupted epoch continues)
    resumed = compose_config([*TINY, "trainer.max_epochs=3", "ckpt_path=last"], Path(cfg.paths.root_dir),
                             Path(cfg.paths.data_dir), run="resumed")
    train(resumed)
    assert _load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt")["global_step"] == 3 * 11


def test_auto_starts_fresh_without_checkpoints_and_last_fails_clearly(tmp_path):
    cfg = compose_config([*TINY, "ckpt_path=auto"], tmp_path)
    assert resolve_ckpt_path(cfg) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoints"):
        resolve_ckpt_path(with_values(cfg, ckpt_path="last"))
    broken = Path(cfg.paths.stage_dir) / "runs" / "x" / "checkpoints"
    broken.mkdir(parents=True)
    (broken / "last.ckpt").write_bytes(b"not a zip")
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        resolve_ckpt_path(with_values(cfg, ckpt_path="last"))
    assert resolve_ckpt_path(cfg) is None  # auto: warns and starts fresh


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda f: torch.save({"step": 1}, f))
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(Path(src).parent), real_replace(src, dst)))

    def disk_full(f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, disk_full)
    assert _load(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    atomic_write(target, lambda f: torch.save({"step": 2}, f))
    assert renamed == [tmp_path]  # the temp file lives in the destination directory: a rename, not a copy
    assert _load(target) == {"step": 2}
