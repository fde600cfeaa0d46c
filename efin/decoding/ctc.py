"""Greedy (best-path) CTC decoding."""

from __future__ import annotations

import torch


def ctc_greedy(log_probs: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks (id 0). (B, T', V) -> B id lists."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lens.tolist()):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != 0])
    return out
