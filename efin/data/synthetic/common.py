"""What every part of the synthetic corpus shares: split names, the format version, errors,
and the word-level check that keeps sentences speakable as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

SPLITS = ("train", "dev", "test", "test_voices")
# Bump when the generation algorithm changes in a way that changes the output, so existing
# corpora with otherwise equal parameters are regenerated instead of silently reused.
FORMAT_VERSION = 1
ESPEAK_SAMPLE_RATE = 22050  # what libespeak-ng produces with its own voices


class CorpusError(RuntimeError):
    """The corpus cannot be generated with the given parameters or root."""


def cache_dir() -> Path:
    if os.environ.get("EFIN_CACHE_DIR"):
        return Path(os.environ["EFIN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "efin"


def speakable_words(words: list[str], token: re.Pattern, trailing: str, max_word_chars: int) -> bool:
    """The words (final mark already removed) eSpeak reads as written: a capital first letter;
    every word matches ``token``; at most ``max_word_chars`` letters once ``trailing``
    punctuation is stripped; no single letters but "a"/"I"; no internal capitals ("NATO",
    "McDonald", "iPhone"), which eSpeak spells out, so the audio would not match the text."""
    if not words[0][:1].isupper():
        return False
    for w in words:
        if not token.match(w):
            return False
        core = w.rstrip(trailing)
        if len(core) > max_word_chars or (len(core) == 1 and core not in ("a", "A", "I")):
            return False
        if any(c.isupper() for c in core[1:]):
            return False
    return True


def dist_version(name: str, missing: str = "unknown") -> str:
    """The installed version of distribution ``name``, or ``missing``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return missing
