"""The prompt layout of a SpeechLLM: LLM inputs from speech embeddings and transcripts (model code:
it embeds with the LLM's embedding layer and merges speech in, :func:`merge_speech`).

One item is laid out as::

    [prefix tokens] [speech embeddings] [suffix tokens] [transcript tokens] [end token]
    '-- chat template: system + user turn up to the placeholder --'
                                        '-- rest of user turn + assistant header --'

With a chat template the user message is ``instruction`` with ``placeholder`` marking where the
audio goes; without one, plain text is used and the end token is eos. Labels cover only the
transcript and end token. Training right-pads; generation left-pads, so every prompt ends at the
last column and a batch decodes exactly like single utterances (positions restart at 0 after
the padding, padding is masked out).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from efin.text import normalize

IGNORE_INDEX = -100


@dataclass
class LLMInputs:
    """A padded LLM batch.

    inputs_embeds: (B, L, H) token and speech embeddings, LLM dtype.
    attention_mask: (B, L) long, 1 on real positions.
    position_ids: (B, L) long, 0 at each item's first real position.
    labels: (B, L) long token ids on transcript + end positions, -100 elsewhere (HF convention:
        position t is predicted from positions < t); None for generation inputs.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None


class PromptBuilder:
    """Turns (speech embeddings, transcripts) into :class:`LLMInputs` for one tokenizer.

    Args:
        tokenizer: the LLM's tokenizer.
        instruction: user-turn text; ``placeholder`` marks where the audio goes (prepended with
            a newline when absent).
        system: system message, or None for none (some templates then add their own default).
        placeholder: marker string in ``instruction``; never tokenised.
        max_text_tokens: transcripts longer than this (in tokens, end token excluded) are not
            trained on: their labels are masked and ``keep`` reports them.
    """

    def __init__(
        self,
        tokenizer,
        instruction: str = "Transcribe the audio.",
        system: str | None = None,
        placeholder: str = "<speech>",
        max_text_tokens: int = 256,
    ):
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        if placeholder not in instruction:
            instruction = f"{placeholder}\n{instruction}"
        if instruction.count(placeholder) != 1:
            raise ValueError(f"instruction must contain the placeholder {placeholder!r} once: {instruction!r}")
        self.instruction, self.system, self.placeholder = instruction, system, placeholder

        if getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": instruction}
            ]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            end_id = self._template_end_id(messages, prompt)
        else:
            bos = tokenizer.bos_token or ""
            prompt = f"{bos}{system}\n{instruction}\n" if system else f"{bos}{instruction}\n"
            end_id = None
        if prompt.count(placeholder) != 1:
            raise ValueError(f"the rendered prompt must contain {placeholder!r} exactly once: {prompt!r}")
        before, after = prompt.split(placeholder)
        self.prefix_ids: list[int] = self._ids(before)
        self.suffix_ids: list[int] = self._ids(after)
        #: Token that closes the transcript (end of turn, else eos); trained and generated.
        self.end_id: int = tokenizer.eos_token_id if end_id is None else end_id
        if self.end_id is None:
            raise ValueError("tokenizer has no eos token and its chat template no end-of-turn token")
        #: Tokens that stop generation.
        self.stop_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in (self.end_id, tokenizer.eos_token_id) if i is not None)
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _template_end_id(self, messages: list[dict], prompt: str) -> int | None:
        """The first token the template writes after an assistant message (``<|im_end|>`` for ChatML)."""
        sentinel = "efinsentinel"
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": sentinel}], tokenize=False, add_generation_prompt=False
        )
        if not full.startswith(prompt + sentinel):
            return None
        tail = self._ids(full[len(prompt) + len(sentinel) :])
        if tail and tail[0] in set(self.tokenizer.all_special_ids):
            return tail[0]
        return None

    # ------------------------------------------------------------------------------------------

    def encode_transcripts(self, texts: Sequence[str]) -> tuple[list[list[int]], torch.Tensor]:
        """Normalise and tokenise transcripts, appending the end token.

        Returns:
            ids: per item, transcript token ids + ``end_id`` (cut to ``max_text_tokens`` + 1 when
                too long, so the batch stays bounded);
            keep: (B,) bool, False where the transcript exceeded ``max_text_tokens`` (its labels
                are then all masked: the stage counts and skips it).
        """
        ids, keep = [], []
        for text in texts:
            tokens = self._ids(normalize(text))
            keep.append(len(tokens) <= self.max_text_tokens)
            ids.append(tokens[: self.max_text_tokens] + [self.end_id])
        return ids, torch.tensor(keep, dtype=torch.bool)

    def training_inputs(
        self,
        embed_tokens: nn.Module,
        speech: torch.Tensor,
        speech_lens: torch.Tensor,
        targets: Sequence[Sequence[int]],
        keep: torch.Tensor | None = None,
    ) -> LLMInputs:
        """Right-padded inputs with labels.

        Args:
            embed_tokens: the LLM's input embedding (``llm.get_input_embeddings()``).
            speech: (B, N, H) projected speech; speech_lens (B,) valid audio tokens.
            targets: from :meth:`encode_transcripts` (end token included).
            keep: (B,) bool; items with False get no labels.
        """
        keep = torch.ones(len(targets), dtype=torch.bool) if keep is None else keep
        return self._build(embed_tokens, speech, speech_lens, targets, keep.tolist(), left_pad=False)

    def generation_inputs(self, embed_tokens: nn.Module, speech: torch.Tensor, speech_lens: torch.Tensor) -> LLMInputs:
        """Left-padded prompts ending with the assistant header; ``labels`` is None."""
        empty = [[] for _ in range(speech.shape[0])]
        return self._build(embed_tokens, speech, speech_lens, empty, [False] * len(empty), left_pad=True)

    def _build(self, embed_tokens, speech, speech_lens, targets, labelled, left_pad: bool) -> LLMInputs:
        batch = speech.shape[0]
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} transcripts for {batch} utterances")
        device = speech.device
        n_prefix, n_suffix = len(self.prefix_ids), len(self.suffix_ids)
        speech_lens = speech_lens.tolist()
        lengths = [n_prefix + int(n) + n_suffix + len(t) for n, t in zip(speech_lens, targets)]
        width = max(lengths)

        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        speech_at = torch.zeros((batch, width), dtype=torch.bool)
        for b, (n, target, length) in enumerate(zip(speech_lens, targets, lengths)):
            start = width - length if left_pad else 0
            n = int(n)
            seq = self.prefix_ids + [self.pad_id] * n + self.suffix_ids + list(target)
            ids[b, start : start + length] = torch.tensor(seq, dtype=torch.long)
            attention[b, start : start + length] = 1
            speech_at[b, start + n_prefix : start + n_prefix + n] = True
            if labelled[b] and target:
                labels[b, start + length - len(target) : start + length] = torch.tensor(target, dtype=torch.long)

        ids, labels, attention, speech_at = (t.to(device) for t in (ids, labels, attention, speech_at))
        embeds = merge_speech(embed_tokens(ids), speech, torch.tensor(speech_lens, device=device), speech_at)
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        return LLMInputs(embeds, attention, position_ids, None if left_pad else labels)


def merge_speech(
    token_embeds: torch.Tensor, speech: torch.Tensor, speech_lens: torch.Tensor, speech_at: torch.Tensor
) -> torch.Tensor:
    """Put speech embeddings into the placeholder positions of embedded prompts.

    Args:
        token_embeds: (B, L, H) the LLM's embeddings of the prompt ids (placeholders embedded as pad).
        speech: (B, N, H) projected speech, any float dtype; speech_lens: (B,) valid positions of each row.
        speech_at: (B, L) bool, True at each row's ``speech_lens[b]`` placeholder positions, in order.

    Returns:
        (B, L, H) in ``token_embeds``' dtype: speech at the placeholders, token embeddings elsewhere.
    """
    valid = torch.arange(speech.shape[1], device=speech.device)[None, :] < speech_lens[:, None]
    placed = token_embeds.new_zeros(token_embeds.shape)
    placed[speech_at] = speech[valid].to(token_embeds.dtype)
    return torch.where(speech_at.unsqueeze(-1), placed, token_embeds)
