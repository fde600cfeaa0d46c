"""Duration-bucketed, DDP-aware, resumable batch sampler.

How an epoch's batches are made (identical on every rank, from ``seed`` and the epoch):

1. Utterances are sorted by duration and cut into ``num_buckets`` equal-count (quantile)
   buckets; a bucket whose longest utterance exceeds ``max_bucket_ratio`` x its shortest (the
   tails of the distribution) is halved until it does not. Each bucket holds utterances of
   similar length, so batches pad little.
2. Each bucket has a fixed batch size, ``floor(max_seconds / longest utterance in the
   bucket)`` (at least 1), so every batch's total duration is <= ``max_seconds``; an utterance
   longer than ``max_seconds`` is a batch of its own. A bucket of ``n`` utterances makes
   ``ceil(n / size)`` batches of near-equal size (no tiny remainder batch). Per epoch the utterances inside a bucket
   are shuffled (``seed`` + epoch), so batch *composition* changes every epoch while the
   *number* of batches does not. Lightning measures ``len(dataloader)`` once and ends the epoch
   on it, so a count that varied with the shuffle (greedy packing) would silently drop or cut
   batches.
3. Sharding over ``R`` ranks without losing or repeating an utterance: if the batch count is
   not a multiple of ``R``, the batches with the most utterances are split in two (a split
   batch only gets shorter, so the seconds bound holds) until it is. With ``drop_last=True``
   the ``count % R`` left-over batches (chosen at random per epoch) are dropped instead.
   Only when splitting is impossible (fewer utterances than needed, every batch a single
   utterance) are a few utterances repeated, with a warning: unequal batch counts would hang
   DDP.
4. Consecutive groups of ``R`` batches (neighbours in duration) form one *step*; the order of
   steps is shuffled and rank ``r`` takes batch ``r`` of every step. Ranks therefore work on
   similar lengths in the same step, so no rank waits on another's long batch.

Resuming: :meth:`state_dict` holds the epoch and the number of batches this rank has
*consumed by training*. The sampler cannot know that number itself (the DataLoader and
Lightning prefetch ahead of training), so :class:`efin.data.resume.SamplerResumeCallback`
reports it from the trainer's progress via :meth:`set_progress`; without the callback the
sampler falls back to the count it has yielded, which runs a few batches ahead (a resumed run
then skips those few batches rather than repeating any). After :meth:`load_state_dict`, every
iteration of that epoch starts after the consumed batches; other epochs start from 0.
``len()`` stays the full epoch length: Lightning restores its batch index to the consumed
count and stops the epoch at ``len()``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class DurationBucketSampler(Sampler[list[int]]):
    """Yields lists of dataset indices whose total duration is <= ``max_seconds``.

    Args:
        durations: seconds per dataset item (from the manifest).
        max_seconds: upper bound on the summed duration of a batch (s); sets memory use.
        num_buckets: quantile buckets by duration; more buckets pad less but mix less.
        shuffle: shuffle within buckets and the order of batches, per epoch. False gives a fixed
            order (shortest first), for validation and test.
        seed: base seed; the epoch's order depends on (seed, epoch) only, never on the rank.
        max_bucket_ratio: a quantile bucket whose longest utterance is more than this times its
            shortest is halved (recursively), so tails of the duration distribution get
            narrower buckets; lower pads less but creates more, smaller buckets.
        drop_last: drop the batches that do not divide evenly over ranks instead of splitting.
        num_replicas, rank: DDP world size and this rank; by default read from
            ``torch.distributed`` when it is initialised (at ``len()``/``iter()`` time), else 1, 0.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_seconds: float,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        max_bucket_ratio: float = 1.3,
    ):
        self.durations = np.asarray(durations, dtype=np.float64)
        if self.durations.ndim != 1 or len(self.durations) == 0:
            raise ValueError("DurationBucketSampler needs a non-empty 1-D list of durations")
        if not np.all(np.isfinite(self.durations)) or np.any(self.durations <= 0):
            raise ValueError("DurationBucketSampler: every duration must be a positive number of seconds")
        if max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if num_replicas is not None and (num_replicas < 1 or rank is None or not 0 <= rank < num_replicas):
            raise ValueError(f"invalid num_replicas={num_replicas}, rank={rank}")
        if max_bucket_ratio < 1:
            raise ValueError(f"max_bucket_ratio must be >= 1, got {max_bucket_ratio}")
        self.max_bucket_ratio = float(max_bucket_ratio)
        self.max_seconds = float(max_seconds)
        self.num_buckets = int(num_buckets)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

        order = np.argsort(self.durations, kind="stable")
        quantiles = [b for b in np.array_split(order, min(self.num_buckets, len(order))) if len(b)]
        self._buckets = [tight for b in quantiles for tight in self._tighten(b)]
        self._bucket_batch_size = []
        for bucket in self._buckets:
            longest = float(self.durations[bucket].max())
            size = max(1, int(math.floor(self.max_seconds / longest)))
            while size > 1 and size * longest > self.max_seconds:  # guard float rounding
                size -= 1
            self._bucket_batch_size.append(size)
        self._num_global_batches = sum(
            math.ceil(len(b) / s) for b, s in zip(self._buckets, self._bucket_batch_size)
        )

        self._cache: tuple[tuple[int, int], list[list[list[int]]]] | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from load_state_dict
        self._progress: tuple[int, int] | None = None  # (epoch, consumed) reported by the trainer
        self._yielded: tuple[int, int] | None = None  # (epoch, position after the last yield)
        self._loaded: dict | None = None  # the state last given to load_state_dict

    def _tighten(self, bucket: np.ndarray) -> list[np.ndarray]:
        """Halve a duration-sorted bucket until longest / shortest <= ``max_bucket_ratio``.

        Quantile buckets are narrow where most utterances are but wide in the tails (the top
        decile of a read-speech corpus may span 16-30 s); since a bucket's batch size is set by
        its longest utterance, a wide bucket both pads and under-fills its batches.
        """
        d = self.durations
        if len(bucket) < 2 or d[bucket[-1]] <= self.max_bucket_ratio * d[bucket[0]]:
            return [bucket]
        mid = len(bucket) // 2
        return self._tighten(bucket[:mid]) + self._tighten(bucket[mid:])

    # Lightning's `_set_sampler_epoch` calls `set_epoch` only on `loader.sampler` and on
    # `loader.batch_sampler.sampler`, never on `loader.batch_sampler` itself; exposing the
    # sampler as its own `.sampler` makes Lightning advance our epoch.
    @property
    def sampler(self) -> DurationBucketSampler:
        return self

    def _world(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return self.num_replicas, self.rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _steps(self, epoch: int, num_replicas: int) -> list[list[list[int]]]:
        """The epoch's steps: each a list of ``num_replicas`` batches (lists of indices)."""
        key = (epoch, num_replicas)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for bucket, size in zip(self._buckets, self._bucket_batch_size):
            items = rng.permutation(bucket) if self.shuffle else bucket
            # near-equal sizes (each <= size) rather than full batches and one small remainder
            batches.extend(part.tolist() for part in np.array_split(items, math.ceil(len(items) / size)))
        # `batches` runs from the shortest bucket to the longest.
        remainder = len(batches) % num_replicas
        if remainder and self.drop_last:
            drop = set(rng.choice(len(batches), remainder, replace=False).tolist()) if self.shuffle else set(
                range(len(batches) - remainder, len(batches))
            )
            batches = [b for i, b in enumerate(batches) if i not in drop]
        elif remainder:
            batches = self._even_out(batches, num_replicas)
        steps = [batches[i : i + num_replicas] for i in range(0, len(batches), num_replicas)]
        if self.shuffle:
            steps = [steps[i] for i in rng.permutation(len(steps))]
        self._cache = (key, steps)
        return steps

    def _even_out(self, batches: list[list[int]], num_replicas: int) -> list[list[int]]:
        """Make the batch count a multiple of ``num_replicas`` by splitting the largest batches."""
        batches = list(batches)
        while len(batches) % num_replicas:
            j = max(range(len(batches)), key=lambda k: len(batches[k]))  # first largest: deterministic
            if len(batches[j]) < 2:
                break
            b = batches[j]
            batches[j : j + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        need = -len(batches) % num_replicas
        if need:
            # Every batch is a single utterance and there are too few of them: repeat the
            # shortest utterances rather than give ranks unequal counts (that hangs DDP).
            order = np.argsort(self.durations, kind="stable")
            batches += [[int(order[k % len(order)])] for k in range(need)]
            log.warning(
                "DurationBucketSampler: %d utterances cannot fill %d ranks evenly within "
                "max_seconds=%.1f; repeating %d utterance(s) this epoch",
                len(self.durations), num_replicas, self.max_seconds, need,
            )
        return batches

    def __len__(self) -> int:
        """Batches per rank in one (full) epoch; the same for every epoch and every rank."""
        num_replicas, _ = self._world()
        if self.drop_last:
            return self._num_global_batches // num_replicas
        return math.ceil(self._num_global_batches / num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: epoch and resume position are read at the first next(), not at iter().
        num_replicas, rank = self._world()
        epoch = self.epoch
        steps = self._steps(epoch, num_replicas)
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = min(self._resume[1], len(steps))
        self._progress = None if self._progress is None or self._progress[0] != epoch else self._progress
        for position in range(start, len(steps)):
            self._yielded = (epoch, position + 1)
            yield steps[position][rank]

    # ----------------------------------------------------------------------------- resume

    def set_progress(self, epoch: int, batches_consumed: int) -> None:
        """Record how many batches of ``epoch`` training has consumed (called by the trainer side)."""
        self._progress = (int(epoch), int(batches_consumed))

    def state_dict(self) -> dict:
        if self._progress is not None:
            epoch, consumed = self._progress
        elif self._yielded is not None:
            epoch, consumed = self._yielded
        elif self._resume is not None and self._resume[0] == self.epoch:
            epoch, consumed = self._resume
        else:
            epoch, consumed = self.epoch, 0
        num_replicas, _ = self._world()
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            # the rest identifies the batch plan, to detect a changed dataset / world size
            "num_batches": len(self),
            "num_replicas": num_replicas,
            "num_utterances": len(self.durations),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position. Loading the same state again before iterating is a
        no-op: the datamodule restores it when it builds the loader and Lightning may restore
        the same state later (see efin.data.resume)."""
        if self._loaded is not None and dict(state) == self._loaded:
            return
        self._loaded = dict(state)
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        num_batches = len(self)
        plan = (state.get("num_batches"), state.get("num_replicas"), state.get("num_utterances"), state.get("seed"))
        now = (num_batches, self._world()[0], len(self.durations), self.seed)
        if plan != now:
            # Another dataset, world size or seed gives another batch plan: the exact position
            # cannot be restored; resume at the same fraction of the epoch.
            old_total = state.get("num_batches") or num_batches
            consumed = round(consumed * num_batches / max(1, old_total))
            log.warning(
                "DurationBucketSampler: checkpoint batch plan (batches, replicas, utterances, seed)=%s "
                "differs from the current %s; resuming epoch %d at batch %d of %d (approximate)",
                plan, now, epoch, consumed, num_batches,
            )
        if consumed >= num_batches:  # saved at the end of the epoch: the next one starts fresh
            epoch, consumed = epoch + 1, 0
        self.epoch = epoch
        self._resume = (epoch, consumed)
        self._progress = (epoch, consumed)
        self._yielded = None
