"""Word and character error rates computed from Levenshtein alignments.

Corpus-level rates sum edits and reference lengths over all utterances (the standard
definition, equal to ``jiwer.wer(refs, hyps)``), rather than averaging per-utterance rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Minimum number of substitutions, deletions and insertions turning ``ref`` into ``hyp``."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


@dataclass
class ErrorCounts:
    """Accumulated edits and reference lengths, for words and characters."""

    word_edits: int = 0
    words: int = 0
    char_edits: int = 0
    chars: int = 0
    utterances: int = 0

    def add(self, ref: str, hyp: str) -> tuple[int, int]:
        """Add one normalised pair; returns its (word edits, char edits)."""
        w = edit_distance(ref.split(), hyp.split())
        c = edit_distance(ref, hyp)
        self.word_edits += w
        self.words += len(ref.split())
        self.char_edits += c
        self.chars += len(ref)
        self.utterances += 1
        return w, c

    @property
    def wer(self) -> float:
        return self.word_edits / max(self.words, 1)

    @property
    def cer(self) -> float:
        return self.char_edits / max(self.chars, 1)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate of already-normalised strings."""
    counts = ErrorCounts()
    for r, h in zip(refs, hyps, strict=True):
        counts.add(r, h)
    return counts.wer


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate (spaces count as characters, as in jiwer)."""
    counts = ErrorCounts()
    for r, h in zip(refs, hyps, strict=True):
        counts.add(r, h)
    return counts.cer
