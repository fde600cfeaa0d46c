"""Repetition-loop guard for LLM hypotheses that ran to their length limit.

On audio unlike its training data an LLM decoder can fall into a loop ("... more likely to be
more likely to be more likely ...") and write until the length limit. A hypothesis that ends
with a stop token is left alone; one cut by the limit whose tail is the same unit of tokens
repeated at least ``min_repeats`` times keeps the first copy of the unit only. The rule is a
pure function of the greedy output, so greedy and speculative decoding stay identical.
"""

from __future__ import annotations

from collections.abc import Sequence

from efin.decoding.llm_search import Hypothesis


def loop_start(tokens: Sequence[int], min_repeats: int = 3, max_period: int = 16) -> int | None:
    """Where a trailing loop's repeats begin, or None without one.

    A loop is a unit of p <= ``max_period`` tokens repeated at least ``min_repeats`` times at
    the end of ``tokens``, the last repeat possibly cut short (the length limit stops it
    anywhere). Returns the index after the first copy of the unit, i.e. ``tokens[:i]`` is the
    hypothesis without the repeats; the longest loop wins.
    """
    n, best = len(tokens), None
    for p in range(1, max_period + 1):
        for q in range(p):  # q tokens of an unfinished repeat at the very end
            end = n - q
            if end - min_repeats * p < 0:
                break
            unit = tokens[end - p : end]
            if list(tokens[end:]) != list(unit[:q]):
                continue
            repeats = 1
            while end - (repeats + 1) * p >= 0 and tokens[end - (repeats + 1) * p : end - repeats * p] == unit:
                repeats += 1
            if repeats >= min_repeats:
                start = end - (repeats - 1) * p
                best = start if best is None else min(best, start)
    return best


def trim_loop(hyp: Hypothesis, min_repeats: int = 3, max_period: int = 16) -> Hypothesis:
    """``hyp`` without its trailing loop when it hit the length limit (``stop_token`` None);
    otherwise ``hyp`` itself. ``log_prob`` stays that of the generated tokens."""
    if hyp.stop_token is not None:
        return hyp
    start = loop_start(list(hyp.tokens), min_repeats, max_period)
    if start is None:
        return hyp
    return Hypothesis(list(hyp.tokens[:start]), hyp.log_prob, None)
