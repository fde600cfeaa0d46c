"""CTC head and model: encoder frames -> per-frame log-probabilities over the CTC vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from efin.models.encoder import Encoder


class CTCModel(nn.Module):
    """Encoder plus a linear CTC head. Blank is id 0."""

    def __init__(self, encoder: Encoder, vocab_size: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.output_dim, vocab_size)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) log-mel -> ((B, T', V) log-probabilities, (B,) lengths)."""
        hidden, lens = self.encoder(feats, feat_lens)
        return self.head(hidden).log_softmax(-1), lens

    def loss(self, log_probs, lens, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss per target token (sum over the batch / number of target tokens)."""
        target_lens = torch.tensor([len(t) for t in targets], dtype=torch.long)
        flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
        loss = F.ctc_loss(
            log_probs.transpose(0, 1).float(), flat, lens.cpu(), target_lens,
            blank=0, reduction="sum", zero_infinity=True,
        )
        return loss / target_lens.sum().clamp_min(1)

