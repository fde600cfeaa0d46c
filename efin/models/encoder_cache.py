"""In-memory cache of a frozen encoder's output, per utterance.

A frozen encoder (stage projector, stage llm with ``train_encoder: false``) gives the same
output for an utterance at every epoch as long as its features do not change (no
augmentation). The cache keeps each utterance's valid frames on the CPU and re-pads them per
batch, so the encoder runs once per utterance instead of once per utterance per epoch.

A hit equals re-running the encoder on the utterance in any batch up to float rounding: the
encoder's output does not depend on its batch-mates' padding (:meth:`efin.models.encoder.Encoder.forward`).
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


def encoder_fingerprint(encoder: nn.Module, features: dict) -> str:
    """sha256 (hex) of the encoder's weights and buffers and the feature config: entries made
    under another encoder or featurizer are never reused."""
    h = hashlib.sha256(json.dumps(features, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class EncoderCache:
    """Utterance key -> (T'_i, D) encoder output of its valid frames, on the CPU.

    Args:
        fingerprint: :func:`encoder_fingerprint` of the encoder this cache serves.
    """

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint
        self.entries: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.entries.values())

    def check(self, fingerprint: str) -> None:
        """Drop every entry when the encoder or features changed (a different fingerprint)."""
        if fingerprint != self.fingerprint:
            self.entries.clear()
            self.fingerprint = fingerprint

    @torch.no_grad()
    def encode(self, encoder: nn.Module, feats: torch.Tensor, feat_lens: torch.Tensor,
               keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output for a batch: hidden (B, T', D), lens (B,), as ``encoder(feats, feat_lens)``.

        With any key missing the encoder runs on the whole batch (exactly what an uncached step
        computes) and the missing rows are stored; with all keys cached the rows are re-padded
        with zeros (the projectors mask frames past ``lens``) and ``feats`` is not read.
        """
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            hidden, lens = encoder(feats, feat_lens)
            for i in missing:
                self.entries[keys[i]] = hidden[i, : int(lens[i])].detach().to("cpu", copy=True)
            return hidden, lens
        rows = [self.entries[k] for k in keys]
        lens = torch.tensor([r.shape[0] for r in rows], dtype=torch.long, device=feat_lens.device)
        # Batches are padded to their longest utterance, so the encoder's width is max(lens).
        hidden = rows[0].new_zeros(len(rows), int(lens.max()), rows[0].shape[1])
        for i, r in enumerate(rows):
            hidden[i, : r.shape[0]] = r
        return hidden.to(feats.device, non_blocking=True), lens
