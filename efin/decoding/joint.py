"""Joint CTC/LLM decoding: beam search with the LLM as the decoder and a CTC head's prefix
scores as a second opinion (hybrid CTC/attention decoding, Watanabe et al. 2017; ESPnet and
WeNet's attention + CTC prefix beam search, with the LLM as the attention decoder). The CTC is
the projector's, over the LLM's own tokens (:class:`TokenCTCScores`), or the encoder stage's
character CTC, scored through the hypotheses' text (:class:`TextCTCScores`). A word n-gram LM
may add a third opinion on the hypotheses' finished words (:class:`~efin.decoding.word_lm.WordLMScores`).

Every hypothesis is scored by ``(1 - ctc_weight) x LLM log-probability + ctc_weight x CTC
prefix log-probability`` (:mod:`efin.decoding.ctc_prefix`), plus the word LM's weighted score
when there is one; a hypothesis that ends (stop token)
takes the CTC probability of exactly its tokens instead of the prefix one. The LLM alone may
swap in words it prefers or loop until the length limit; the CTC term holds every step to what
the audio says token by token, and cuts off transcripts longer than the audio can carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from efin.decoding.ctc_prefix import CTCPrefixScorer
from efin.decoding.llm_search import Hypothesis, extend, prefill
from efin.decoding.text_ctc import TextCTC, TextCTCScores
from efin.decoding.word_lm import WordLM, WordLMScores
from efin.models.protocols import TokenCTC
from efin.models.speech_llm import SpeechLLM

NEG_INF = float("-inf")


@dataclass
class JointHypothesis(Hypothesis):
    """A :class:`Hypothesis` of joint decoding: ``log_prob`` is still the LLM's alone.

    ctc_log_prob: CTC log-probability of exactly ``tokens`` (the sequence CTC score; also for a
        hypothesis cut at the length limit, whose tokens are final too).
    ctc_weight: the weight the score mixes them with.
    lm_score: the word LM's weighted score of its words (0 without one).
    """

    ctc_log_prob: float = 0.0
    ctc_weight: float = 0.0
    lm_score: float = 0.0

    @property
    def joint_log_prob(self) -> float:
        """``(1 - ctc_weight) x log_prob + ctc_weight x ctc_log_prob + lm_score``."""
        return _mix(self.log_prob, self.ctc_log_prob, self.ctc_weight) + self.lm_score

    def score(self, length_penalty: float = 1.0) -> float:
        """``joint_log_prob / length ** length_penalty``: beam search's ranking, on the joint score."""
        return self.joint_log_prob / max(self.length, 1) ** length_penalty


def _mix(llm, ctc, weight: float):
    """``(1 - weight) x llm + weight x ctc``, where a weight of 0 or 1 drops a term entirely
    (``0 x -inf`` would be NaN: a draft's head gives -inf off its subset)."""
    if weight == 0:
        return llm
    if weight == 1:
        return ctc
    return (1 - weight) * llm + weight * ctc


