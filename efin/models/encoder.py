"""Speech encoder: global CMVN -> convolutional 4x subsampling -> Conformer blocks.

Input is log-mel at 100 frames/s; output runs at 25 frames/s (40 ms per frame), the rate the
CTC head and the projector see.
"""

from __future__ import annotations

import torch
from torch import nn
from torchaudio.models import Conformer
from torchaudio.models.conformer import ConformerLayer


class GlobalCMVN(nn.Module):
    """Global mean/variance normalisation with statistics computed on the training data.

    The statistics are buffers, so they travel with the encoder's weights in every artifact.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-5))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std


class Conv2dSubsampling(nn.Module):
    """Two stride-2 3x3 convolutions over (time, frequency): 4x fewer frames.

    (B, T, F) -> (B, T', D) with T' = ((T - 1) // 2 - 1) // 2.
    """

    def __init__(self, input_dim: int, d_model: int, channels: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(),
        )
        freq = ((input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, d_model)

    @staticmethod
    def output_lengths(lens: torch.Tensor) -> torch.Tensor:
        return ((lens - 1) // 2 - 1) // 2

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(feats.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return x, self.output_lengths(lens).clamp(min=1, max=t)


class Encoder(nn.Module):
    """Conformer speech encoder.

    Args:
        input_dim: feature bins per frame (80 log-mel).
        d_model: width of the Conformer blocks and of the output.
        num_layers, num_heads, ffn_dim, conv_kernel: Conformer block shape.
        dropout: dropout inside the blocks.
        subsampling_channels: channels of the two subsampling convolutions (their backward pass
            is a large share of CPU step time for small encoders).
    """

    subsampling = 4  # input frames per output frame

    def __init__(
        self,
        input_dim: int = 80,
        d_model: int = 144,
        num_layers: int = 6,
        num_heads: int = 4,
        ffn_dim: int = 576,
        conv_kernel: int = 15,
        dropout: float = 0.1,
        subsampling_channels: int = 64,
    ):
        super().__init__()
        # Constructor arguments, stored in artifacts so a later stage can rebuild this encoder.
        self.config = dict(
            input_dim=input_dim, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
            ffn_dim=ffn_dim, conv_kernel=conv_kernel, dropout=dropout, subsampling_channels=subsampling_channels,
        )
        self.input_dim = input_dim
        self.output_dim = d_model
        self.cmvn = GlobalCMVN(input_dim)
        self.subsample = Conv2dSubsampling(input_dim, d_model, subsampling_channels)
        self.dropout = nn.Dropout(dropout)
        self.conformer = Conformer(
            input_dim=d_model,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            depthwise_conv_kernel_size=conv_kernel,
            dropout=dropout,
        )

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.cmvn.set_stats(mean, std)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) log-mel at 100 frames/s -> ((B, T', D) at 25 frames/s, (B,) valid lengths).

        An utterance's valid frames do not depend on its batch-mates' padding (up to float
        rounding): attention masks padded keys and the convolution modules see padded frames as
        zeros (torchaudio's own Conformer.forward lets padding leak into the last
        ``conv_kernel // 2`` frames; these weights are torchaudio's, only the forward differs).
        """
        x, lens = self.subsample(self.cmvn(feats), feat_lens)
        padding = torch.arange(x.shape[1], device=x.device)[None, :] >= lens[:, None]  # (B, T') True = pad
        x = self.dropout(x).transpose(0, 1)  # (T', B, D): torchaudio's layer layout
        for layer in self.conformer.conformer_layers:
            x = conformer_layer(layer, x, padding)
        return x.transpose(0, 1), lens


def conformer_layer(layer: ConformerLayer, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """torchaudio's ConformerLayer.forward with padded frames zeroed before the depthwise conv.

    x: (T, B, D); padding: (B, T) bool, True at padded frames. Returns (T, B, D).
    """
    x = x + 0.5 * layer.ffn1(x)
    if layer.convolution_first:
        x = x + masked_convolution(layer.conv_module, x, padding)
    h = layer.self_attn_layer_norm(x)
    h, _ = layer.self_attn(query=h, key=h, value=h, key_padding_mask=padding, need_weights=False)
    x = x + layer.self_attn_dropout(h)
    if not layer.convolution_first:
        x = x + masked_convolution(layer.conv_module, x, padding)
    x = x + 0.5 * layer.ffn2(x)
    return layer.final_layer_norm(x)


def masked_convolution(module: nn.Module, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Conformer convolution module (layer norm, pointwise conv + GLU, depthwise conv, norm,
    SiLU, pointwise conv, dropout) on (T, B, D) with padded frames zeroed where the depthwise
    conv reads them; returns (T, B, D)."""
    pointwise, glu, depthwise, *rest = module.sequential
    h = glu(pointwise(module.layer_norm(x).permute(1, 2, 0)))  # (B, C, T)
    h = depthwise(h.masked_fill(padding[:, None, :], 0.0))
    for m in rest:
        h = m(h)
    return h.permute(2, 0, 1)
