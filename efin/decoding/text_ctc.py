"""Joint CTC/LLM decoding with a CTC whose units are not the LLM's (the encoder stage's
characters): hypotheses are scored through their text (:class:`TextCTCScores`, used by
:func:`efin.decoding.joint.joint_beam_search`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from efin.decoding.ctc_prefix import LabelSequenceScores
from efin.tokenizer import CTCVocab

NEG_INF = float("-inf")


@dataclass
class TextCTC:
    """A CTC head on the encoder's output with its own vocabulary, e.g. the encoder stage's
    character CTC that projector and llm artifacts carry on (:func:`efin.decoding.ctc.load_ctc_head`).

    head: encoder frames (B, T, D) -> logits (B, T, C), class 0 = blank.
    vocab: its vocabulary (``encode``: text -> labels).
    """

    head: nn.Module
    vocab: CTCVocab
    _spellings: dict | None = field(default=None, repr=False)

    def spellings(self, tokenizer) -> dict[tuple[int, ...], list[int]]:
        """The LLM's tokens by the labels each adds after a word (" teeth" -> labels of " teeth",
        its leading space included); tokens that add none are left out. Built once (a pass over
        the LLM's vocabulary)."""
        if self._spellings is None:
            table: dict[tuple[int, ...], list[int]] = {}
            for token_id in range(len(tokenizer)):
                labels = tuple(self.vocab.encode("a" + tokenizer.decode([token_id], skip_special_tokens=True) + "x"))
                if len(labels) > 2:
                    table.setdefault(labels[1:-1], []).append(token_id)
            self._spellings = table
        return self._spellings


class TextCTCScores:
    """Another CTC head's opinion on the LLM's tokens through their text: each hypothesis is
    detokenized, normalised and encoded in the CTC's own vocabulary (e.g. the encoder stage's
    characters), and scored by the prefix probability of that label sequence. The units need
    not match the LLM's, so the CTC can hold a word the LLM's tokens split differently, and
    the LLM can write any word the CTC can spell. Scoring a token means extending a hypothesis
    by several labels, so only the LLM's ``pre_beam`` best tokens per live beam, the tokens the
    CTC proposes (``spellings``) and the stop tokens are scored each step. A token that adds no
    label (punctuation) keeps its hypothesis' prefix score, but not right after another such token.

    Args:
        log_probs: (N, C) float log-probabilities of the utterance's N valid frames, class 0 = blank.
        text_to_labels: text -> CTC labels of a character vocabulary (``CharVocab.encode``): the
            labels of a text with a letter appended are its own labels, then that letter's.
        tokenizer: the LLM's tokenizer (``decode``).
        stop_ids: ids that end a hypothesis.
        pre_beam: LLM tokens per live beam scored by the CTC each step.
        spellings: :meth:`TextCTC.spellings`; with it the CTC proposes candidates too: the tokens
            that spell a prefix of its likeliest next ``lookahead`` labels after each beam, so
            a word the LLM ranks low can still be written.
        label_bonus: added to a sequence's CTC log-probability per label. A prefix probability
            only falls as a prefix grows, so without it the CTC prefers the shortest token that
            agrees with the audio (" a" over " analogy"), whose continuations the LLM then finds
            unlikely; a correct label costs the prefix little, a wrong one far more than the bonus.
    """

    def __init__(
        self, log_probs: torch.Tensor, text_to_labels, tokenizer, stop_ids: Sequence[int], pre_beam: int,
        spellings: dict[tuple[int, ...], list[int]] | None = None, lookahead: int = 16, label_bonus: float = 0.0,
    ):
        if pre_beam < 1:
            raise ValueError(f"pre_beam must be >= 1, got {pre_beam}")
        self.sequences = LabelSequenceScores(log_probs)
        self.text_to_labels, self.tokenizer, self.pre_beam = text_to_labels, tokenizer, pre_beam
        self.spellings, self.lookahead, self.label_bonus = spellings, lookahead, label_bonus
        self.stop_set = torch.tensor(list(stop_ids), dtype=torch.long, device=log_probs.device)

    def _labels(self, tokens: list[int], final: bool = False) -> tuple[int, ...]:
        """The CTC labels ``tokens`` commit to: all of their normalised text when ``final``; as a
        prefix, also the word break a trailing space or punctuation promises ("the " -> "the "),
        found by normalising the text with a letter appended and dropping that letter's label."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if final:
            return tuple(self.text_to_labels(text))
        return tuple(self.text_to_labels(text + "x"))[:-1]

    def candidates(
        self, log_probs: torch.Tensor, alive: torch.Tensor, beam_tokens: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(W,) token ids to score this step and (W,) which end a hypothesis: the LLM's
        ``pre_beam`` best per live beam (``log_probs`` (k, V), ``alive`` (k,)), the CTC's proposals, the stops."""
        best = log_probs[alive].topk(min(self.pre_beam, log_probs.shape[-1]), dim=-1).indices.reshape(-1).tolist()
        if self.spellings is not None:  # the CTC proposes too: tokens that spell its likeliest continuation
            for tokens, live in zip(beam_tokens, alive.tolist()):
                if live:
                    ahead = self.sequences.best_continuation(self._labels(tokens), self.lookahead)
                    best += [t for n in range(1, len(ahead) + 1) for t in self.spellings.get(ahead[:n], ())]
        cand_ids = torch.unique(torch.tensor(best + self.stop_set.tolist(), device=log_probs.device))
        return cand_ids, torch.isin(cand_ids, self.stop_set)

    def scores(self, beam_tokens: list[list[int]], cand_ids: torch.Tensor, is_stop: torch.Tensor) -> torch.Tensor:
        """(k, W) CTC log-probability (plus bonus) of each beam's text followed by each candidate (its
        end score for a stop)."""
        cands, stops = cand_ids.tolist(), is_stop.tolist()
        beams = list(dict.fromkeys(tuple(t) for t in beam_tokens))  # padded beams repeat beam 0
        labels = {b: self._labels(list(b)) for b in beams}
        ends = dict(zip(beams, self.end_scores([list(b) for b in beams])))
        grown = {b: [None if stop else self._labels([*b, c]) for c, stop in zip(cands, stops)] for b in beams}
        scored = [g for b in beams for g in grown[b] if g is not None]
        prefix = iter((self.sequences.prefix(scored) + self._bonus(scored)).tolist())
        rows = {}
        for b in beams:
            # A token that adds no label (punctuation) costs nothing here, so two in a row are
            # refused: the LLM could otherwise fill the length limit with them.
            no_second = len(b) > 0 and labels[b] == self._labels(list(b[:-1]))
            row = [ends[b] if g is None else next(prefix) for g in grown[b]]
            rows[b] = [NEG_INF if no_second and g == labels[b] else x for g, x in zip(grown[b], row)]
        return torch.tensor([rows[tuple(t)] for t in beam_tokens], device=cand_ids.device)

    def advance(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        pass  # the hypotheses' tokens are the state; their scores are cached

    def select(self, rows: torch.Tensor) -> None:
        pass

    def _bonus(self, sequences: list[tuple[int, ...]]) -> torch.Tensor:
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.float32, device=self.stop_set.device)
        return self.label_bonus * lengths

    def end_scores(self, beam_tokens: list[list[int]]) -> list[float]:
        """Per beam, the CTC log-probability (plus bonus) that the audio is exactly its text."""
        sequences = [self._labels(t, final=True) for t in beam_tokens]
        return (self.sequences.end(sequences) + self._bonus(sequences)).tolist()