class TokenCTCScores:
    """The projector's CTC over the LLM's own tokens as joint decoding's second opinion: every
    token of its vocabulary is scored exactly at every step (one log-sum-exp per hypothesis,
    :meth:`CTCPrefixScorer.next_scores`), so there is no pre-beam; other tokens (but the stop
    tokens) have CTC probability 0 and are never emitted.

    Args:
        log_probs: (N, 1 + S) float log-probabilities of the utterance's N valid CTC frames,
            class 0 = blank, class i = full-vocabulary token ``vocab_ids[i - 1]``.
        vocab_ids: (S,) long.
        stop_ids: ids that end a hypothesis.
        num_beams: hypotheses the search keeps (rows of its state).
    """

    def __init__(self, log_probs: torch.Tensor, vocab_ids: torch.Tensor, stop_ids: Sequence[int], num_beams: int):
        device = log_probs.device
        stop_set = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        vocab_ids = vocab_ids.to(device)
        classes = torch.arange(1, vocab_ids.numel() + 1, device=device)
        token_part = ~torch.isin(vocab_ids, stop_set)
        # Candidates: the CTC vocabulary (stop ids removed), then the stop ids (class 0: never a label).
        self.cand_ids = torch.cat([vocab_ids[token_part], stop_set])
        self.cand_class = torch.cat([classes[token_part], torch.zeros_like(stop_set)])
        self.is_stop = torch.isin(self.cand_ids, stop_set)
        self.scorer = CTCPrefixScorer(log_probs)
        self.state = self.scorer.initial_state().select(torch.zeros(num_beams, dtype=torch.long, device=device))

    def candidates(
        self, log_probs: torch.Tensor, alive: torch.Tensor, beam_tokens: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W,) token ids to score this step and (W,) which of them end a hypothesis, given the
        LLM's (k, V) log-probabilities and (k,) which beams are live."""
        return self.cand_ids, self.is_stop

    def scores(self, beam_tokens: list[list[int]], cand_ids: torch.Tensor, is_stop: torch.Tensor) -> torch.Tensor:
        """(k, W) CTC log-probability of each beam followed by each candidate (its end score for a stop)."""
        self._prefix = self.scorer.next_scores(self.state)  # (k, 1 + S)
        ends = self.scorer.end_scores(self.state)[:, None]
        return torch.where(is_stop[None, :], ends, self._prefix[:, self.cand_class])

    def advance(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Beam ``rows[i]`` took candidate ``cols[i]``: the frame recursion, for the kept prefixes only."""
        labels = self.cand_class[cols]
        self.state = self.scorer.extend(self.state.select(rows), labels, self._prefix[rows, labels])

    def select(self, rows: torch.Tensor) -> None:
        self.state = self.state.select(rows)

    def end_scores(self, beam_tokens: list[list[int]]) -> list[float]:
        return self.scorer.end_scores(self.state).tolist()


@torch.no_grad()
def joint_beam_search(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    ctc: TokenCTCScores | TextCTCScores | None,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    num_beams: int = 4,
    ctc_weight: float = 0.3,
    length_penalty: float = 1.0,
    word_lm: WordLMScores | None = None,
) -> JointHypothesis:
    """Joint CTC/LLM beam search over one utterance; returns its best :class:`JointHypothesis`.

    Args:
        inputs_embeds: (1, L, H) the prompt; attention_mask (1, L); position_ids (1, L).
        ctc: the CTC opinion, built for ``num_beams`` (:class:`TokenCTCScores`: the projector's
            token CTC, every token of its vocabulary; :class:`TextCTCScores`: another CTC head
            through the hypotheses' text, the LLM's pre-beam). Not consulted when
            ``ctc_weight`` is 0 (then the result is :func:`~efin.decoding.llm_search.beam_search`'s).
        stop_ids: ids that end a hypothesis (not included in its tokens).
        max_new_tokens: limit on generated tokens, stop token included.
        ctc_weight: 0..1.
        word_lm: a word n-gram LM's scores, added to every hypothesis' score (needs a CTC
            with a pre-beam, :class:`TextCTCScores`: it scores few candidates per step).

    The search is beam search's (same candidate rule, finishing and stopping heuristic, length
    limit), ranked by :meth:`JointHypothesis.score` instead of the LLM's log-probability.
    """
    k = num_beams
    if k < 1:
        raise ValueError(f"num_beams must be >= 1, got {k}")
    if not 0 <= ctc_weight <= 1:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    if max_new_tokens <= 0:
        return JointHypothesis([], 0.0, ctc_weight=ctc_weight)
    stops = list(dict.fromkeys(stop_ids))
    use_ctc = ctc_weight > 0
    if word_lm is not None and not (use_ctc and isinstance(ctc, TextCTCScores)):
        raise ValueError("a word LM in joint decoding needs a character CTC (TextCTCScores, ctc_weight > 0)")

    logits, state = prefill(llm, inputs_embeds, attention_mask, position_ids)
    device = logits.device
    if not use_ctc:
        all_ids = torch.arange(logits.shape[-1], device=device)  # every token, stop ids where they are
        all_stop = torch.isin(all_ids, torch.tensor(stops, dtype=torch.long, device=device))

    state.repeat_interleave(k)
    logits = logits.expand(k, -1)
    # Only beam 0 is live at first, so the k copies of the prompt do not yield duplicates.
    llm_scores = torch.full((k,), NEG_INF, device=device)
    llm_scores[0] = 0.0
    alive = torch.zeros(k, dtype=torch.bool, device=device)
    alive[0] = True
    beam_tokens: list[list[int]] = [[] for _ in range(k)]
    finished: list[JointHypothesis] = []

    def keep_best(hyp: JointHypothesis) -> None:
        finished.append(hyp)
        finished.sort(key=lambda h: h.score(length_penalty), reverse=True)
        del finished[k:]

    step = 0
    while True:
        step += 1
        log_probs = torch.log_softmax(logits, dim=-1)
        cand_ids, is_stop = ctc.candidates(log_probs, alive, beam_tokens) if use_ctc else (all_ids, all_stop)
        width = cand_ids.numel()
        llm_cand = llm_scores[:, None] + log_probs[:, cand_ids]  # (k, width)
        lm_cand = None
        if use_ctc:
            ctc_cand = ctc.scores(beam_tokens, cand_ids, is_stop)
            lm_cand = word_lm.scores(beam_tokens, cand_ids, is_stop) if word_lm is not None else None
            joint = _mix(llm_cand, ctc_cand, ctc_weight)
            if lm_cand is not None:
                joint = joint + lm_cand
            joint = joint.masked_fill(~alive[:, None], NEG_INF)
        else:
            joint = llm_cand
        cand_list, stop_list = cand_ids.tolist(), is_stop.tolist()
        top_scores, top_idx = joint.reshape(-1).topk(min(2 * k, k * width))
        chosen: list[tuple[int, int, float]] = []  # (beam, candidate column, joint score), best first
        for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            if score == NEG_INF:
                break
            beam, col = divmod(idx, width)
            if stop_list[col]:
                if rank < k:
                    ctc_end = float(ctc_cand[beam, col]) if use_ctc else 0.0
                    lm_end = float(lm_cand[beam, col]) if lm_cand is not None else 0.0
                    keep_best(JointHypothesis(list(beam_tokens[beam]), float(llm_cand[beam, col]), cand_list[col],
                                              ctc_end, ctc_weight, lm_end))
            else:
                chosen.append((beam, col, score))
            if len(chosen) == k:
                break
        if not chosen:
            break
        rows = torch.tensor([b for b, _, _ in chosen], device=device)
        cols = torch.tensor([c for _, c, _ in chosen], device=device)
        llm_scores = llm_cand[rows, cols]
        beam_tokens = [beam_tokens[b] + [cand_list[c]] for b, c, _ in chosen]
        if use_ctc:
            ctc.advance(rows, cols)
        if step >= max_new_tokens:
            # Length limit: the running beams end here as they are, scored as final transcripts.
            ends = ctc.end_scores(beam_tokens) if use_ctc else [0.0] * len(chosen)
            lm_ends = word_lm.end_scores(beam_tokens) if word_lm is not None else [0.0] * len(chosen)
            for tokens, llm_score, ctc_end, lm_end in zip(beam_tokens, llm_scores.tolist(), ends, lm_ends):
                keep_best(JointHypothesis(tokens, llm_score, None, ctc_end, ctc_weight, lm_end))
            break
        if len(finished) >= k and chosen[0][2] / step**length_penalty <= finished[-1].score(length_penalty):
            break  # beam search's heuristic: the best running beam cannot beat the worst finished one
        # Fewer than k beams left: pad with inert copies of beam 0 so the cache keeps k rows.
        pad = k - len(chosen)
        alive = torch.arange(k, device=device) < len(chosen)
        keep = torch.cat([torch.arange(len(chosen), device=device), torch.zeros(pad, dtype=torch.long, device=device)])
        llm_scores = llm_scores[keep].masked_fill(~alive, NEG_INF)
        beam_tokens = [beam_tokens[i] for i in keep.tolist()]
        if use_ctc:
            ctc.select(keep)
        state.select(rows[keep])
        logits = extend(llm, state, cand_ids[cols[keep]][:, None], logits_to_keep=1)[:, -1]

    return finished[0] if finished else JointHypothesis([], NEG_INF, ctc_log_prob=NEG_INF, ctc_weight=ctc_weight)


@torch.no_grad()
def joint_decode(
    model: SpeechLLM,
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    ctc_weight: float = 0.3,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    max_new_tokens: int | None = None,
    text_ctc: TextCTC | None = None,
    pre_beam: int = 16,
    label_bonus: float = 2.5,
    word_lm: WordLM | None = None,
) -> list[JointHypothesis]:
    """Joint CTC/LLM decoding of a batch: feats (B, T, F), feat_lens (B,) -> one
    :class:`JointHypothesis` per utterance.

    The CTC is the projector's token CTC (``text_ctc`` None; the projector must have one), or
    ``text_ctc``: a CTC head on the encoder's output with its own vocabulary (the encoder
    stage's character CTC, :class:`TextCTC`), scored through the hypotheses' text on the LLM's
    ``pre_beam`` best tokens, and optionally ``word_lm`` (a word n-gram LM on the hypotheses'
    finished words; with ``text_ctc`` only). The encoder and projector run once for the batch; the search runs
    one utterance at a time (its prompt without the batch's left padding). None options take
    the model's defaults, as :func:`efin.decoding.generate.decode`.
    """
    if text_ctc is None and not isinstance(model.projector, TokenCTC):
        raise TypeError(f"joint CTC/LLM decoding needs a CTC projector; {type(model.projector).__name__} has no CTC "
                        "head (projector=ctc has one, or use the encoder's: decode.joint_ctc=encoder)")
    num_beams = model.num_beams if num_beams is None else num_beams
    length_penalty = model.length_penalty if length_penalty is None else length_penalty
    hidden, lens = model.encoder(feats, feat_lens)
    if text_ctc is None:
        logits, ctc_lens = model.projector.token_logits(hidden, lens)
        speech, speech_lens = model.projector.embed(logits, ctc_lens)  # what model.project gives
    else:
        logits, ctc_lens = text_ctc.head(hidden), lens
        speech, speech_lens = model.project(hidden, lens)
    log_probs = logits.float().log_softmax(-1)
    limits = (model.max_new_tokens_for(feat_lens, speech_lens).tolist() if max_new_tokens is None
              else [max_new_tokens] * len(feats))
    speech = speech.to(model.llm.get_input_embeddings().weight.dtype)
    inputs = model.prompt.generation_inputs(model.llm.get_input_embeddings(), speech, speech_lens)
    stop_ids = model.prompt.stop_ids
    hyps = []
    for b in range(len(feats)):
        utterance = log_probs[b, : int(ctc_lens[b])]
        if text_ctc is None:
            ctc = TokenCTCScores(utterance, model.projector.vocab_ids, stop_ids, num_beams)
        else:
            ctc = TextCTCScores(utterance, text_ctc.vocab.encode, model.tokenizer, stop_ids, pre_beam,
                                text_ctc.spellings(model.tokenizer), label_bonus=label_bonus)
        start = int((inputs.attention_mask[b] == 0).sum())  # left padding
        hyps.append(joint_beam_search(
            model.llm, inputs.inputs_embeds[b : b + 1, start:], inputs.attention_mask[b : b + 1, start:],
            inputs.position_ids[b : b + 1, start:], ctc, stop_ids, int(limits[b]), num_beams=num_beams,
            ctc_weight=ctc_weight, length_penalty=length_penalty,
            word_lm=WordLMScores(word_lm, model.tokenizer) if word_lm is not None else None,
        ))
    return hyps
