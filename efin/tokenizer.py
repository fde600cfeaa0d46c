"""CTC vocabularies: characters (default) or a SentencePiece model trained on the transcripts.

Both map normalised text (efin.text.normalize) to ids with blank = 0 and serialise to a plain
dict stored in the stage artifact, so decoding never depends on files outside the artifact.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Protocol

from efin.text import ALPHABET, normalize

BLANK = "<blank>"


class CTCVocab(Protocol):
    size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def state(self) -> dict: ...


class CharVocab:
    """Blank, space and the normaliser's alphabet: 29 symbols."""

    kind = "char"

    def __init__(self, symbols: list[str] | None = None):
        self.symbols = symbols or [BLANK, " ", *ALPHABET]
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.size = len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in normalize(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join("".join(self.symbols[i] for i in ids if i > 0).split())

    def state(self) -> dict:
        return {"kind": self.kind, "symbols": self.symbols}


class SentencePieceVocab:
    """Unigram SentencePiece over normalised transcripts; CTC id = piece id + 1 (0 is blank)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.size = self.sp.get_piece_size() + 1

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 256) -> SentencePieceVocab:
        import sentencepiece as spm

        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter([normalize(t) for t in texts]),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="unigram",
            character_coverage=1.0,
            # CTC needs no sentence markers or unknown-token fallbacks beyond <unk>.
            bos_id=-1, eos_id=-1, unk_id=0,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        return cls(buf.getvalue())

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(normalize(text))]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i - 1 for i in ids if i > 0])

    def state(self) -> dict:
        return {"kind": self.kind, "model_proto": self.model_proto}


def build_vocab(kind: str, texts: Iterable[str], sentencepiece_size: int = 256) -> CTCVocab:
    """Build the CTC vocabulary named in the encoder config from training transcripts."""
    if kind == "char":
        return CharVocab()
    if kind == "sentencepiece":
        return SentencePieceVocab.train(texts, sentencepiece_size)
    raise ValueError(f"Unknown CTC vocabulary kind {kind!r}: use 'char' or 'sentencepiece'.")


def vocab_from_state(state: dict) -> CTCVocab:
    if state["kind"] == "char":
        return CharVocab(state["symbols"])
    if state["kind"] == "sentencepiece":
        return SentencePieceVocab(state["model_proto"])
    raise ValueError(f"Unknown CTC vocabulary kind {state['kind']!r} in artifact.")
