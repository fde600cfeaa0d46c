"""DurationBucketSampler invariants: seconds bound, sharding, determinism, resume."""

from __future__ import annotations

import logging
from itertools import chain

import numpy as np
import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from efin.data.sampler import DurationBucketSampler


def durations(n: int = 257, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.8, 9.0, size=n).round(2).tolist()


def epoch_batches(durs, replicas: int, epoch: int = 0, **kw) -> list[list[list[int]]]:
    """Per-rank batch lists for one epoch."""
    out = []
    for rank in range(replicas):
        s = DurationBucketSampler(durs, num_replicas=replicas, rank=rank, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


def test_batches_respect_max_seconds_and_long_utterances_stand_alone():
    durs = durations() + [25.0, 31.0]  # longer than max_seconds
    s = DurationBucketSampler(durs, max_seconds=20.0, num_buckets=6, seed=1)
    batches = list(s)
    for b in batches:
        assert len(b) >= 1
        total = sum(durs[i] for i in b)
        assert total <= 20.0 or len(b) == 1
    assert [len(durs) - 2] in batches and [len(durs) - 1] in batches
    assert len(batches) == len(s)


@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("n", [257, 40, 7])
def test_every_utterance_once_across_ranks_with_equal_counts(replicas, n):
    durs = durations(n)
    for epoch in range(3):
        per_rank = epoch_batches(durs, replicas, epoch=epoch, max_seconds=20.0, num_buckets=5, seed=7)
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1, f"unequal batch counts {counts}"
        s = DurationBucketSampler(durs, 20.0, num_buckets=5, seed=7, num_replicas=replicas, rank=0)
        assert counts == {len(s)}
        seen = sorted(chain.from_iterable(chain.from_iterable(per_rank)))
        assert seen == list(range(n)), "lost or repeated utterances"
        for batches in per_rank:
            assert all(sum(durs[i] for i in b) <= 20.0 for b in batches)


def test_drop_last_drops_only_the_uneven_tail():
    durs = durations(101)
    full = DurationBucketSampler(durs, 20.0, num_buckets=5, seed=3)
    per_rank = epoch_batches(durs, 3, max_seconds=20.0, num_buckets=5, seed=3, drop_last=True)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(full) // 3
    seen = list(chain.from_iterable(chain.from_iterable(per_rank)))
    assert len(seen) == len(set(seen))  # nothing repeated
    assert sum(len(b) for b in full) - len(seen) <= 3 * max(len(b) for b in full)


def test_too_few_utterances_for_ranks_repeats_with_warning(caplog):
    durs = [15.0, 16.0, 17.0]  # each > max_seconds / 2: no batch can be split
    with caplog.at_level(logging.WARNING):
        per_rank = epoch_batches(durs, 2, max_seconds=20.0, num_buckets=2)
    assert [len(b) for b in per_rank] == [2, 2]
    seen = sorted(chain.from_iterable(chain.from_iterable(per_rank)))
    assert set(seen) == {0, 1, 2} and len(seen) == 4
    assert "repeating 1 utterance" in caplog.text


def test_deterministic_per_seed_and_epoch_different_across_epochs():
    durs = durations()

    def run(seed, epoch):
        s = DurationBucketSampler(durs, 20.0, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    assert len(run(0, 0)) == len(run(0, 1)) == len(run(5, 9))  # constant length per epoch
    # within-bucket shuffling changes which utterances share a batch, not just the order
    first = {frozenset(b) for b in run(0, 0)}
    second = {frozenset(b) for b in run(0, 1)}
    assert first != second


def test_unshuffled_is_fixed_and_sorted_by_duration():
    durs = durations(60)
    s = DurationBucketSampler(durs, 20.0, num_buckets=4, shuffle=False)
    a = list(s)
    s.set_epoch(3)
    assert list(s) == a
    maxima = [max(durs[i] for i in b) for b in a]
    assert maxima == sorted(maxima)


def test_ranks_in_one_step_get_similar_lengths():
    durs = durations(400)
    per_rank = epoch_batches(durs, 2, max_seconds=30.0, num_buckets=10, seed=2)
    spread = [abs(max(durs[i] for i in a) - max(durs[i] for i in b)) for a, b in zip(*per_rank)]
    assert np.median(spread) < 1.0  # neighbours in duration, not random pairs (~2.7 s apart)


def test_bucketing_pads_little():
    durs = durations(1000)
    batches = list(DurationBucketSampler(durs, 60.0, num_buckets=10, seed=0))
    padded = sum(len(b) * max(durs[i] for i in b) for b in batches)
    assert 1 - sum(durs) / padded < 0.10


def test_wide_tail_buckets_are_narrowed():
    rng = np.random.default_rng(1)
    durs = np.concatenate([rng.normal(14.5, 1.0, 900), rng.uniform(1.0, 30.0, 100)]).clip(1.0, 30.0).tolist()
    for batch in DurationBucketSampler(durs, 120.0, num_buckets=10, max_bucket_ratio=1.3):
        lengths = [durs[i] for i in batch]
        assert max(lengths) <= 1.3 * min(lengths)


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("consumed", [0, 1, 5])
def test_resume_skips_consumed_batches(replicas, consumed):
    durs = durations(120)
    kw = dict(max_seconds=15.0, num_buckets=5, seed=11)
    epoch = 2
    full = epoch_batches(durs, replicas, epoch=epoch, **kw)
    for rank in range(replicas):
        first = DurationBucketSampler(durs, num_replicas=replicas, rank=rank, **kw)
        first.set_epoch(epoch)
        it = iter(first)
        taken = [next(it) for _ in range(consumed + 2)]  # the loader prefetched 2 more
        first.set_progress(epoch, consumed)  # what training actually consumed
        state = first.state_dict()
        assert state["epoch"] == epoch and state["batches_consumed"] == consumed

        resumed = DurationBucketSampler(durs, num_replicas=replicas, rank=rank, **kw)
        resumed.load_state_dict(state)
        assert resumed.epoch == epoch and len(resumed) == len(first)
        rest = list(resumed)
        assert taken[:consumed] + rest == full[rank]
        assert list(resumed) == rest  # a second iter() of the resumed epoch skips the same
        resumed.set_epoch(epoch + 1)
        assert len(list(resumed)) == len(first)  # later epochs start from the beginning


def test_resume_from_end_of_epoch_starts_next_epoch():
    durs = durations(50)
    s = DurationBucketSampler(durs, 15.0, seed=0)
    s.set_progress(4, len(s))
    resumed = DurationBucketSampler(durs, 15.0, seed=0)
    resumed.load_state_dict(s.state_dict())
    assert resumed.epoch == 5
    nxt = DurationBucketSampler(durs, 15.0, seed=0)
    nxt.set_epoch(5)
    assert list(resumed) == list(nxt)


def test_state_without_progress_uses_yielded_count():
    s = DurationBucketSampler(durations(50), 15.0)
    it = iter(s)
    next(it), next(it), next(it)
    assert s.state_dict()["batches_consumed"] == 3


def test_changed_world_size_resumes_approximately(caplog):
    durs = durations(200)
    one = DurationBucketSampler(durs, 15.0, num_replicas=1, rank=0)
    one.set_progress(0, len(one) // 2)
    two = DurationBucketSampler(durs, 15.0, num_replicas=2, rank=1)
    with caplog.at_level(logging.WARNING):
        two.load_state_dict(one.state_dict())
    assert "approximate" in caplog.text
    assert abs(len(list(two)) - len(two) / 2) <= 1


def test_lightning_sets_the_epoch_through_the_dataloader():
    s = DurationBucketSampler(durations(30), 15.0)
    loader = DataLoader(list(range(30)), batch_sampler=s)
    _set_sampler_epoch(loader, 7)  # what Lightning's fit loop calls each epoch
    assert s.epoch == 7


def test_invalid_arguments():
    with pytest.raises(ValueError):
        DurationBucketSampler([], 10.0)
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0, 0.0], 10.0)
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0], 0.0)
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0], 10.0, num_replicas=2, rank=2)


def _ddp_worker(rank: int, world: int, port: int, durs: list[float], out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s = DurationBucketSampler(durs, 15.0, num_buckets=4, seed=5)  # world read from torch.distributed
        s.set_epoch(1)
        out.put((rank, len(s), list(s)))
    finally:
        dist.destroy_process_group()


def test_shards_from_torch_distributed_process_group():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    durs = durations(61)
    ctx = mp.get_context("fork")  # spawn would re-import torch in each child (~15 s here)
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, durs, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    (r0, len0, b0), (r1, len1, b1) = results
    assert len0 == len1 == len(b0) == len(b1)
    assert sorted(chain.from_iterable(b0 + b1)) == list(range(61))
    assert [b0, b1] == epoch_batches(durs, 2, epoch=1, max_seconds=15.0, num_buckets=4, seed=5)
