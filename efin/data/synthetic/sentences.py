"""The corpus' sentences: a seeded walk over the Markov text model that ``essential-generators``
ships (Wikipedia text), filtered to clean, speakable English."""


from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import re
import time
from pathlib import Path

from efin.data.synthetic.common import FORMAT_VERSION, CorpusError, cache_dir, speakable_words
from efin.text import normalize

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Sentences


def _markov_model_path() -> Path:
    import essential_generators

    return Path(essential_generators.__file__).parent / "markov_textgen.json"


_TOKEN = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)?,?$")


def _is_clean(words: list[str], min_words: int, max_words: int, max_word_chars: int) -> bool:
    """A sentence eSpeak reads as plain words: letters, apostrophes, commas, one final period.

    Digits, symbols, acronyms and single capital letters are rejected because eSpeak spells
    or expands them ("NATO" -> "N A T O", "1990" -> "nineteen ninety"), so the audio would not
    match the transcript.
    """
    if not (min_words <= len(words) <= max_words):
        return False
    last = words[-1]
    if not last.endswith(".") or last.endswith(",."):
        return False
    return speakable_words(words[:-1] + [last[:-1]], _TOKEN, ",", max_word_chars)


def _frequent_words(chain: dict, size: int) -> set[str]:
    """The ``size`` most frequent normalised words of the chain (counts from its bigram totals)."""
    counts: collections.Counter[str] = collections.Counter()
    for node in chain.values():
        left = normalize(node.get("left", ""))
        if left and " " not in left:
            counts[left] += node.get("total", 1)
    return {w for w, _ in counts.most_common(size)}


def _walk_sentences(
    chain: dict, seed: int, n: int, min_words: int, max_words: int, max_word_chars: int,
    max_steps: int | None = None, vocab: set[str] | None = None,
) -> list[str]:
    """Drive the trigram chain with our own RNG and keep the first n distinct clean sentences.

    With ``vocab``, a sentence is kept only when every word is in it (a closed vocabulary of
    frequent words: enough words for real variety, few enough to be learnt from hours of audio).

    A sentence starts right after a word ending in "." and ends at the next such word, so it
    begins where the Wikipedia text began sentences. Dedup is on the normalised text, so two
    sentences that differ only in punctuation cannot land in different splits.
    """
    rng = random.Random(seed)
    keys = list(chain)  # file order: deterministic for a given package version
    out: list[str] = []
    seen: set[str] = set()
    budget = max_steps or 4000 * n + 1_000_000  # ~110 steps per kept sentence without vocab, ~700 with 5k words
    state = rng.choice(keys)
    sentence: list[str] | None = None  # None: wait for the next sentence boundary
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise CorpusError(
                f"found only {len(out)} of {n} clean sentences with {min_words}-{max_words} words; "
                "widen min_words/max_words or ask for fewer utterances"
            )
        node = chain.get(state)
        transitions = node.get("transitions") if node else None
        if not transitions:
            state, sentence = rng.choice(keys), None  # dead end: jump, drop the partial sentence
            continue
        word = rng.choices(transitions, weights=node["weights"])[0]
        state = f"{node['right']} {word}"
        if sentence is not None:
            sentence.append(word)
            if len(sentence) > max_words:
                sentence = None
        if word.endswith("."):
            if sentence and _is_clean(sentence, min_words, max_words, max_word_chars):
                text = " ".join(sentence)
                key = normalize(text)
                if key not in seen and (vocab is None or all(w in vocab for w in key.split())):
                    seen.add(key)
                    out.append(text)
            sentence = []
    return out



def generate_sentences(
    n: int, seed: int = 1234, min_words: int = 4, max_words: int = 14, max_word_chars: int = 14,
    vocab_size: int | None = None,
) -> list[str]:
    """The first n distinct clean sentences of the seeded Markov walk.

    ``vocab_size`` keeps only sentences made of the chain's ``vocab_size`` most frequent words.

    Loading the 46 MB chain takes seconds, so the result is cached on disk (``$EFIN_CACHE_DIR``
    or ``~/.cache/efin``). The walk is a stream, so a cached longer list answers any shorter
    request with the same prefix.
    """
    model = _markov_model_path()
    key = f"v{FORMAT_VERSION}-s{seed}-w{min_words}-{max_words}-c{max_word_chars}-V{vocab_size}-m{model.stat().st_size}"
    cache = cache_dir() / f"sentences-{key}.json"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if len(cached) >= n:
            return cached[:n]
    t0 = time.perf_counter()
    with open(model, encoding="utf-8") as f:
        chain = json.load(f)
    vocab = _frequent_words(chain, vocab_size) if vocab_size else None
    sentences = _walk_sentences(chain, seed, n, min_words, max_words, max_word_chars, vocab=vocab)
    del chain
    log.info("generated %d sentences in %.1f s", n, time.perf_counter() - t0)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sentences), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError as err:  # a read-only home must not stop generation
        log.debug("sentence cache not written (%s)", err)
    return sentences


