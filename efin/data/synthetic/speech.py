"""Speech for the corpus: private eSpeak NG instances (ctypes, from the ``espeakng-loader``
wheel), the voice sets, and rendering utterances to 16 kHz FLAC."""


from __future__ import annotations

import atexit
import ctypes
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efin.data.synthetic.common import ESPEAK_SAMPLE_RATE, SPLITS, CorpusError

log = logging.getLogger(__name__)


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


def voice_sets(
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
class Job:
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


def render_chunk(jobs: list[Job], sample_rate: int) -> list[int]:
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


def plan_jobs(
    root: Path, sentences: dict[str, list[str]], voices: dict[str, list[str]], seed: int, params: dict
) -> list[Job]:
    jobs = []
    for split in SPLITS:
        for i, text in enumerate(sentences[split]):
            # One RNG per utterance: its voice and prosody do not depend on the other splits' sizes.
            rng = random.Random(f"{seed}/{split}/{i}")
            utt_id = f"{split}-{i:06d}"
            jobs.append(
                Job(
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


def chunk_jobs(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """Fixed-size chunks that never span two splits, so a split's audio does not depend on the
    size of the splits rendered before it."""
    for split in SPLITS:
        in_split = [job for job in jobs if job.split == split]
        for start in range(0, len(in_split), size):
            yield in_split[start : start + size]
