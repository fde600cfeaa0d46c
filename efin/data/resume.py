"""Mid-epoch resume for the training data: each utterance seen once per epoch across restarts.

The sampler position is restored from two places, whichever comes first:

* :class:`~efin.data.datamodule.SpeechDataModule` saves it in its own checkpoint entry and
  applies it to every train sampler it builds. Lightning restores a datamodule before the
  strategy calls ``configure_optimizers``, so this works even when an LR schedule reads
  ``trainer.estimated_stepping_batches`` there, which builds the train loader *before* the fit
  loop's state is restored (Lightning then never hands the loader its saved state).
* the loader's own state in the fit loop, below (the only one in checkpoints written before
  the datamodule kept the position; :class:`SamplerResumeCallback` forwards it).

* :class:`ResumableDataLoader` is a DataLoader with ``state_dict``/``load_state_dict``
  (delegating to its :class:`~efin.data.sampler.DurationBucketSampler`). Lightning stores the
  state of such "stateful" train loaders in the checkpoint (``loops.fit_loop.state_dict.
  combined_loader``) and, on resume, calls ``load_state_dict`` right after creating the train
  loader and *before* its first ``iter()``. (``FitLoop.setup_data`` calls ``iter()`` before any
  callback hook and before ``set_epoch``; with worker processes the sampler is drawn from at
  that moment, so restoring from a callback hook would be too late.)
* :class:`SamplerResumeCallback` makes that state exact. The sampler itself only knows how
  many batches it has *handed out*, which runs ahead of training by the DataLoader's prefetch
  (``num_workers * prefetch_factor``). After every training batch the callback reports the
  trainer's own count, ``fit_loop.epoch_loop.batch_progress.current.processed``, to the
  sampler. That is the number Lightning restores as its batch index on resume (a checkpoint
  written in ``on_train_batch_end`` of batch ``i`` counts ``i + 1``), and the epoch ends when
  that index reaches ``len(dataloader)``, which the sampler keeps at the full epoch length.

Lightning calls checkpoint callbacks (ModelCheckpoint) after all other callbacks, so the count
is up to date when a step-based checkpoint is written.

The callback also saves the random number generators (torch, CUDA, numpy, python) with each
checkpoint and restores them right before the first resumed training step, so the model's own
random draws (dropout) are the uninterrupted run's. Data augmentation draws are not restored:
worker processes seed themselves when the loader is iterated, and in-process loading fetches
the next batch ahead of the step; augmented batches after a resume differ from the
uninterrupted run's (the utterances in them do not).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position (epoch, batches consumed) lives in its batch sampler.

    Lightning recognises any loader with ``state_dict``/``load_state_dict`` as resumable and
    saves/restores it with the fit loop. The batch sampler must provide both methods.
    """

    def state_dict(self) -> dict[str, Any]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)


def _train_samplers(trainer: L.Trainer) -> Iterator[Any]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    for loader in loaders:
        sampler = getattr(loader, "batch_sampler", None)
        if sampler is not None and hasattr(sampler, "set_progress"):
            yield sampler


class SamplerResumeCallback(L.Callback):
    """Keeps the train batch sampler's resume position equal to the trainer's progress.

    Add it to the Trainer's callbacks whenever the train loader is a
    :class:`ResumableDataLoader`; its own checkpoint entry records the position too, for
    inspection (the sampler's copy inside the fit-loop state is the one that is restored).
    """

    def __init__(self) -> None:
        self.position: dict[str, int] = {"epoch": 0, "batches_consumed": 0}
        self._rng_to_restore: dict | None = None

    def _report(self, trainer: L.Trainer) -> None:
        epoch = trainer.current_epoch
        consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        self.position = {"epoch": int(epoch), "batches_consumed": int(consumed)}
        for sampler in _train_samplers(trainer):
            sampler.set_progress(epoch, consumed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning already calls set_epoch (through `batch_sampler.sampler`); repeat it here so
        # the order does not depend on that detail of Lightning's internals.
        for sampler in _train_samplers(trainer):
            sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._report(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint from before the datamodule kept the sampler position: hand the datamodule
        # the loader state of the fit loop, so it is restored whatever builds the loader first.
        datamodule = trainer.datamodule
        if datamodule is None or type(datamodule).__qualname__ in checkpoint or not hasattr(datamodule, "load_state_dict"):
            return
        states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
        if len(states) == 1 and states[0]:
            datamodule.load_state_dict({"train_sampler": states[0]})

    def state_dict(self) -> dict[str, Any]:
        return {**self.position, "rng": _get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._rng_to_restore = state.pop("rng", None)
        self.position = state


# Random generator states as tensors, lists and numbers only, so checkpoints stay loadable
# with torch.load(weights_only=True).
def _get_rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    try:
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # another device count, an old layout
        log.warning("resume: random generator states not restored (%s); random draws differ from the interrupted run", err)
