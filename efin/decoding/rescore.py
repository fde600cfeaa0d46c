"""N-best rescoring: the encoder stage's CTC head and word LM propose, a SpeechLLM chooses."""

from __future__ import annotations

import torch

from efin.artifacts import FIRST_PASS_KEYS, ArtifactError
from efin.decoding.ctc import lm_decoder, load_ctc_head
from efin.decoding.generate import score_transcripts
from efin.models.speech_llm import SpeechLLM

# LLM log-probability weight against the CTC + word LM score in n-best rescoring (chosen on dev,
# README Results); conf/decode/rescore.yaml passes it.
DEFAULT_RESCORE_WEIGHT = 0.2


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
        self.vocab, self.head = load_ctc_head(first_pass["ctc_head"], encoder_dim, device)
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
        llm_scores = score_transcripts(model, *model.project(hidden, lens), [[t for t, _ in c] for c in nbest])
        return [[(t, s, llm) for (t, s), llm in zip(c, scores)] for c, scores in zip(nbest, llm_scores)]
