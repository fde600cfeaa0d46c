"""Whether two modules hold the same weights: what lets a draft and its target share work."""

from __future__ import annotations

import torch
from torch import nn


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` are the same module or have equal state dicts (same keys, equal
    tensors; ``b``'s compared on ``a``'s device)."""
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)
