"""WER/CER equal jiwer's on hand-checked pairs; the normaliser is shared by targets and scoring."""

import jiwer
import pytest

from efin.metrics import ErrorCounts, cer, edit_distance, wer
from efin.text import normalize
from efin.tokenizer import CharVocab, SentencePieceVocab, vocab_from_state

PAIRS = [
    # (reference, hypothesis, word edits, char edits) counted by hand
    ("the cat sat on the mat", "the cat sat on the mat", 0, 0),
    ("the cat sat on the mat", "the cat sit on mat", 2, 5),   # sat->sit, delete "the"; chars: a->i + "the " (4)
    ("hello world", "hello there world", 1, 6),              # insert "there"
    ("a b c", "", 3, 5),                                       # delete everything
    ("speech", "peach", 1, 2),                                 # one substituted word; s deleted, a inserted
]


@pytest.mark.parametrize("ref,hyp,word_edits,char_edits", PAIRS)
def test_counts_match_hand_checked_and_jiwer(ref, hyp, word_edits, char_edits):
    counts = ErrorCounts()
    w, c = counts.add(ref, hyp)
    assert w == word_edits
    assert c == char_edits
    if hyp:  # jiwer refuses empty hypotheses in some versions
        assert counts.wer == pytest.approx(jiwer.wer(ref, hyp))
        assert counts.cer == pytest.approx(jiwer.cer(ref, hyp))


def test_corpus_rates_equal_jiwer():
    refs = [p[0] for p in PAIRS if p[1]]
    hyps = [p[1] for p in PAIRS if p[1]]
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))


def test_edit_distance_basics():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], [1, 2]) == 2


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("Hello, World!", "hello world"),
        ("It's  a  'quoted' Word.", "it's a quoted word"),
        ("Café-time\tnow", "cafe time now"),
        ("  ", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_char_vocab_round_trip():
    vocab = CharVocab()
    ids = vocab.encode("Hello, it's ME")
    assert 0 not in ids
    assert vocab.decode(ids) == "hello it's me"
    assert vocab_from_state(vocab.state()).encode("abc") == vocab.encode("abc")


def test_sentencepiece_vocab_round_trip():
    texts = [
        f"the {w} sat on the mat with a {v}" for w in ("cat", "dog", "bird", "fox") for v in ("hat", "bat", "rat")
    ] * 5
    vocab = SentencePieceVocab.train(texts, vocab_size=40)
    ids = vocab.encode("The dog sat on the mat.")
    assert min(ids) >= 1  # 0 is reserved for the CTC blank
    assert vocab.decode(ids) == "the dog sat on the mat"
    restored = vocab_from_state(vocab.state())
    assert restored.encode("the cat") == vocab.encode("the cat")
