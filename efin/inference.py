"""Recognizers: any stage artifact rebuilt for transcription, with its decoding options.

Models come from artifacts through :mod:`efin.handoff` (projector/llm) or the encoder stage's
entries; the decoding itself lives in :mod:`efin.decoding`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import torch

from efin.artifacts import FIRST_PASS_KEYS, load_artifact
from efin.data.audio import LogMel
from efin.decoding.ctc import ctc_greedy, lm_decoder
from efin.decoding.generate import generate
from efin.decoding.rescore import DEFAULT_RESCORE_WEIGHT, NBestRescorer
from efin.handoff import Part, SpeechLLMHandoff, build_encoder
from efin.models.ctc import CTCModel
from efin.models.speech_llm import SpeechLLM
from efin.tokenizer import vocab_from_state


def speech_llm_from_artifact(artifact: dict, cache_dir: str | None = None) -> SpeechLLM:
    """The SpeechLLM of a loaded projector/llm artifact (:meth:`efin.handoff.SpeechLLMHandoff.build`)."""
    return SpeechLLMHandoff.from_artifact(artifact).build(cache_dir)


class CTCRecognizer:
    """CTC transcription with the encoder stage's artifact: lexicon beam search with the
    artifact's word LM when it has one (``lm`` true), else greedy.

    Options (evaluate's ``decode:``): ``lm`` (false: greedy even when an LM is stored),
    ``beam_size``, ``lm_weight``, ``word_score`` (None: the artifact's settings).
    """

    def __init__(
        self,
        artifact: dict,
        device: str = "cpu",
        lm: bool = True,
        beam_size: int | None = None,
        lm_weight: float | None = None,
        word_score: float | None = None,
    ):
        self.vocab = vocab_from_state(artifact["ctc_head"]["vocab"])
        self.model = CTCModel(build_encoder(Part(**artifact["encoder"])), self.vocab.size)
        self.model.head.load_state_dict(artifact["ctc_head"]["state_dict"], strict=True)
        self.model.to(device).eval()
        self.device = device
        self.lm_decoder = None
        if lm and artifact.get("ctc_lm") is not None:
            self.lm_decoder = lm_decoder(
                self.vocab, artifact["ctc_lm"], beam_size=beam_size, lm_weight=lm_weight, word_score=word_score
            )

    @torch.inference_mode()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[str]:
        """(B, T, F) log-mel, (B,) lengths -> B transcripts (normalised text)."""
        log_probs, lens = self.model(feats.to(self.device), feat_lens.to(self.device))
        if self.lm_decoder is not None:
            return self.lm_decoder(log_probs, lens)
        return [self.vocab.decode(ids) for ids in ctc_greedy(log_probs, lens)]


class SpeechLLMRecognizer:
    """Transcription with a projector or llm stage artifact: the LLM generates (greedy or beam
    search), or rescores the encoder's CTC + word LM n-best (:class:`NBestRescorer`).

    Options (evaluate's ``decode:``): ``num_beams``, ``length_penalty``, ``max_new_tokens``
    (None: the artifact's generation settings), ``cache_dir`` (where the LLM's pretrained
    weights are cached on this machine), ``rescore_nbest`` (0: generate; N: rescore an N-best
    list), ``rescore_weight`` (the LLM log-probability's weight against the first pass's score).
    """

    def __init__(
        self,
        artifact: dict,
        device: str = "cpu",
        num_beams: int | None = None,
        length_penalty: float | None = None,
        max_new_tokens: int | None = None,
        cache_dir: str | None = None,
        rescore_nbest: int = 0,
        rescore_weight: float = DEFAULT_RESCORE_WEIGHT,
    ):
        handoff = SpeechLLMHandoff.from_artifact(artifact)
        model = handoff.build(cache_dir)
        first_pass = {k: handoff.first_pass.get(k) for k in FIRST_PASS_KEYS}
        self._init(model, device, num_beams, length_penalty, max_new_tokens, first_pass, rescore_nbest, rescore_weight)

    @classmethod
    def from_model(cls, model: SpeechLLM, device: str = "cpu", **options) -> SpeechLLMRecognizer:
        """Wrap an already built SpeechLLM (e.g. a Hugging Face export, :func:`efin.export.load_export`);
        ``options`` as for the constructor, plus ``first_pass`` ({"ctc_head", "ctc_lm"}) to rescore."""
        self = cls.__new__(cls)
        self._init(model, device, **options)
        return self

    def _init(
        self, model, device, num_beams=None, length_penalty=None, max_new_tokens=None, first_pass=None,
        rescore_nbest: int = 0, rescore_weight: float = DEFAULT_RESCORE_WEIGHT,
    ) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.options = {"num_beams": num_beams, "length_penalty": length_penalty, "max_new_tokens": max_new_tokens}
        self.rescorer = None
        if rescore_nbest:
            self.rescorer = NBestRescorer(first_pass or {}, model.encoder.output_dim, rescore_nbest, rescore_weight, device)

    @torch.inference_mode()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[str]:
        """(B, T, F) log-mel, (B,) lengths -> B transcripts."""
        feats, feat_lens = feats.to(self.device), feat_lens.to(self.device)
        if self.rescorer is not None:
            return self.rescorer(self.model, feats, feat_lens)
        return generate(self.model, feats, feat_lens, **self.options)


# Artifact kind -> recognizer class.
RECOGNIZERS: dict[str, Callable[..., object]] = {
    "encoder": CTCRecognizer,
    "projector": SpeechLLMRecognizer,
    "llm": SpeechLLMRecognizer,
}


def load_recognizer(path: str | Path, device: str = "cpu", **options):
    """Load any stage artifact and return (recognizer, featurizer)."""
    artifact = load_artifact(path, expected_stage=tuple(RECOGNIZERS))
    options = {k: v for k, v in options.items() if v is not None}  # None: the recognizer's default
    cls = RECOGNIZERS[artifact["stage"]]
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "artifact", "device"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"decode options {unknown} do not apply to an {artifact['stage']} artifact ({path}); "
            f"its options are {sorted(known)}"
        )
    recognizer = cls(artifact, device=device, **options)
    return recognizer, LogMel(**artifact["features"])
