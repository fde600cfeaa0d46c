"""Projectors: map encoder frames to the LLM's embedding space, k frames to one "audio token".

Both variants take ``forward(x (B, T, D), lens (B,)) -> (y (B, ceil(T/k), H), lens (B,))``.
Frames past each item's length are zeroed first, so an utterance gives the same audio tokens
alone or in a padded batch (batched and single-utterance decoding agree).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _mask_padding(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero frames ``t >= lens[b]``; x (B, T, D)."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
    return x * valid.unsqueeze(-1).to(x.dtype)


def _check_input(x: torch.Tensor, input_dim: int) -> None:
    if x.ndim != 3 or x.shape[-1] != input_dim:
        raise ValueError(f"projector expects (B, T, {input_dim}) encoder frames, got {tuple(x.shape)}")


class StackingMLPProjector(nn.Module):
    """Concatenate ``stack`` consecutive frames, then Linear -> GELU -> Linear.

    Args:
        input_dim: encoder width D (``encoder.output_dim``).
        output_dim: LLM embedding width H (``llm.config.hidden_size``).
        stack: frames per audio token k; the LLM sees ``encoder_frame_rate / k`` tokens per second.
        hidden_dim: width of the hidden layer.
    """

    def __init__(self, input_dim: int, output_dim: int, stack: int = 2, hidden_dim: int = 1024):
        super().__init__()
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        self.input_dim, self.output_dim, self.stack = input_dim, output_dim, stack
        self.net = nn.Sequential(
            nn.Linear(input_dim * stack, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim)
        )

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) encoder frames, lens (B,) valid frames -> (B, ceil(T/k), H), lens ceil(lens/k)."""
        _check_input(x, self.input_dim)
        b, t, d = x.shape
        k = self.stack
        x = _mask_padding(x, lens)
        x = F.pad(x, (0, 0, 0, (-t) % k))  # zero tail so T is a multiple of k
        y = self.net(x.reshape(b, -1, k * d))
        return y, torch.div(lens + k - 1, k, rounding_mode="floor")

    def audio_tokens_per_second(self, encoder_frame_rate: float) -> float:
        """Audio tokens per second of speech for an encoder emitting ``encoder_frame_rate`` frames/s."""
        return encoder_frame_rate / self.stack


class ConvProjector(nn.Module):
    """Strided Conv1d (stride k) -> GELU -> Linear.

    Args:
        input_dim: encoder width D.
        output_dim: LLM embedding width H.
        stride: frames per audio token k.
        kernel_size: frames each audio token sees (>= stride; larger overlaps neighbours).
        hidden_dim: conv channels.
    """

    def __init__(
        self, input_dim: int, output_dim: int, stride: int = 2, kernel_size: int | None = None, hidden_dim: int = 1024
    ):
        super().__init__()
        kernel_size = stride if kernel_size is None else kernel_size
        if stride < 1 or kernel_size < stride:
            raise ValueError(f"need stride >= 1 and kernel_size >= stride, got {stride=} {kernel_size=}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.stride, self.kernel_size = stride, kernel_size
        self.conv = nn.Conv1d(input_dim, hidden_dim, kernel_size, stride=stride)
        self.out = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), lens (B,) -> (B, ceil(T/k), H), lens ceil(lens/k)."""
        _check_input(x, self.input_dim)
        t = x.shape[1]
        k = self.stride
        n_out = -(-t // k)
        left = (self.kernel_size - k) // 2  # centre the receptive field on its k frames
        right = (n_out - 1) * k + self.kernel_size - t - left
        x = F.pad(_mask_padding(x, lens).transpose(1, 2), (left, right))
        y = self.out(F.gelu(self.conv(x)).transpose(1, 2))
        return y, torch.div(lens + k - 1, k, rounding_mode="floor")

    def audio_tokens_per_second(self, encoder_frame_rate: float) -> float:
        """Audio tokens per second of speech for an encoder emitting ``encoder_frame_rate`` frames/s."""
        return encoder_frame_rate / self.stride
