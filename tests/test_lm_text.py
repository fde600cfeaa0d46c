"""Text sources of the encoder's word LM (efin.data.lm_text)."""

from __future__ import annotations

import json

import pytest

from efin.data.lm_text import lm_sentences


def test_sources_are_read_in_order_and_normalised(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"audio_filepath": "a.wav", "duration": 1.0, "text": "The Cat, sat!"}) + "\n\n")
    text = tmp_path / "general.txt"
    text.write_text("A dog barked.\n\n  \nIt's   late\n")
    assert lm_sentences(["transcripts", str(manifest), str(text)], transcripts=["Hello World"]) == [
        "hello world", "the cat sat", "a dog barked", "it's late",
    ]
    assert lm_sentences(str(text)) == lm_sentences([str(text)])  # a single source without brackets


def test_bad_sources_name_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="training manifest"):
        lm_sentences(["transcripts"])  # evaluation has no transcripts
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        lm_sentences([str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match="at least one"):
        lm_sentences([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"duration": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        lm_sentences([str(bad)])


def test_wordnet_definitions_are_general_text_without_the_corpus_examples():
    from efin.data.synthetic.natural import _wordnet_texts

    sentences = lm_sentences(["wordnet"])
    assert len(sentences) > 100_000 and len({w for s in sentences for w in s.split()}) > 40_000
    assert "an entity that has physical existence" in sentences
    # The quoted gloss examples are sentences of the natural corpus (possibly test sentences).
    first_examples = [t for _, t in zip(range(200), _wordnet_texts())]
    assert not set(lm_sentences(["transcripts"], transcripts=first_examples)) & set(sentences)
