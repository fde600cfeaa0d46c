"""Capabilities that code checks for, as protocols instead of attribute-name probes.

``isinstance(x, Protocol)`` on a ``runtime_checkable`` protocol checks that the members exist;
naming the capability once here keeps the checks greppable and their members documented.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TokenCTC(Protocol):
    """A projector that classifies audio into the LLM's own tokens with CTC
    (:class:`~efin.models.projector.TokenCTCProjector`)."""

    vocab_ids: torch.Tensor  # (S,) full-vocabulary id of each scored token

    def set_vocabulary(self, vocab_ids: torch.Tensor, input_embeddings: torch.Tensor) -> None: ...

    def token_logits(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def ctc_loss(self, logits: torch.Tensor, lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor: ...

    def greedy_tokens(self, logits: torch.Tensor, lens: torch.Tensor) -> list[list[int]]: ...

    def embed(self, logits: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class SubsetVocabularyLM(Protocol):
    """A causal LM whose head scores only ``vocab_ids`` (a draft,
    :class:`~efin.models.draft.SubsetHeadLM`); it wraps a plain Hugging Face model."""

    model: nn.Module
    vocab_ids: torch.Tensor  # (S,) sorted full-vocabulary ids of the head rows

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor: ...

    def subset_labels(self, labels: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class CharacterVocabulary(Protocol):
    """A CTC vocabulary of single characters (lexicon beam search with a word LM needs one)."""

    symbols: list[str]


@runtime_checkable
class TranscriptInput(Protocol):
    """A projector that hands the LLM text: the encoder stage's CTC transcript, embedded with the
    LLM's own table (:class:`~efin.models.projector.TranscriptProjector`)."""

    symbols: list[str]  # the encoder CTC's vocabulary
    ctc_decoding: str  # greedy | lm (lexicon beam search with the encoder stage's word LM)

    def read_from(self, other: TranscriptInput) -> bool: ...  # a draft reads its target's transcript

    def set_ctc_head(self, ctc_head: dict) -> None: ...

    def set_lm_decoder(self, decoder) -> None: ...

    def attach(self, tokenizer, input_embeddings: nn.Module) -> None: ...

    def token_ids(self, x: torch.Tensor, lens: torch.Tensor) -> list[list[int]]: ...
