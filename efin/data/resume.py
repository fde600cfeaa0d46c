"""Mid-epoch resume for the training data: each utterance seen once per epoch across restarts.

Two pieces, because Lightning 2.6 offers exactly one moment at which the sampler position can
be restored before the first batch is drawn:

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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader


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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._report(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer)

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position = dict(state_dict)
