"""Drafters that propose from a token sequence known up front: the target's own CTC projector's
collapsed greedy tokens (:class:`CTCDrafter`, no extra model) or any fixed sequence
(:class:`SequenceDrafter`: an oracle in tests, an external hypothesis). After a mismatch they
realign the rest of the sequence to what the target wrote (recycling); per-token confidence caps
each chunk, and alternatives can form a sparse tree. See :mod:`efin.decoding.drafters` for the
drafter protocol."""

from __future__ import annotations

import bisect
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from efin.decoding.drafters import Drafter, DraftPolicy, UtteranceContext, add_alternatives, common_prefix
from efin.decoding.tree import ROOT, TokenTree
from efin.models.protocols import TokenCTC, TranscriptInput


@dataclass
class DraftSequence:
    """A whole-utterance draft: tokens (transcript, end token last when ``ends``), per-token
    confidence in [0, 1], and per-token alternatives [(token, prob), ...] best first."""

    tokens: list[int]
    confidence: list[float]
    alternatives: list[list[tuple[int, float]]]


def _suffix_edit_cost(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance between ``a`` and the best-matching suffix of ``b`` (free start in b)."""
    prev = [0] * (len(b) + 1)  # an empty prefix of a costs nothing wherever it starts in b
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


class SequenceDrafter(Drafter):
    """Drafts chunks of one whole-utterance token sequence (batch size 1).

    The sequence is aligned to the committed tokens: ``_pos`` is the sequence index expected
    after ``committed[:_base]``. While the target agrees the pointer advances; after a mismatch
    the rest of the sequence is realigned. Without ``recycle`` a one-for-one substitution is
    assumed; with it, the resume point within ``recycle_window`` of that guess whose preceding
    tokens best explain the last ``recycle_window + 1`` committed tokens (edit distance) wins;
    ties go to a point right after the last committed token, then to the substitution guess.
    Given ``token_text`` (token id -> its text), the same is done over whole words (words the
    target respells in other tokens realign at once). Right after a single mismatch
    substitution, insertion and deletion often explain it equally well; with ``tree`` the two
    runner-up resume points are verified as extra branches in the same target forward.
    A chunk is at most ``max_draft`` tokens, cut after the first token with confidence below
    ``threshold`` when ``adaptive``; with ``tree``, low-confidence tokens get their alternatives
    (each followed by the rest of the chunk) and a *skip* branch (the token was spurious).

    Subclasses override :meth:`sequence`.
    """

    name = "sequence"

    def __init__(self, policy: DraftPolicy | None = None,
                 sequence: Callable[[UtteranceContext], Sequence[int] | DraftSequence] | None = None,
                 token_text: Callable[[int], str] | None = None):
        super().__init__(policy)
        self._sequence_fn = sequence
        self._token_text = token_text
        self.seq: DraftSequence = DraftSequence([], [], [])
        self._pos = 0
        self._base = 0
        self._others: list[int] = []

    def sequence(self, ctx: UtteranceContext) -> DraftSequence:
        if self._sequence_fn is None:
            raise NotImplementedError("give SequenceDrafter a `sequence` callable or override sequence()")
        seq = self._sequence_fn(ctx)
        if isinstance(seq, DraftSequence):
            return seq
        seq = [int(t) for t in seq]
        return DraftSequence(seq, [1.0] * len(seq), [[] for _ in seq])

    def begin(self, ctx: UtteranceContext) -> None:
        t0 = time.perf_counter()
        self.seq = self.sequence(ctx)
        self._pos, self._base, self._others = 0, 0, []
        self._stops = set(ctx.stop_ids)
        self.seconds += time.perf_counter() - t0

    def _align(self, committed: Sequence[int]) -> None:
        """Move the pointer past what the target committed since the last proposal; after a
        mismatch, rank the places the rest of the sequence may resume (``self._others``)."""
        seq = self.seq.tokens
        new = list(committed[self._base :])
        m = common_prefix(new, seq[self._pos :])
        self._others = []
        if m == len(new):
            self._pos += m
            self._base = len(committed)
            return
        expected = min(self._pos + len(new), len(seq))  # one-for-one substitution
        lo = self._pos + m
        self._base = len(committed)
        self._pos = expected
        if not self.policy.recycle:
            return
        if self._token_text is not None:
            ranked = self._rank_word_resumes(committed, len(committed) - len(new) + m, lo)
        else:
            ranked = self._rank_token_resumes(committed, lo, expected)
        self._pos = ranked[0][-1]
        self._others = [r[-1] for r in ranked[1:3]]

    def _rank_token_resumes(self, committed: Sequence[int], lo: int, expected: int) -> list[tuple]:
        """Resume points q, best first: the one whose preceding tokens best explain the last
        committed tokens (edit distance, free start); ties go to a point whose token before it is
        the last committed one, then to the one nearest the substitution guess ``expected``."""
        seq, w = self.seq.tokens, self.policy.recycle_window
        tail = list(committed[-(w + 1) :])
        ranked = []
        for q in range(max(0, lo - w), min(len(seq), expected + w) + 1):
            cost = _suffix_edit_cost(tail, seq[max(0, q - len(tail) - w) : q])
            ends_alike = q > 0 and seq[q - 1] == tail[-1]  # local evidence: the same last token
            ranked.append((cost, not ends_alike, abs(q - expected), q))
        return sorted(ranked)

    def _words(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        """Tokens grouped into words: a word starts at the first token, at a token whose text
        starts with a space, and at an end token."""
        words: list[tuple[int, ...]] = []
        for i, t in enumerate(tokens):
            if i == 0 or self._starts_word(t):
                words.append((t,))
            else:
                words[-1] += (t,)
        return words

    def _starts_word(self, token: int) -> bool:
        return token in self._stops or self._token_text(token)[:1].isspace()

    def _text(self, words: Sequence[tuple[int, ...]]) -> str:
        return "".join(self._token_text(t) for word in words for t in word if t not in self._stops)

    def _rank_word_resumes(self, committed: Sequence[int], miss: int, lo: int) -> list[tuple]:
        """Resume points at the sequence's word starts, best first: the words before a point
        should explain the last committed words (edit distance over whole words, free start),
        then a point right after the same last word, then the text before it should (edit distance
        over characters: "fanaticism" matches "fanatic ism"), then the point nearest the guess
        that every word the target wrote from the mismatch on (``committed[miss:]``, sequence
        index ``lo``) replaced one of the sequence's. Words, not tokens, because the target
        respells what it reads in other tokens ("crim inally" -> "severely")."""
        seq, w = self.seq.tokens, self.policy.recycle_window
        words = self._words(seq)
        starts = list(itertools.accumulate((len(word) for word in words), initial=0))  # token index of word k
        tail = self._words(committed)[-(w + 1):]
        tail_text = self._text(tail)
        at = bisect.bisect_right(starts, lo) - 1  # the word holding the mismatch
        # the guess: a word the mismatch fell inside is done, then one sequence word per word written
        expected = at + (lo > starts[at]) + sum(map(self._starts_word, committed[miss:]))
        ranked = []
        for k in range(max(0, at - w), min(len(words), expected + w) + 1):
            before = words[max(0, k - len(tail) - w): k]
            ranked.append((_suffix_edit_cost(tail, before), not (k > 0 and words[k - 1] == tail[-1]),
                           _suffix_edit_cost(tail_text, self._text(before)), abs(k - expected), starts[k]))
        return sorted(ranked)

    def propose(self, committed: Sequence[int], depth: int) -> TokenTree:
        t0 = time.perf_counter()
        self._align(committed)
        policy, seq = self.policy, self.seq
        depth = min(depth, policy.max_draft)
        chunk: list[int] = []
        for i in range(self._pos, min(len(seq.tokens), self._pos + depth)):
            tok = seq.tokens[i]
            chunk.append(tok)
            if tok in self._stops or (policy.adaptive and seq.confidence[i] < policy.threshold):
                break
        probs = seq.confidence[self._pos : self._pos + len(chunk)]
        tree = TokenTree.chain(chunk, probs)
        if policy.tree and chunk:
            alts = seq.alternatives[self._pos : self._pos + len(chunk)]
            add_alternatives(tree, chunk, probs, alts, policy, depth)
            # Skip branches: the CTC token at a weak position was spurious (a deletion).
            for i in sorted(range(len(chunk)), key=lambda i: probs[i]):
                room = policy.tree_budget - len(tree)
                if room <= 0 or probs[i] >= policy.tree_threshold:
                    break
                tail = seq.tokens[self._pos + i + 1 : self._pos + depth + 1][: min(room, depth - i)]
                if tail and tail[0] != chunk[i]:
                    tree.add_branch(tail, ROOT if i == 0 else i - 1)
        if policy.tree and self._others:
            # After a mismatch the resume point is a guess: the runners-up are verified too.
            firsts = {t for t, p in zip(tree.tokens, tree.parents) if p == ROOT}
            for q in self._others:
                room = min(policy.tree_budget - len(tree), depth)
                branch = self.seq.tokens[q : q + room]
                if room <= 0 or not branch or branch[0] in firsts:
                    continue
                firsts.add(branch[0])
                tree.add_branch(branch, ROOT, self.seq.confidence[q : q + len(branch)])
        self.seconds += time.perf_counter() - t0
        return tree


class CTCDrafter(SequenceDrafter):
    """The target's own CTC projector as a zero-cost drafter: the collapsed greedy path of its
    token posteriors (LLM token ids), then the end token. Batch size 1.

    Per token: confidence = the highest posterior of its class over the frames of its run;
    alternatives = the next-best non-blank classes at that frame. Needs a projector with
    ``token_logits`` and ``vocab_ids`` (:class:`~efin.models.projector.TokenCTCProjector`).
    """

    name = "ctc"

    def __init__(self, projector, policy: DraftPolicy | None = None, alternatives: int = 2):
        super().__init__(policy)
        if not isinstance(projector, TokenCTC):
            raise ValueError("the CTC drafter needs a projector with a CTC head (TokenCTCProjector)")
        self.projector = projector
        self.num_alternatives = alternatives

    @torch.no_grad()
    def sequence(self, ctx: UtteranceContext) -> DraftSequence:
        logits, lens = self.projector.token_logits(ctx.hidden, ctx.hidden_lens)
        return ctc_draft_sequence(
            logits[0, : int(lens[0])], self.projector.vocab_ids, ctx.end_id, self.num_alternatives
        )


class TranscriptDrafter(SequenceDrafter):
    """Drafts the text a transcript projector hands the target (the encoder CTC's transcript, in
    the LLM's tokens), then the end token: a target that copies what it reads accepts it whole.
    Batch size 1. No per-token confidence (every token 1.0), so ``adaptive`` does not shorten
    chunks; ``max_draft`` does. Given the ``tokenizer``, recycling realigns by whole words, not
    tokens (the LLM respells and joins words it reads: "crim inally" -> "severely")."""

    name = "ctc"

    def __init__(self, projector, policy: DraftPolicy | None = None, tokenizer=None):
        token_text = None if tokenizer is None else functools.cache(lambda t: tokenizer.decode([t]))
        super().__init__(policy, token_text=token_text)
        if not isinstance(projector, TranscriptInput):
            raise ValueError("the transcript drafter needs a transcript projector (TranscriptProjector)")
        self.projector = projector

    @torch.no_grad()
    def sequence(self, ctx: UtteranceContext) -> DraftSequence:
        tokens = self.projector.token_ids(ctx.hidden, ctx.hidden_lens)[0] + [int(ctx.end_id)]
        return DraftSequence(tokens, [1.0] * len(tokens), [[] for _ in tokens])


def ctc_draft_sequence(
    logits: torch.Tensor, vocab_ids: torch.Tensor, end_id: int | None, alternatives: int = 2
) -> DraftSequence:
    """Collapse CTC logits (N, 1 + S) (class 0 = blank, class c = token ``vocab_ids[c - 1]``) into
    a draft: one entry per run of the same non-blank best class, then ``end_id`` (confidence
    1.0: the transcript ends where the audio does).

    Returns:
        a :class:`DraftSequence`; a token's confidence is its class's highest posterior over
        the frames of its run, its alternatives the next-best non-blank tokens at that frame.
    """
    probs = logits.float().softmax(-1)
    best = probs.argmax(-1).tolist()
    tokens, conf, alts = [], [], []
    prev = 0
    k = min(alternatives + 1, probs.shape[-1] - 1)
    for t, c in enumerate(best):
        if c != 0 and c != prev:
            tokens.append(int(vocab_ids[c - 1]))
            conf.append(float(probs[t, c]))
            alts.append(t)
        elif c != 0 and c == prev and float(probs[t, c]) > conf[-1]:
            conf[-1] = float(probs[t, c])
            alts[-1] = t
        prev = c
    out_alts = []
    for t, tok in zip(alts, tokens):
        top_p, top_c = probs[t, 1:].topk(k)
        out_alts.append(
            [(int(vocab_ids[c]), float(p)) for p, c in zip(top_p.tolist(), top_c.tolist()) if int(vocab_ids[c]) != tok][
                :alternatives
            ]
        )
    if end_id is not None:
        tokens.append(int(end_id))
        conf.append(1.0)
        out_alts.append([])
    return DraftSequence(tokens, conf, out_alts)
