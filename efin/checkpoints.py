"""Checkpoints that survive a kill, and resuming from the newest one that loads.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file *in the destination
  directory*, fsyncs it, renames it over the target and fsyncs the directory. (Lightning's own
  writer stages the file in ``$TMPDIR`` and moves it, which is a copy, not a rename, when the
  outputs live on another file system: a kill or a full disk then leaves a truncated
  ``last.ckpt``.) A killed write leaves only a ``.<name>.*.tmp`` file, which
  :func:`find_resume_checkpoint` removes once it is old.
* :class:`LatestCheckpoint` keeps ``last.ckpt`` = the newest training state: every
  ``every_n_train_steps`` optimizer steps (mid-epoch too, whatever the validation schedule)
  and at every epoch end, whatever the monitored metric does.
* :class:`BestCheckpoint` is Lightning's ``ModelCheckpoint`` writing atomically; configured to
  save right after a validation (``conf/callbacks/default.yaml``), so its weights are the ones
  that were validated.
* :func:`find_resume_checkpoint` (``ckpt_path=last`` / ``auto``) checks candidate checkpoints
  (zip CRCs, loadable with ``weights_only=True``) newest first and says which broken ones it
  skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
# A temp file untouched this long belongs to a killed write, not to a live one (s).
STALE_TMP_SECONDS = 600.0


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one.

    ``write(f)`` fills a temporary file in ``path``'s directory (same file system, so the final
    ``os.replace`` is an atomic rename); it is fsynced before the rename and removed if
    anything fails, including a KeyboardInterrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves go through :func:`atomic_write` (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own path
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> None:
    """Make the trainer's strategy write checkpoints atomically (plain torch IO only: a custom
    or asynchronous CheckpointIO chosen by the user is left alone)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, written atomically (see the module docstring)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        use_atomic_checkpoint_io(trainer)
        super().setup(trainer, pl_module, stage)


class LatestCheckpoint(Checkpoint):
    """``<dirpath>/<filename>.ckpt``: always the newest training state.

    Args:
        dirpath: directory of the checkpoint (the run's ``checkpoints/``).
        filename: file name without ``.ckpt``.
        every_n_train_steps: also save every N optimizer steps, mid-epoch included (None or 0:
            at epoch ends only). Independent of validation and of any monitored metric.

    Lightning runs checkpoint callbacks after all others, so the sampler position reported by
    :class:`efin.data.resume.SamplerResumeCallback` is current when this one saves.
    """

    def __init__(self, dirpath: str, filename: str = "last", every_n_train_steps: int | None = None):
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 or null, got {every_n_train_steps}")
        self.dirpath = str(dirpath)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.last_step_saved = -1
        self._step_at_batch_start = -1

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"{self.filename}.ckpt"

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath, filename=self.filename)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        use_atomic_checkpoint_io(trainer)

    def _skip(self, trainer: pl.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING

    def save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes on rank 0
        self.last_step_saved = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped = step != self._step_at_batch_start  # not in the middle of gradient accumulation
        if (self.every_n_train_steps and stepped and step % self.every_n_train_steps == 0
                and step != self.last_step_saved and not self._skip(trainer)):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip(trainer):
            self.save(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "last_step_saved": self.last_step_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step_saved = int(state_dict.get("last_step_saved", -1))


# ----------------------------------------------------------------------------- resuming


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (empty, truncated, corrupt, not a training
    checkpoint), or None when it is intact. Reads the whole file once (zip CRCs) and unpickles
    it with ``weights_only=True`` memory-mapped, without loading the tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file (0 bytes)"
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            return f"corrupt data in {bad}"
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except zipfile.BadZipFile as err:
        return f"not a complete checkpoint ({err}; truncated?)"
    except Exception as err:  # torch raises many types for damaged files
        return (
            f"cannot be loaded ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        )
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        return "not a training checkpoint (no state_dict / loop state)"
    return None


def remove_stale_temp_files(directory: Path, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove temp files of killed checkpoint writes (``.*.ckpt.*.tmp``) under ``directory``."""
    removed = []
    now = time.time()
    for tmp in directory.glob("runs/*/checkpoints/.*.ckpt.*" + TMP_SUFFIX):
        with contextlib.suppress(OSError):  # another rank or process got there first
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed.append(tmp)
    if removed:
        log.info("Removed %d temp file(s) of interrupted checkpoint writes under %s", len(removed), directory)
    return removed


def find_resume_checkpoint(stage_dir: str | os.PathLike, mode: str = "last") -> str | None:
    """The newest intact checkpoint among this stage's runs (``runs/*/checkpoints/*.ckpt``).

    Args:
        stage_dir: the stage directory (``paths.stage_dir``).
        mode: "last": there must be one (FileNotFoundError otherwise); "auto": None when there
            is nothing intact to resume (a fresh start).

    Checkpoints are tried newest first (by modification time); broken ones are skipped and
    named in a warning.
    """
    stage_dir = Path(stage_dir)
    remove_stale_temp_files(stage_dir)
    candidates = sorted(stage_dir.glob("runs/*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    broken: list[str] = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if broken:
                log.warning("ckpt_path=%s: skipped %d newer checkpoint(s) that do not load:\n  %s\nResuming from %s "
                            "(the newest intact one)", mode, len(broken), "\n  ".join(broken), path)
            else:
                log.info("Resuming from %s", path)
            return str(path)
        broken.append(f"{path}: {problem}")
    where = f"{stage_dir}/runs/*/checkpoints/"
    if mode == "auto":
        if broken:
            log.warning(
                "ckpt_path=auto: no intact checkpoint under %s (broken: %s); starting fresh", where, "; ".join(broken)
            )
        else:
            log.info("ckpt_path=auto: nothing to resume under %s; starting fresh", where)
        return None
    if broken:
        raise FileNotFoundError(
            f"ckpt_path=last: no intact checkpoint under {where}; every one fails to load:\n  "
            + "\n  ".join(broken) + "\nStart the stage without ckpt_path, or pass ckpt_path=PATH/TO/file.ckpt."
        )
    raise FileNotFoundError(
        f"ckpt_path=last: no checkpoints/last.ckpt under {stage_dir}/runs/. "
        "Start the stage without ckpt_path, or pass ckpt_path=PATH/TO/file.ckpt."
    )
