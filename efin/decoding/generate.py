"""Decoding with one built SpeechLLM: LLM generation (greedy or beam search), teacher-forced
scoring of given transcripts, and the CTC projector's own transcripts.

Functions take the model (:class:`~efin.models.speech_llm.SpeechLLM`) and run the search loops
of :mod:`efin.decoding.llm_search` on its prompts; call them in eval mode (dropout off).
"""

from __future__ import annotations

import torch

from efin.decoding.llm_search import Hypothesis, beam_search, greedy_search, score_continuations
from efin.decoding.loops import trim_loop
from efin.models.protocols import TokenCTC, TranscriptInput
from efin.models.speech_llm import SpeechLLM


@torch.no_grad()
def decode(
    model: SpeechLLM,
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
) -> list[Hypothesis]:
    """Token-level results of :func:`generate`: one :class:`Hypothesis` per utterance."""
    num_beams = model.num_beams if num_beams is None else num_beams
    length_penalty = model.length_penalty if length_penalty is None else length_penalty
    speech, speech_lens = model.embed_speech(feats, feat_lens)
    limits = model.max_new_tokens_for(feat_lens, speech_lens) if max_new_tokens is None else max_new_tokens
    inputs = model.prompt.generation_inputs(model.llm.get_input_embeddings(), speech, speech_lens)
    args = (model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, model.prompt.stop_ids, limits)
    if num_beams == 1:
        hyps = greedy_search(*args)
    else:
        hyps = beam_search(*args, num_beams=num_beams, length_penalty=length_penalty)
    return [trim_loop(h) for h in hyps] if model.trim_loops else hyps


def detokenize(model: SpeechLLM, hyps: list[Hypothesis]) -> list[str]:
    """Hypotheses -> text (special tokens dropped, stripped)."""
    return [model.tokenizer.decode(h.tokens, skip_special_tokens=True).strip() for h in hyps]


@torch.no_grad()
def generate(
    model: SpeechLLM,
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
) -> list[str]:
    """Transcribe a batch: feats (B, T, F), feat_lens (B,) -> B strings.

    ``max_new_tokens`` None derives a per-utterance limit from its duration
    (``model.max_new_tokens_for``); ``num_beams`` 1 is greedy; None takes the model's defaults.
    Hypotheses that reach the limit lose a trailing loop when ``model.trim_loops``.
    """
    return detokenize(model, decode(model, feats, feat_lens, max_new_tokens, num_beams, length_penalty))


@torch.no_grad()
def score_transcripts(
    model: SpeechLLM, speech: torch.Tensor, speech_lens: torch.Tensor, candidates: list[list[str]]
) -> list[list[float]]:
    """Log-probability (nats) of each candidate transcript given its audio: the sum over its
    tokens and the end token (second-pass rescoring of another decoder's n-best). Each
    utterance's prompt runs once; its candidates continue from its KV cache.

    Args:
        speech: (B, N, H) projected speech (``model.embed_speech``); speech_lens: (B,).
        candidates: per utterance, the texts to score.

    Returns:
        per utterance, one score per candidate; ``-inf`` for a text the LLM cannot produce
        (longer than the prompt's ``max_text_tokens``, or a token outside a draft's head).
    """
    targets, keep, rows = [], [], []
    for b, texts in enumerate(candidates):
        ids, fits = model.prompt.encode_transcripts(texts)
        targets += ids
        keep += fits.tolist()
        rows += [b] * len(ids)
    inputs = model.prompt.generation_inputs(model.llm.get_input_embeddings(), speech, speech_lens)
    scores = score_continuations(
        model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, targets, torch.tensor(rows)
    )
    scores = torch.where(torch.tensor(keep), scores, torch.tensor(float("-inf"))).tolist()
    out, start = [], 0
    for texts in candidates:
        out.append(scores[start : start + len(texts)])
        start += len(texts)
    return out


@torch.no_grad()
def ctc_transcribe(
    model: SpeechLLM, feats: torch.Tensor, feat_lens: torch.Tensor,
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[str]:
    """What the LLM is handed, as text (no LLM): the CTC projector's greedy transcripts, or the
    encoder CTC's that a transcript projector reads. ``encoded``: the encoder output (hidden
    (B, T', D), lens (B,)) when already computed; the encoder is then not run."""
    hidden, lens = encoded if encoded is not None else model.encoder(feats, feat_lens)
    if isinstance(model.projector, TranscriptInput):
        return model.projector.transcripts(hidden, lens)
    if not isinstance(model.projector, TokenCTC):
        raise TypeError(f"{type(model.projector).__name__} is not a CTC projector: it has no transcripts of its own")
    tokens = model.projector.greedy_tokens(*model.projector.token_logits(hidden, lens))
    return [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
