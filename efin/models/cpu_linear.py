"""Faster linear layers for decoding on CPU: the same product, in the matmul form MKL runs fastest.

Decoding runs the LLM on a few rows at a time: one token per step in greedy decoding, a handful
in speculative verification (draft tokens) or batched greedy decoding (one row per utterance).
With PyTorch's CPU build (MKL), ``F.linear(x, W)`` on such skinny inputs is much slower than the
same product written as ``x @ W.T`` with a contiguous transposed copy (one row) or ``(W @ x.T).T``
(two or more rows). Measured on 2 cores with SmolLM2-135M (``python scripts/bench_verify_width.py``,
README Results, "Speculative decoding on chain c6"): a KV-cached forward over 4 tokens cost 1.78x
a 1-token ``nn.Linear`` forward, and 1.07x of that with this layer (whose 1-token forward took
0.93x), which is what makes verifying a draft cheap on CPU.

:func:`use_cpu_linear` swaps every ``nn.Linear`` of a module for :class:`CPULinear` (same
parameters, same state dict). It is for inference with frozen weights: the transposed copy is
made once, at the swap, and costs one more copy of the layers' weights in memory (540 MB for
SmolLM2-135M in fp32); with gradients enabled or off the CPU the layer is a plain ``nn.Linear``.
Results equal ``F.linear``'s up to float rounding (the summation order differs), as one
``F.linear`` call already differs from another of another width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Above this many rows (a batched prompt prefill) ``F.linear`` is as fast or faster again: on
#: 2 cores, a 576 -> 1536 projection (SmolLM2's shape, random weights) took 68 ms with it against
#: 84 ms at 4,096 rows, and about the same at 1,024.
MAX_ROWS = 1024


class CPULinear(nn.Linear):
    """``nn.Linear`` whose no-grad CPU forward uses the faster matmul form for 1 to
    :data:`MAX_ROWS` rows.

    Buffers: ``weight_t`` (in_features, out_features), a contiguous copy of ``weight.T``
    (not saved in the state dict).
    """

    weight_t: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CPULinear:
        """A CPULinear sharing ``linear``'s weight and bias (no copy but ``weight_t``)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        rows = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or torch.is_grad_enabled() or rows.shape[0] > MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = rows @ self.weight_t if rows.shape[0] == 1 else (self.weight @ rows.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_cpu_linear(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by a :class:`CPULinear` in place (tied
    weights stay tied: the parameters are shared, not copied). Returns how many were replaced."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, CPULinear.from_linear(child))
                swapped += 1
    return swapped


def for_decoding(model: nn.Module, device: str, cpu_linear: bool = True) -> nn.Module:
    """``model.to(device).eval()``; on CPU with ``cpu_linear``, the linear layers of its LLM
    (``model.llm``) become :class:`CPULinear`."""
    model = model.to(device).eval()
    if cpu_linear and torch.device(device).type == "cpu":
        use_cpu_linear(model.llm)
    return model
