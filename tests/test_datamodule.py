"""Dataset, collate and SpeechDataModule on real audio files, and a real Lightning mid-epoch resume."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from efin.data.audio import LogMel
from efin.data.augment import FeatureAugment, WaveAugment
from efin.data.datamodule import SpeechDataModule
from efin.data.dataset import SpeechDataset, collate
from efin.data.manifest import Utterance, write_manifest
from efin.data.resume import ResumableDataLoader, SamplerResumeCallback

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def make_split(root: Path, split: str, n: int, seed: int) -> Path:
    """Write ``n`` short noisy tones (0.4-2.5 s, 16 or 8 kHz FLAC) and their manifest."""
    rng = np.random.default_rng(seed)
    utts = []
    for i in range(n):
        rate = 16000 if i % 4 else 8000
        seconds = round(float(rng.uniform(0.4, 2.5)), 2)
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * math.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.shape)
        path = root / "audio" / split / f"{split}{i:03d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, wave.astype(np.float32), rate)
        text = " ".join(rng.choice(WORDS, size=3))
        utts.append(Utterance(id=f"{split}{i:03d}", audio_filepath=str(path), duration=seconds, text=text))
    manifest = root / f"{split}.jsonl"
    write_manifest(manifest, utts)
    return manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    return {
        split: str(make_split(root, split, n, seed))
        for split, n, seed in [("train", 40, 0), ("dev", 9, 1), ("test", 7, 2)]
    }


def datamodule(corpus, **kw) -> SpeechDataModule:
    args = dict(max_batch_seconds=6.0, num_buckets=4, num_workers=0, on_invalid="error", max_duration=20.0, seed=3)
    args.update(kw)
    return SpeechDataModule(corpus["train"], corpus["dev"], corpus["test"], **args)


def test_dataset_item_and_collate_padding(corpus):
    dm = datamodule(corpus)
    ds = SpeechDataset(dm.train_utterances, LogMel())
    items = [ds[i] for i in range(3)]
    for it, utt in zip(items, dm.train_utterances[:3]):
        assert it["id"] == utt.id and it["text"] == utt.text and it["duration"] == utt.duration
        assert it["feats"].shape[1] == 80 and abs(it["feats"].shape[0] - utt.duration * 100) <= 1
    batch = collate(items)
    lens = [it["feats"].shape[0] for it in items]
    assert batch["feats"].shape == (3, max(lens), 80) and batch["feats"].dtype == torch.float32
    assert batch["feat_lens"].tolist() == lens and batch["feat_lens"].dtype == torch.long
    assert batch["ids"] == [it["id"] for it in items] and batch["texts"] == [it["text"] for it in items]
    for i, n in enumerate(lens):
        assert torch.equal(batch["feats"][i, :n], items[i]["feats"])
        assert torch.all(batch["feats"][i, n:] == 0)


def test_datamodule_loaders(corpus):
    dm = datamodule(corpus, wave_augment=WaveAugment(), feature_augment=FeatureAugment())
    dm.prepare_data()
    dm.setup("fit")
    first = dm.train_utterances
    dm.setup("fit")
    assert dm.train_utterances is first and len(first) == 40  # loaded once
    assert all(Path(u.audio_filepath).is_absolute() for u in first)

    train = dm.train_dataloader()
    assert isinstance(train, ResumableDataLoader)
    ids = [i for b in train for i in b["ids"]]
    assert sorted(ids) == sorted(u.id for u in first)
    for b in train:
        assert sum(dm.train_utterances[[u.id for u in first].index(i)].duration for i in b["ids"]) <= 6.0 + 1e-9

    val = dm.val_dataloader()
    a, b = list(val), list(val)
    assert [x["ids"] for x in a] == [x["ids"] for x in b]  # not shuffled
    assert all(torch.equal(x["feats"], y["feats"]) for x, y in zip(a, b))  # not augmented
    assert sorted(i for x in a for i in x["ids"]) == sorted(u.id for u in dm.dev_utterances)
    (test,) = dm.test_dataloader()
    assert dm.test_names == ["test"] and len(test) >= 1

    mean, std = dm.feature_stats(max_utterances=10)
    mean2, std2 = datamodule(corpus).feature_stats(max_utterances=10)
    assert mean.shape == std.shape == (80,)
    assert torch.equal(mean, mean2) and torch.equal(std, std2) and torch.all(std > 0)


def test_datamodule_worker_processes(corpus):
    dm = datamodule(corpus, num_workers=2)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    ids = [i for b in loader for i in b["ids"]]
    assert sorted(ids) == sorted(u.id for u in dm.train_utterances)


def test_several_named_test_sets(corpus):
    dm = SpeechDataModule(corpus["train"], corpus["dev"], {"test": corpus["test"], "again": corpus["dev"]},
                          max_batch_seconds=6.0)
    dm.setup("test")
    assert dm.test_names == ["test", "again"]
    first, second = dm.test_dataloader()
    assert sorted(i for b in second for i in b["ids"]) == sorted(u.id for u in dm.dev_utterances)
    with pytest.raises(ValueError, match="must differ"):
        SpeechDataModule(corpus["train"], corpus["dev"], {"dev": corpus["dev"]})


def test_missing_test_manifest_is_a_clear_error(corpus):
    dm = SpeechDataModule(corpus["train"], corpus["dev"], None, max_batch_seconds=6.0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="no test manifest"):
        dm.test_dataloader()


# ------------------------------------------------------------------ real Lightning resume


class Recorder(L.LightningModule):
    """Tiny model that records which utterances each training step saw."""

    def __init__(self, seen: list):
        super().__init__()
        self.lin = nn.Linear(80, 1)
        self.seen = seen

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, tuple(batch["ids"])))
        pooled = batch["feats"].sum(1) / batch["feat_lens"][:, None]
        return self.lin(pooled).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(corpus, ckpt_dir, max_steps=-1, ckpt_path=None, num_workers=0) -> list:
    seen: list = []
    trainer = L.Trainer(
        max_epochs=3,
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[
            ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1),
            SamplerResumeCallback(),
        ],
    )
    trainer.fit(Recorder(seen), datamodule=datamodule(corpus, num_workers=num_workers), ckpt_path=ckpt_path)
    return seen


def by_epoch(seen) -> dict[int, list[tuple[str, ...]]]:
    out = defaultdict(list)
    for epoch, _, ids in seen:
        out[epoch].append(ids)
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_mid_epoch_resume_sees_each_utterance_once(corpus, tmp_path, num_workers):
    reference = by_epoch(fit(corpus, tmp_path / "ref", num_workers=num_workers))
    per_epoch = len(reference[0])
    all_ids = sorted(u.id for u in datamodule(corpus).train_utterances)
    for epoch in range(3):
        assert sorted(i for b in reference[epoch] for i in b) == all_ids
    assert reference[0] != reference[1]  # a new order every epoch

    # Interrupted in epoch 1 (after 3 of its batches), resumed from the checkpoint at the end of
    # its 2nd batch: the batch after the checkpoint is seen again, nothing is skipped or repeated
    # within the epoch, and the batch order is the uninterrupted run's.
    ckpt_step = per_epoch + 2
    first = fit(corpus, tmp_path / "a", max_steps=per_epoch + 3, num_workers=num_workers)
    second = fit(corpus, tmp_path / "b", ckpt_path=tmp_path / "a" / f"step={ckpt_step}.ckpt", num_workers=num_workers)
    kept = first[:ckpt_step]  # what the checkpoint contains
    assert [s[1] for s in second[:1]] == [2]  # Lightning resumes its batch index too
    combined = by_epoch(kept + second)
    assert combined == reference

    # A checkpoint written at the last batch of an epoch resumes at the next epoch's start.
    third = fit(corpus, tmp_path / "c", ckpt_path=tmp_path / "a" / f"step={per_epoch}.ckpt", num_workers=num_workers)
    assert by_epoch(first[:per_epoch] + third) == reference


class FileRecorder(Recorder):
    """Recorder for forked DDP ranks: appends each step to a per-rank file."""

    def __init__(self, out_dir: str):
        super().__init__([])
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        with open(Path(self.out_dir) / f"rank{self.global_rank}.txt", "a") as f:
            f.write(f"{self.current_epoch} {batch_idx} {' '.join(batch['ids'])}\n")
        return super().training_step(batch, batch_idx)


def fit_ddp(corpus, run_dir: Path, max_steps=-1, ckpt_path=None) -> dict[int, list[tuple[int, int, tuple]]]:
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        max_epochs=2,
        max_steps=max_steps,
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[
            ModelCheckpoint(dirpath=run_dir / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1),
            SamplerResumeCallback(),
        ],
    )
    trainer.fit(FileRecorder(str(run_dir)), datamodule=datamodule(corpus), ckpt_path=ckpt_path)
    out = {}
    for rank in range(2):
        lines = (run_dir / f"rank{rank}.txt").read_text().splitlines()
        out[rank] = [(int(e), int(b), tuple(ids.split())) for e, b, ids in (ln.split(" ", 2) for ln in lines)]
    return out


@pytest.mark.slow
def test_lightning_ddp_mid_epoch_resume(corpus, tmp_path):
    """Two forked CPU ranks: disjoint shards, equal counts, exact resume per rank."""
    reference = fit_ddp(corpus, tmp_path / "ref")
    all_ids = sorted(u.id for u in datamodule(corpus).train_utterances)
    per_epoch = len([s for s in reference[0] if s[0] == 0])
    assert per_epoch == len([s for s in reference[1] if s[0] == 0])
    for epoch in range(2):
        seen = [i for r in range(2) for e, _, ids in reference[r] if e == epoch for i in ids]
        assert sorted(seen) == all_ids

    ckpt_step = per_epoch + 1
    first = fit_ddp(corpus, tmp_path / "a", max_steps=per_epoch + 2)
    second = fit_ddp(corpus, tmp_path / "b", ckpt_path=tmp_path / "a" / "ckpt" / f"step={ckpt_step}.ckpt")
    for rank in range(2):
        assert by_epoch(first[rank][:ckpt_step] + second[rank]) == by_epoch(reference[rank])
