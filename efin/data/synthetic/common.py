"""What every part of the synthetic corpus shares: split names, the format version, errors."""

from __future__ import annotations

import os
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

