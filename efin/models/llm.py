"""LLM builders: the embedded SmolLM2 default, any Hugging Face causal LM, a tiny in-memory model
for tests, and adapters (frozen / full / LoRA).

Every builder returns ``(model, tokenizer)`` and takes explicit keyword arguments, so a config
file can name it with ``_target_`` (see ``conf/llm/*.yaml``). The SmolLM2 download and
conversion live in :mod:`efin.models.smollm2`, drafts in :mod:`efin.models.draft`, the cost
model in :mod:`efin.flops`.
"""

from __future__ import annotations

import logging
import os

import torch

from efin.models.protocols import SubsetVocabularyLM
from efin.models.smollm2 import DEFAULT_CACHE_DIR, DEFAULT_LLM, ensure_smollm2

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTERS = ("frozen", "full", "lora")

# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def build_llm(
    name_or_path: str = DEFAULT_LLM,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    adapter: str = "frozen",
    lora=None,
    gradient_checkpointing: bool = False,
):
    """Build a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (embedded default, via :func:`ensure_smollm2`),
            a local checkpoint directory, or a hub id such as ``"Qwen/Qwen2.5-1.5B-Instruct"``
            (needs network or a populated HF cache).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` weights.
        attn_implementation: ``sdpa`` | ``eager`` | ``flash_attention_2``.
        cache_dir: where the converted SmolLM2 lives.
        adapter: ``frozen`` (no LLM parameter trains), ``full`` (all train) or ``lora``.
        lora: a ``peft.LoraConfig`` (required when ``adapter="lora"``).
        gradient_checkpointing: trade compute for activation memory when the LLM trains.

    Returns:
        ``(model, tokenizer)``; the model is a ``PeftModel`` when ``adapter="lora"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2(cache_dir) if name_or_path.lower() == DEFAULT_LLM else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_torch_dtype(dtype), attn_implementation=attn_implementation
    )
    _ensure_pad_token(tokenizer)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return apply_adapter(model, adapter, lora), tokenizer


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token when it has none, reusing eos.

    Safe here because efin never infers padding from token ids: prompts build explicit attention
    masks and labels (see ``efin.models.prompt``), so a pad id equal to eos is never mistaken for
    the end of a transcript.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; add one before training")
        tokenizer.pad_token = tokenizer.eos_token


def apply_adapter(model, adapter: str = "frozen", lora=None):
    """Set which LLM parameters train.

    ``frozen``: none (``requires_grad=False``); ``full``: all; ``lora``: only LoRA weights
    (``peft.get_peft_model(model, lora)``). Works on a subset-head draft
    (:class:`~efin.models.draft.SubsetHeadLM`) too (the adapter goes on its inner model).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if isinstance(model, SubsetVocabularyLM):
        model.model = apply_adapter(model.model, adapter, lora)
        if adapter == "full":
            model.requires_grad_(True)
        return model
    if adapter == "lora":
        if lora is None:
            raise ValueError("adapter='lora' needs a peft.LoraConfig in `lora`")
        from peft import get_peft_model

        return get_peft_model(model, lora)
    model.requires_grad_(adapter == "full")
    return model


# ----------------------------------------------------------------------------------------------
# Tiny in-memory model for tests
# ----------------------------------------------------------------------------------------------

#: ChatML, the format SmolLM2 and Qwen use, without any default system prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """A character-level tokenizer built in memory (printable ASCII + newline + ChatML specials).

    pad ``<pad>`` (0), bos ``<s>`` (1), eos ``</s>`` (2), unk ``<unk>`` (3), end of turn ``<|im_end|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(_TINY_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=TINY_CHAT_TEMPLATE,
    )


def build_tiny_llm(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    initializer_range: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    adapter: str = "frozen",
    lora=None,
):
    """An untrained 2-layer LlamaForCausalLM + :func:`build_tiny_tokenizer`; no download.

    ``initializer_range`` is large on purpose: with the default 0.02 a random model's logits are
    nearly flat, so argmax ties would make decoding tests depend on float rounding.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(_torch_dtype(dtype))
    return apply_adapter(model, adapter, lora), tokenizer


__all__ = ["ADAPTERS", "DEFAULT_CACHE_DIR", "DEFAULT_LLM", "apply_adapter", "build_llm", "build_tiny_llm",
           "build_tiny_tokenizer", "ensure_smollm2"]
