"""Word n-gram language model with interpolated Kneser-Ney smoothing, written as ARPA text.

Small enough to train on a corpus's training transcripts in a second, and in the ARPA format
that KenLM (inside ``flashlight-text``, used by CTC beam search) reads. Interpolated
Kneser-Ney is exactly representable in ARPA's backoff form: a seen n-gram stores its
interpolated probability, and a history's backoff weight is its interpolation weight.

Conventions (as in KenLM's ``lmplz``): each sentence is ``<s> w1 ... wk </s>``; the highest order
uses raw counts, lower orders use continuation counts (distinct left neighbours) except for
n-grams that start with ``<s>``; one discount per order, ``D = n1 / (n1 + 2 n2)``; unigrams are
interpolated with a uniform distribution over the vocabulary plus ``<unk>``. Pruning
(``min_count``) drops rare n-grams of order 2 and up after estimation and recomputes the backoff
weights so every history's distribution still sums to one (SRILM's renormalisation).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def _discount(counts: Iterable[int]) -> float:
    """Absolute discount from count-of-counts, ``n1 / (n1 + 2 n2)``, kept inside (0.1, 0.9)."""
    freq = Counter(c for c in counts if c <= 2)
    n1, n2 = freq[1], freq[2]
    d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return min(max(d, 0.1), 0.9)


def kneser_ney_arpa(sentences: Iterable[str], order: int = 3, min_count: int = 1) -> str:
    """ARPA text of an interpolated Kneser-Ney word LM.

    Args:
        sentences: whitespace-tokenised, already normalised text, one sentence per item
            (empty ones are ignored).
        order: n-gram order (>= 1).
        min_count: n-grams of order >= 2 seen fewer times in the text are left out (their
            probability goes to the backoff); 1 keeps all. Unigrams are always kept.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    raw: list[Counter] = [Counter() for _ in range(order + 1)]  # raw[n][ngram tuple]
    for sentence in sentences:
        words = sentence.split()
        if not words:
            continue
        tokens = [BOS, *words, EOS]
        for n in range(1, order + 1):
            for i in range(len(tokens) - n + 1):
                raw[n][tuple(tokens[i : i + n])] += 1
    if not raw[1]:
        raise ValueError("no words to train a language model on")

    # Adjusted counts: continuation counts below the top order (except <s>-initial n-grams).
    adjusted: list[dict] = [{} for _ in range(order + 1)]
    adjusted[order] = dict(raw[order])
    for n in range(1, order):
        left_contexts = Counter(ngram[1:] for ngram in raw[n + 1])
        adjusted[n] = {g: (c if g[0] == BOS else left_contexts[g]) for g, c in raw[n].items()}
    adjusted[1].pop((BOS,), None)  # <s> is never predicted

    vocab = ({g[0] for g in raw[1]} - {BOS}) | {UNK}  # what can be predicted
    prob: list[dict] = [{} for _ in range(order + 1)]  # prob[n][ngram] = P(w | h), interpolated
    backoff: list[dict] = [{} for _ in range(order + 1)]  # backoff[n][history of length n]
    for n in range(1, order + 1):
        d = _discount(adjusted[n].values())
        totals: dict = defaultdict(int)
        types: dict = defaultdict(int)
        for g, c in adjusted[n].items():
            totals[g[:-1]] += c
            types[g[:-1]] += 1
        gamma = {h: d * types[h] / totals[h] for h in totals}
        for g, c in adjusted[n].items():
            h = g[:-1]
            lower = 1.0 / len(vocab) if n == 1 else _lower_prob(prob, backoff, g[1:])
            prob[n][g] = max(c - d, 0.0) / totals[h] + gamma[h] * lower
        if n == 1:
            prob[1][(UNK,)] = gamma[()] / len(vocab)
        else:
            backoff[n - 1] = {h: gamma[h] for h in totals}
    if min_count > 1:
        _prune(prob, backoff, raw, min_count)

    lines = ["", "\\data\\"]
    sizes = [len(prob[1]) + 1] + [len(prob[n]) for n in range(2, order + 1)]  # +1: the <s> line
    lines += [f"ngram {n}={size}" for n, size in enumerate(sizes, start=1)]
    for n in range(1, order + 1):
        lines += ["", f"\\{n}-grams:"]
        entries = sorted(prob[n].items())
        if n == 1:
            entries = [((BOS,), None), *entries]
        for g, p in entries:
            logp = -99.0 if p is None else math.log10(p)
            bow = backoff[n].get(g) if n < order else None
            text = f"{logp:.6f}\t{' '.join(g)}"
            lines.append(text if bow is None else f"{text}\t{math.log10(bow):.6f}")
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def _prune(prob: list[dict], backoff: list[dict], raw: list[Counter], min_count: int) -> None:
    """Drop n-grams (order >= 2) seen fewer than ``min_count`` times, lowest order first, and set
    each history's backoff to ``(1 - sum of its kept P(w | h)) / (1 - sum of the lower order's P(w | h'))``
    over the same words. A kept n-gram's prefix and suffix occur at least as often, so they stay."""
    for n in range(2, len(prob)):
        prob[n] = {g: p for g, p in prob[n].items() if raw[n][g] >= min_count}
        kept, lower = defaultdict(float), defaultdict(float)
        for g, p in prob[n].items():
            kept[g[:-1]] += p
            lower[g[:-1]] += _lower_prob(prob, backoff, g[1:])
        backoff[n - 1] = {h: (1.0 - kept[h]) / max(1.0 - lower[h], 1e-12) for h in backoff[n - 1]}


