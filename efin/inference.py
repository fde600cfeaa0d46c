"""Rebuild a recognizer from any stage artifact and transcribe batches of features."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch
from hydra.utils import instantiate

from efin.artifacts import FIRST_PASS_KEYS, ArtifactError, load_artifact
from efin.data.audio import LogMel
from efin.decoding.ctc import ctc_greedy, lm_decoder
from efin.models.ctc import CTCModel
from efin.models.encoder import Encoder
from efin.models.llm_state import LLMStateError, build_llm_from_spec, load_handoff_state
from efin.models.speech_llm import SpeechLLM
from efin.tokenizer import vocab_from_state


# LLM log-probability weight against the CTC + word LM score in n-best rescoring (chosen on dev, README Results).
DEFAULT_RESCORE_WEIGHT = 0.2


def encoder_from_entry(entry: dict) -> Encoder:
    """An encoder rebuilt from a stored ``{"config", "state_dict"}`` entry (strict loading)."""
    encoder = Encoder(**entry["config"])
    encoder.load_state_dict(entry["state_dict"], strict=True)
    return encoder


def projector_from_entry(entry: dict):
    """A projector rebuilt from a stored ``{"config": builder node, "state_dict"}`` entry."""
    projector = instantiate(entry["config"])
    projector.load_state_dict(entry["state_dict"], strict=True)
    return projector


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
        self.model = CTCModel(encoder_from_entry(artifact["encoder"]), self.vocab.size)
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


def _replace_key(node, key: str, value):
    if isinstance(node, dict):
        return {k: value if k == key else _replace_key(v, key, value) for k, v in node.items()}
    return node


def speech_llm_from_artifact(artifact: dict, cache_dir: str | None = None) -> SpeechLLM:
    """Rebuild the SpeechLLM of a projector/llm artifact: encoder and projector from their
    configs and weights, the LLM from its build spec with the stage's adapter applied and the
    stored LLM weights loaded (expected keys checked).

    ``cache_dir`` replaces the spec's LLM cache location (the training machine's path).
    """
    stored = artifact["llm"]
    missing = [k for k in ("spec", "adapter", "weights") if k not in stored]
    if missing:
        raise ArtifactError(f"the artifact's llm entry lacks {missing}; re-export it with this efin version")
    encoder = encoder_from_entry(artifact["encoder"])
    projector = projector_from_entry(artifact["projector"])
    spec = stored["spec"]
    model_spec = spec["model"] if cache_dir is None else _replace_key(spec["model"], "cache_dir", cache_dir)
    llm, tokenizer = build_llm_from_spec(model_spec, stored["adapter"], spec.get("lora"))
    try:
        load_handoff_state(llm, stored["adapter"], stored["weights"])
    except LLMStateError as e:
        raise ArtifactError(f"the artifact's LLM weights do not fit its LLM spec: {e}") from e
    prompt = instantiate(artifact["prompt"], tokenizer=tokenizer)
    frames_per_second = 1000.0 / artifact["features"]["hop_ms"]
    return SpeechLLM(
        encoder, projector, llm, tokenizer, prompt=prompt, frames_per_second=frames_per_second, **artifact["generation"]
    )


class NBestRescorer:
    """Second pass over the encoder's CTC n-best: the carried-on CTC head and word LM propose
    ``nbest`` transcripts (lexicon beam search), the LLM scores each given the audio, and the
    highest ``first-pass score + weight * LLM log-probability`` wins (attention rescoring, as
    in WeNet). Every output is a sequence of lexicon words, checked by the LLM.

    ``first_pass`` holds the encoder stage's ``ctc_head`` and ``ctc_lm`` entries, which
    projector/llm artifacts carry on while their encoder stays frozen.
    """

    def __init__(self, first_pass: dict, encoder_dim: int, nbest: int, weight: float, device: str = "cpu"):
        missing = [k for k in FIRST_PASS_KEYS if first_pass.get(k) is None]
        if missing:
            raise ArtifactError(
                f"n-best rescoring needs the encoder stage's CTC head and word LM, and this artifact or export "
                f"lacks {missing} (made by an older efin, with a fine-tuned encoder, or from an encoder trained "
                f"without stage.module.lm); decode with decode.rescore_nbest=0"
            )
        if nbest < 1:
            raise ValueError(f"rescore_nbest must be >= 1 to rescore, got {nbest}")
        self.vocab = vocab_from_state(first_pass["ctc_head"]["vocab"])
        self.head = torch.nn.Linear(encoder_dim, self.vocab.size)
        self.head.load_state_dict(first_pass["ctc_head"]["state_dict"], strict=True)
        self.head.to(device)
        self.search = lm_decoder(self.vocab, first_pass["ctc_lm"], nbest=nbest)
        self.weight = weight

    def __call__(self, model: SpeechLLM, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[str]:
        """(B, T, F) log-mel, (B,) lengths -> B transcripts."""
        return [self.best(c, self.weight) for c in self.scored_candidates(model, feats, feat_lens)]

    @staticmethod
    def best(candidates: list[tuple[str, float, float]], weight: float) -> str:
        """The text with the highest ``first-pass score + weight * LLM log-probability``."""
        return max(candidates, key=lambda c: c[1] + weight * c[2])[0]

    def scored_candidates(
        self, model: SpeechLLM, feats: torch.Tensor, feat_lens: torch.Tensor
    ) -> list[list[tuple[str, float, float]]]:
        """Per utterance, the n-best as (text, first-pass score, LLM log-probability), in
        first-pass order; the encoder runs once for both passes."""
        hidden, lens = model.encoder(feats, feat_lens)
        nbest = self.search.nbest(self.head(hidden).log_softmax(-1), lens)
        nbest = [candidates or [("", 0.0)] for candidates in nbest]
        llm_scores = model.score_transcripts(*model.project(hidden, lens), [[t for t, _ in c] for c in nbest])
        return [[(t, s, llm) for (t, s), llm in zip(c, scores)] for c, scores in zip(nbest, llm_scores)]


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
        model = speech_llm_from_artifact(artifact, cache_dir)
        first_pass = {k: artifact.get(k) for k in FIRST_PASS_KEYS}
        self._init(model, device, num_beams, length_penalty, max_new_tokens, first_pass, rescore_nbest, rescore_weight)

    @classmethod
    def from_model(cls, model: SpeechLLM, device: str = "cpu", **options) -> "SpeechLLMRecognizer":
        """Wrap an already built SpeechLLM (e.g. a Hugging Face export, see scripts/export_hf.py);
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
        return self.model.generate(feats, feat_lens, **self.options)


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
