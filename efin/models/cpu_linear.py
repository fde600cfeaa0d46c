"""Faster linear layers for decoding on CPU: the same product, in the matmul form this CPU runs fastest.

Decoding runs the LLM on a few rows at a time: one token per step in greedy decoding, a handful
in speculative verification (draft tokens) or batched greedy decoding (one row per utterance).
On such skinny inputs PyTorch's CPU kernels differ by up to 2x between ``F.linear(x, W)``, ``x @
W.T`` with a contiguous transposed copy and ``(W @ x.T).T``, and which one wins depends on the
machine: on one 2-core machine a KV-cached SmolLM2-135M forward over 4 tokens cost 1.78x a
1-token ``nn.Linear`` forward and 1.07x with ``(W @ x.T).T``; on another, ``(W @ x.T).T`` made
every forward over 2-8 tokens 2.0x dearer than ``nn.Linear``'s (``python
scripts/bench_verify_width.py``, README Results). So :class:`CPULinear` times the three forms the
first time it meets a weight shape and a row count (rounded up to a power of two) and keeps the
fastest for the rest of the process, as cuDNN's benchmark mode does for convolutions.

:func:`use_cpu_linear` swaps every ``nn.Linear`` of a module for :class:`CPULinear` (same
parameters, same state dict). It is for inference with frozen weights: the transposed copy is
made once, at the swap, and costs one more copy of the layers' weights in memory (540 MB for
SmolLM2-135M in fp32); with gradients enabled or off the CPU the layer is a plain ``nn.Linear``.
Results equal ``F.linear``'s up to float rounding (the summation order differs), as one
``F.linear`` call already differs from another of another width.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: Above this many rows (a batched prompt prefill) ``F.linear`` is as fast or faster again: on
#: 2 cores, a 576 -> 1536 projection (SmolLM2's shape, random weights) took 68 ms with it against
#: 84 ms at 4,096 rows, and about the same at 1,024.
MAX_ROWS = 1024

#: The matmul forms of ``rows @ weight.T`` (rows (N, in), no bias) a layer chooses from.
KERNELS: dict[str, Callable[[CPULinear, torch.Tensor], torch.Tensor]] = {
    "linear": lambda layer, rows: F.linear(rows, layer.weight),
    "x_wt": lambda layer, rows: rows @ layer.weight_t,
    "w_xt": lambda layer, rows: (layer.weight @ rows.T).T,
}

#: (in_features, out_features, dtype, rows rounded up to a power of two) -> the fastest kernel's
#: name, timed once per process (:func:`fastest_kernel`).
_FASTEST: dict[tuple, str] = {}


def fastest_kernel(layer: CPULinear, rows: torch.Tensor, repeats: int = 3) -> str:
    """The name of the fastest of :data:`KERNELS` for ``layer``'s weight shape on ``rows``
    (N, in_features): each timed ``repeats`` times after one warm-up call (best time), once
    per weight shape and power-of-two row count; later calls return the stored choice."""
    key = (layer.in_features, layer.out_features, rows.dtype, 1 << (rows.shape[0] - 1).bit_length())
    if key not in _FASTEST:
        best = {}
        for name, kernel in KERNELS.items():
            kernel(layer, rows)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                kernel(layer, rows)
                times.append(time.perf_counter() - start)
            best[name] = min(times)
        _FASTEST[key] = min(best, key=best.get)
    return _FASTEST[key]


class CPULinear(nn.Linear):
    """``nn.Linear`` whose no-grad CPU forward uses the fastest matmul form
    (:func:`fastest_kernel`) for 1 to :data:`MAX_ROWS` rows.

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
        out = KERNELS[fastest_kernel(self, rows)](self, rows)
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
