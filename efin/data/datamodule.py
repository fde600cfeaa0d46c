"""LightningDataModule: manifests -> validated utterances -> bucketed, sharded DataLoaders.

DDP: the Trainer must run with ``use_distributed_sampler=False``. Every loader (train, val,
test) is sharded by :class:`~efin.data.sampler.DurationBucketSampler` itself, each rank seeing
a disjoint part with the same number of batches, so validation and test metrics are partial
per rank and the stage must sum its error counts across ranks (``sync_dist`` / all-reduce).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from efin.data.audio import FEATURIZERS, feature_stats
from efin.data.augment import FeatureAugment, WaveAugment
from efin.data.dataset import SpeechDataset, collate
from efin.data.manifest import Utterance, decode_check, load_manifest
from efin.data.resume import ResumableDataLoader
from efin.data.sampler import DurationBucketSampler

log = logging.getLogger(__name__)


def named_test_sets(test: str | os.PathLike | Mapping[str, str] | None) -> dict[str, str]:
    """``data.test`` as ``{name: manifest}``: a single path is the test set named "test"."""
    if test is None:
        return {}
    return {"test": test} if isinstance(test, (str, os.PathLike)) else dict(test)


class SpeechDataModule(L.LightningDataModule):
    """Speech recognition data from JSONL manifests.

    Args:
        train, dev: manifest paths.
        test: a manifest path (the test set named "test"), or ``{name: path}`` for several test
            sets, each decoded and scored on its own (``test/wer/<name>``); None when only fitting.
        max_batch_seconds: total audio seconds per training batch (per rank); sets memory use.
        num_buckets: duration buckets of the sampler; more pad less, mix less.
        num_workers: DataLoader worker processes per rank (0 loads in the main process).
        on_invalid: "error" stops on any bad manifest line, "skip" drops bad lines with a warning.
        max_duration: seconds; longer *training* utterances are skipped and counted (dev/test keep all).
            Dev and test keep every utterance so that scores stay comparable.
        wave_augment: waveform augmentation for training, or None.
        feature_augment: SpecAugment for training, or None.
        seed: sampler seed (batch composition and order per epoch).
        prepare: zero-argument callable run once per node in ``prepare_data`` (e.g. generate the
            synthetic corpus); None when the manifests already exist.
        val_max_batch_seconds: seconds per validation/test batch (no gradients, so it can be
            larger); None uses ``max_batch_seconds``.
        n_mels: log-mel bins (the encoder's input dimension).
        features: ``logmel`` (:class:`~efin.data.audio.LogMel`, efin's own encoders) or
            ``whisper`` (:class:`~efin.data.audio.WhisperLogMel`, pretrained Whisper encoders).
        check_audio: decode every audio file once while validating manifests (catches
            missing, corrupt and truncated files and wrong durations before training starts).
        audio_check_cache: directory caching those decode results by path + size + mtime (a
            rerun decodes nothing); None: decode at every start.
        drop_last: drop uneven training batches across ranks instead of splitting them.
        max_bucket_ratio: longest / shortest utterance allowed in one sampler bucket (wider
            quantile buckets are halved); lower pads less.
    """

    def __init__(
        self,
        train: str,
        dev: str,
        test: str | Mapping[str, str] | None = None,
        max_batch_seconds: float = 100.0,
        num_buckets: int = 10,
        num_workers: int = 2,
        on_invalid: str = "error",
        max_duration: float | None = 30.0,
        wave_augment: WaveAugment | None = None,
        feature_augment: FeatureAugment | None = None,
        seed: int = 0,
        prepare: Callable[[], Any] | None = None,
        val_max_batch_seconds: float | None = None,
        n_mels: int = 80,
        features: str = "logmel",
        check_audio: bool = True,
        drop_last: bool = False,
        max_bucket_ratio: float = 1.3,
        audio_check_cache: str | None = None,
    ):
        super().__init__()
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        tests = named_test_sets(test)
        if {"train", "dev"} & set(tests):
            raise ValueError(f"test set names must differ from 'train' and 'dev', got {sorted(tests)}")
        #: Names of the test sets, in the order of :meth:`test_dataloader`'s loaders.
        self.test_names: list[str] = list(tests)
        self.paths = {"train": train, "dev": dev, **tests}
        self.max_batch_seconds = float(max_batch_seconds)
        self.val_max_batch_seconds = float(val_max_batch_seconds or max_batch_seconds)
        self.num_buckets = int(num_buckets)
        self.num_workers = int(num_workers)
        self.on_invalid = on_invalid
        self.max_duration = max_duration
        self.wave_augment = wave_augment
        self.feature_augment = feature_augment
        self.seed = int(seed)
        self.prepare = prepare
        self.n_mels = int(n_mels)
        self.check_audio = bool(check_audio)
        self.audio_check_cache = audio_check_cache
        self.drop_last = bool(drop_last)
        self.max_bucket_ratio = float(max_bucket_ratio)
        if features not in FEATURIZERS:
            raise ValueError(f"data.features={features!r}: one of {sorted(FEATURIZERS)}")
        self.featurizer = FEATURIZERS[features](n_mels=self.n_mels)
        self._utterances: dict[str, list[Utterance]] = {}
        self._train_sampler: DurationBucketSampler | None = None
        self._train_sampler_state: dict | None = None  # from a checkpoint, for the next train sampler

    # ------------------------------------------------------------------ data preparation

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()
        if self.check_audio and self.audio_check_cache is not None:
            for path in self.paths.values():  # once per node; every rank's setup then reads the cache
                if path is not None:
                    decode_check(path, self.audio_check_cache)

    def setup(self, stage: str | None = None) -> None:
        """Load and validate the manifests this stage needs (each once; repeated calls are free)."""
        splits = {"fit": ["train", "dev"], "validate": ["dev"]}.get(stage or "", ["train", "dev"])
        if stage in (None, "test", "predict"):
            splits += self.test_names
        for split in splits:
            if self.paths.get(split) is not None:
                self._load(split)

    def _load(self, split: str) -> list[Utterance]:
        if split not in self._utterances:
            path = self.paths.get(split)
            if path is None:
                raise ValueError(f"SpeechDataModule: no {split} manifest configured (data.{split} is null)")
            utts = load_manifest(path, on_invalid=self.on_invalid, check_audio=self.check_audio,
                                 cache_dir=self.audio_check_cache)
            if split == "train" and self.max_duration is not None:
                # Too long to batch is not broken data: skip and count, whatever on_invalid says.
                kept = [u for u in utts if u.duration <= self.max_duration]
                if len(kept) < len(utts):
                    log.warning("train: skipping %d utterances longer than data.max_duration=%g s (%s)",
                                len(utts) - len(kept), self.max_duration, path)
                utts = kept
            self._utterances[split] = utts
            hours = sum(u.duration for u in utts) / 3600
            log.info("%s: %d utterances, %.2f h from %s", split, len(utts), hours, path)
        return self._utterances[split]

    @property
    def train_utterances(self) -> list[Utterance]:
        return self._load("train")

    @property
    def dev_utterances(self) -> list[Utterance]:
        return self._load("dev")

    @property
    def feature_dim(self) -> int:
        return self.n_mels

    def feature_stats(self, max_utterances: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (F,) and std (F,) of un-augmented training features, for the encoder's CMVN.

        Uses at most ``max_utterances`` evenly spaced training utterances (deterministic: the
        same manifest always gives the same statistics, whatever the seed).
        """
        utts = self.train_utterances
        k = min(len(utts), max_utterances)
        picks = np.unique(np.linspace(0, len(utts) - 1, k).round().astype(int))
        dataset = SpeechDataset([utts[i] for i in picks], self.featurizer)
        return feature_stats(dataset[i]["feats"] for i in range(len(dataset)))

    # ------------------------------------------------------------------ loaders

    def _sampler(self, utts: list[Utterance], max_seconds: float, shuffle: bool) -> DurationBucketSampler:
        return DurationBucketSampler(
            [u.duration for u in utts],
            max_seconds=max_seconds,
            num_buckets=self.num_buckets,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=self.drop_last and shuffle,
            max_bucket_ratio=self.max_bucket_ratio,
        )

    def _check_trainer(self) -> None:
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is not None and trainer.world_size > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "SpeechDataModule shards data with its own DurationBucketSampler: create the Trainer "
                "with use_distributed_sampler=False (trainer.use_distributed_sampler: false)"
            )

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "collate_fn": collate,
            "num_workers": self.num_workers,
            # Workers survive between epochs: re-forking them costs seconds per epoch.
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def train_dataloader(self) -> ResumableDataLoader:
        self._check_trainer()
        utts = self.train_utterances
        dataset = SpeechDataset(utts, self.featurizer, self.wave_augment, self.feature_augment)
        sampler = self._sampler(utts, self.max_batch_seconds, shuffle=True)
        if self._train_sampler_state is not None:
            sampler.load_state_dict(self._train_sampler_state)
        self._train_sampler = sampler
        return ResumableDataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    # ------------------------------------------------------------------ resume
    # Lightning restores a datamodule's state (``load_state_dict``) together with the model,
    # before the strategy calls ``configure_optimizers``. An LR schedule there reads
    # ``trainer.estimated_stepping_batches``, which builds the train loader at once, before the
    # fit loop's own state (holding the loader's position) is restored, and Lightning then
    # never passes that state to the loader. Keeping the sampler position here as well makes
    # the restore independent of what builds the train loader first.

    def state_dict(self) -> dict[str, Any]:
        if self._train_sampler is None:
            return {}
        return {"train_sampler": self._train_sampler.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_sampler")
        if state is None:
            return
        self._train_sampler_state = dict(state)
        if self._train_sampler is not None:  # the loader exists already (a strategy that restores late)
            self._train_sampler.load_state_dict(self._train_sampler_state)

    def _eval_loader(self, utts: list[Utterance]) -> DataLoader:
        self._check_trainer()
        dataset = SpeechDataset(utts, self.featurizer)  # never augmented
        sampler = self._sampler(utts, self.val_max_batch_seconds, shuffle=False)
        return DataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.dev_utterances)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test set, in the order of :attr:`test_names`."""
        if not self.test_names:
            raise ValueError("SpeechDataModule: no test manifest configured (data.test is null)")
        return [self._eval_loader(self._load(name)) for name in self.test_names]
