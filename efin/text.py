"""The one text normaliser used by training targets and by scoring.

Training and scoring must agree on what a "word" is, otherwise WER measures the normaliser
instead of the model. Everything that turns a transcript into targets or into a reference
goes through :func:`normalize`.
"""

from __future__ import annotations

import re
import unicodedata

# Characters kept after normalisation: lowercase ASCII letters, apostrophe, space.
ALPHABET = "abcdefghijklmnopqrstuvwxyz'"

_DROP = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, strip accents and punctuation, keep apostrophes inside words, squeeze spaces.

    >>> normalize("Hello,   World! It's  Café-time.")
    "hello world it's cafe time"
    """
    text = unicodedata.normalize("NFKD", text)
    text = text.encode("ascii", "ignore").decode("ascii").lower()
    text = text.replace("-", " ")
    text = _DROP.sub(" ", text)
    # An apostrophe is part of a word ("it's") but not a quotation mark ("'hello'").
    words = [w.strip("'") for w in _SPACES.split(text)]
    return " ".join(w for w in words if w)