def _lower_prob(prob: list[dict], backoff: list[dict], g: tuple) -> float:
    """P(g[-1] | g[:-1]) from the already computed lower orders, backing off as ARPA does."""
    n = len(g)
    if g in prob[n]:
        return prob[n][g]
    return backoff[n - 1].get(g[:-1], 1.0) * _lower_prob(prob, backoff, g[1:])


class NgramLM:
    """Queries of an ARPA word LM (:func:`kneser_ney_arpa`'s, or any backoff ARPA), in natural log.

    ``log_prob(history, word)`` backs off as ARPA prescribes: the longest stored n-gram ending in
    ``word``, plus the backoff weights of the longer histories that were not found. A word
    outside the vocabulary is scored as ``<unk>``.
    """

    LN10 = math.log(10.0)

    def __init__(self, arpa: str):
        self.prob: dict[tuple[str, ...], float] = {}  # n-gram -> log10 P(w | h)
        self.backoff: dict[tuple[str, ...], float] = {}  # history -> log10 backoff weight
        order = 0
        for line in arpa.splitlines():
            line = line.strip()
            if not line or line.startswith("ngram ") or line in ("\\data\\", "\\end\\"):
                continue
            if line.startswith("\\") and line.endswith("-grams:"):
                order = int(line[1:-len("-grams:")])
                continue
            fields = line.split()  # log10 P, the n-gram's words, then its backoff if it has one
            if order == 0 or len(fields) < 1 + order:
                raise ValueError(f"not an ARPA n-gram line: {line[:80]!r}")
            ngram = tuple(fields[1 : 1 + order])
            self.prob[ngram] = float(fields[0])
            if len(fields) > 1 + order:
                self.backoff[ngram] = float(fields[1 + order])
        self.order = order
        if not self.prob:
            raise ValueError("the ARPA text holds no n-grams")
        self.vocab = {g[0] for g in self.prob if len(g) == 1} - {BOS, EOS, UNK}  # the words it knows

    def log_prob(self, history: tuple[str, ...], word: str) -> float:
        """ln P(word | history); only the last ``order - 1`` words of ``history`` matter."""
        if word != EOS and word not in self.vocab:
            word = UNK
        history = history[len(history) - self.order + 1 :] if self.order > 1 else ()
        penalty = 0.0
        while True:
            found = self.prob.get((*history, word))
            if found is not None:
                return (found + penalty) * self.LN10
            if not history:  # not even a unigram (an LM without <unk>)
                return -99.0 * self.LN10
            penalty += self.backoff.get(history, 0.0)
            history = history[1:]
