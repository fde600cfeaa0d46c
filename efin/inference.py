"""Rebuild a recognizer from any stage artifact and transcribe batches of features."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from efin.artifacts import load_artifact
from efin.data.audio import LogMel
from efin.decoding.ctc import ctc_greedy
from efin.models.ctc import CTCModel
from efin.models.encoder import Encoder
from efin.tokenizer import vocab_from_state


def encoder_from_artifact(artifact: dict) -> Encoder:
    """The artifact's encoder with its exact weights (expected keys checked, strict loading)."""
    encoder = Encoder(**artifact["encoder"]["config"])
    encoder.load_state_dict(artifact["encoder"]["state_dict"], strict=True)
    return encoder


class CTCRecognizer:
    """Greedy CTC transcription with the encoder stage's artifact."""

    def __init__(self, artifact: dict, device: str = "cpu"):
        self.vocab = vocab_from_state(artifact["ctc_head"]["vocab"])
        self.model = CTCModel(encoder_from_artifact(artifact), self.vocab.size)
        self.model.head.load_state_dict(artifact["ctc_head"]["state_dict"], strict=True)
        self.model.to(device).eval()
        self.device = device

    @torch.inference_mode()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[str]:
        """(B, T, F) log-mel, (B,) lengths -> B transcripts (normalised text)."""
        log_probs, lens = self.model(feats.to(self.device), feat_lens.to(self.device))
        return [self.vocab.decode(ids) for ids in ctc_greedy(log_probs, lens)]


# Artifact kind -> recognizer class. Later stages register theirs here.
RECOGNIZERS: dict[str, Callable[..., object]] = {"encoder": CTCRecognizer}


def load_recognizer(path: str | Path, device: str = "cpu", **options):
    """Load any stage artifact and return (recognizer, featurizer)."""
    artifact = load_artifact(path, expected_stage=tuple(RECOGNIZERS))
    recognizer = RECOGNIZERS[artifact["stage"]](artifact, device=device, **options)
    return recognizer, LogMel(**artifact["features"])
