"""A word n-gram LM's opinion on the LLM's hypotheses in joint decoding (shallow fusion at word
ends): the lexicon knowledge the character CTC lacks, so "athorrity" loses to "authority".

Each hypothesis is detokenized and normalised (:func:`efin.text.normalize`); its finished words
are scored by the n-gram, ``lm_weight x ln P(words) + word_score x len(words) + oov_score x
(words outside its vocabulary)``. A Kneser-Ney ``<unk>`` costs about what a rare word does;
``oov_score`` can make an unknown word cost more (on chain c6's dev set it did not help, README
Results). A word is finished
once a space or punctuation follows it; the word in progress costs nothing yet unless no word
of the LM's vocabulary starts with it, in which case it pays the price of an unknown word at
once (what it would pay when finished), so a misspelling falls out of the beam early.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from efin.decoding.ngram import BOS, EOS, UNK, NgramLM
from efin.text import normalize


@dataclass
class WordLM:
    """A word n-gram LM and its weights for joint decoding, built once per recognizer.

    lm: the n-gram (:class:`NgramLM`, e.g. of the artifact's ``ctc_lm["arpa"]``).
    weight: its log-probability's weight (natural log).
    word_score: added per finished word (counters the LM's preference for fewer words).
    oov_score: added per word outside the LM's vocabulary (<= 0).
    """

    lm: NgramLM
    weight: float = 0.5
    word_score: float = 0.0
    oov_score: float = 0.0
    prefixes: set[str] = field(init=False, repr=False)

    def __post_init__(self):
        self.prefixes = {w[:i] for w in self.lm.vocab for i in range(1, len(w) + 1)}

    @classmethod
    def from_arpa(cls, arpa: str, weight: float = 0.5, word_score: float = 0.0, oov_score: float = 0.0) -> WordLM:
        return cls(NgramLM(arpa), weight, word_score, oov_score)


class WordLMScores:
    """:class:`WordLM` scores of one utterance's hypotheses (token id lists), cached by words.

    Args:
        word_lm: the LM and its weights.
        tokenizer: the LLM's tokenizer (``decode``).
    """

    def __init__(self, word_lm: WordLM, tokenizer):
        self.word_lm, self.tokenizer = word_lm, tokenizer
        self._cache: dict[tuple[str, ...], float] = {(): 0.0}  # finished words -> their unweighted score

    def _words(self, tokens: list[int], final: bool) -> tuple[tuple[str, ...], str]:
        """(finished words, the word in progress) of ``tokens``' text: all words are finished when
        ``final``; else a letter is appended to find whether the text ends inside a word."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if final:
            return tuple(normalize(text).split()), ""
        words = normalize(text + "x").split()
        return tuple(words[:-1]), words[-1][:-1]

    def _unweighted(self, words: tuple[str, ...]) -> float:
        """ln P(<s> words) under the n-gram (no end of sentence), plus ``oov_score / weight`` per unknown word."""
        if words not in self._cache:
            lm = self.word_lm
            last = lm.lm.log_prob((BOS, *words[:-1]), words[-1])
            if words[-1] not in lm.lm.vocab:
                last += lm.oov_score / lm.weight
            self._cache[words] = self._unweighted(words[:-1]) + last
        return self._cache[words]

    def score(self, tokens: list[int], final: bool = False) -> float:
        """The weighted LM score of a hypothesis: of its finished words (and the end of sentence
        when ``final``), plus the ``<unk>`` price of a word in progress no vocabulary word starts with."""
        words, partial = self._words(tokens, final)
        lm = self.word_lm
        score = self._unweighted(words)
        if final:
            score += lm.lm.log_prob((BOS, *words), EOS)
        elif partial and partial not in lm.prefixes:
            score += lm.lm.log_prob((BOS, *words), UNK) + lm.oov_score / lm.weight
        return lm.weight * score + lm.word_score * len(words)

    def scores(self, beam_tokens: list[list[int]], cand_ids: torch.Tensor, is_stop: torch.Tensor) -> torch.Tensor:
        """(k, W) score of each beam followed by each candidate token (a stop: the beam's final score)."""
        cands, stops = cand_ids.tolist(), is_stop.tolist()
        rows = {}
        for tokens in beam_tokens:
            key = tuple(tokens)
            if key not in rows:  # padded beams repeat beam 0
                final = self.score(tokens, final=True)
                rows[key] = [final if stop else self.score([*tokens, c]) for c, stop in zip(cands, stops)]
        return torch.tensor([rows[tuple(t)] for t in beam_tokens], dtype=torch.float32, device=cand_ids.device)

    def end_scores(self, beam_tokens: list[list[int]]) -> list[float]:
        """Per beam, its final score (all words finished, end of sentence)."""
        return [self.score(tokens, final=True) for tokens in beam_tokens]
