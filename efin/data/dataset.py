"""Map-style dataset (load -> augment -> features per utterance) and its collate function.

The sampler decides which utterances form a batch; this module decides how each is loaded
and how a batch is padded. Feature extraction happens in ``__getitem__`` so it runs in the
DataLoader's worker processes, off the training loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from efin.data.audio import AudioError, LogMel, load_audio
from efin.data.augment import FeatureAugment, WaveAugment
from efin.data.manifest import Utterance

log = logging.getLogger(__name__)

# Neighbours tried in place of an utterance whose audio fails to load before giving up.
MAX_SUBSTITUTES = 10


class SpeechDataset(Dataset):
    """Utterances -> feature dicts.

    Args:
        utterances: validated manifest entries.
        featurizer: waveform -> (T, F) features (LogMel: 100 frames/s).
        wave_augment: applied to the waveform before features (training only), or None.
        feature_augment: applied to the features (training only), or None.

    ``__getitem__(i)`` -> ``{"id": str, "feats": (T, F) float32, "text": raw transcript,
    "duration": manifest seconds}``.

    Audio that no longer loads (validation decoded it at startup, so the file changed on disk
    since) is skipped with a warning and counted in :attr:`audio_errors` (per process), never a
    crash: the item is replaced by the next utterance that loads, marked ``"substitute":
    True``, and :func:`collate` drops substitutes from any batch that has other items.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        featurizer: LogMel,
        wave_augment: WaveAugment | None = None,
        feature_augment: FeatureAugment | None = None,
    ):
        self.utterances = list(utterances)
        self.featurizer = featurizer
        self.wave_augment = wave_augment
        self.feature_augment = feature_augment
        self.audio_errors = 0

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utterances]

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._load(index)
        except AudioError as err:
            self.audio_errors += 1
            log.warning("skipping utterance %s: %s (%d audio failures in this process)",
                        self.utterances[index].id, err, self.audio_errors)
        for k in range(1, min(MAX_SUBSTITUTES, len(self) - 1) + 1):
            try:
                return {**self._load((index + k) % len(self)), "substitute": True}
            except AudioError:
                self.audio_errors += 1
        raise AudioError(f"{self.utterances[index].audio_filepath} and its {MAX_SUBSTITUTES} neighbours fail to "
                         "load: the audio files changed since validation; check the storage and restart")

    def _load(self, index: int) -> dict[str, Any]:
        utt = self.utterances[index]
        wave = load_audio(utt.audio_filepath, offset=utt.offset, duration=utt.duration)
        with torch.no_grad():
            if self.wave_augment is not None:
                wave = self.wave_augment(wave)
            feats = self.featurizer(wave)
            if self.feature_augment is not None:
                feats = self.feature_augment(feats)
        return {"id": utt.id, "feats": feats, "text": utt.text, "duration": utt.duration}


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad a list of dataset items into a batch.

    Returns:
        ``{"ids": list[str], "feats": (B, T, F) float32 zero-padded after each utterance's end,
        "feat_lens": (B,) long valid frames, "texts": list[str] raw transcripts,
        "audio_errors": int}``. Tokenising is left to the stage, which owns the vocabulary.
        Substitutes for failed items (see :class:`SpeechDataset`) are dropped unless the batch
        has nothing else, so a failed file shrinks its batch instead of crashing the step.
    """
    if not items:
        raise ValueError("collate: empty batch")
    failed = sum(1 for it in items if it.get("substitute"))
    if failed < len(items):
        items = [it for it in items if not it.get("substitute")]
    lens = torch.tensor([it["feats"].shape[0] for it in items], dtype=torch.long)
    dim = items[0]["feats"].shape[1]
    feats = torch.zeros(len(items), int(lens.max()), dim, dtype=torch.float32)
    for i, it in enumerate(items):
        feats[i, : it["feats"].shape[0]] = it["feats"]
    return {"ids": [it["id"] for it in items], "feats": feats, "feat_lens": lens, "texts": [it["text"] for it in items],
            "audio_errors": failed}
