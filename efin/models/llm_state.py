"""LLM handoff between stages: which LLM weights an artifact carries, and rebuilding the LLM.

An artifact never holds the pretrained LLM, only its build spec (the resolved ``llm`` config
node) and the weights that rebuilding from that spec cannot reproduce:

  * adapter ``frozen``: none;
  * adapter ``lora``: the LoRA weights (``peft.get_peft_model_state_dict``);
  * adapter ``full``: the whole state dict;
  * a draft (:class:`~efin.models.draft.SubsetHeadLM`) in addition keeps ``vocab_ids`` and the
    head rows they select: rebuilt without the training transcripts, a draft ranks its
    vocabulary differently.

Loading checks the expected keys of each part instead of loading with ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from efin.models.draft import SubsetHeadLM
from efin.models.llm import ADAPTERS, apply_adapter

#: Builder keys that do not change which pretrained weights an LLM spec denotes.
RUNTIME_KEYS = frozenset(
    {"adapter", "lora", "texts", "gradient_checkpointing", "cache_dir", "attn_implementation", "dtype"}
)

#: (previous adapter, new adapter) pairs a stage can start from: anything else would need
#: base weights that neither the previous nor the new artifact stores.
TRANSITIONS = {
    ("frozen", "frozen"), ("frozen", "lora"), ("frozen", "full"),
    ("lora", "lora"), ("lora", "full"),
    ("full", "full"),
}


class LLMStateError(ValueError):
    """Stored LLM weights do not fit the LLM they are loaded into."""


def llm_identity(model_spec: Mapping[str, Any]) -> dict:
    """The part of an ``llm.model`` builder spec that decides the pretrained weights (runtime
    options such as adapter, LoRA settings, dtype and cache location removed, recursively)."""
    return {
        k: llm_identity(v) if isinstance(v, Mapping) else v
        for k, v in model_spec.items()
        if k not in RUNTIME_KEYS
    }


def build_llm_from_spec(
    model_spec: Mapping[str, Any], adapter: str, lora_spec: Mapping[str, Any] | None = None,
    texts: Iterable[str] | None = None,
):
    """Instantiate an ``llm.model`` builder spec (plain dict or DictConfig) with ``adapter``.

    Args:
        lora_spec: a ``peft.LoraConfig`` node (``llm.lora``), used when ``adapter="lora"``.
        texts: training transcripts for builders that take them (drafts rank their head
            vocabulary with them); ignored by builders without a ``texts`` argument.

    Returns:
        ``(model, tokenizer)``.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if adapter == "lora" and lora_spec is None:
        raise ValueError("adapter='lora' needs LoRA settings (llm.lora is null)")
    spec = OmegaConf.to_container(model_spec, resolve=True) if OmegaConf.is_config(model_spec) else dict(model_spec)
    spec["adapter"] = adapter
    spec["lora"] = _plain(lora_spec) if adapter == "lora" else None
    if "texts" in spec:
        spec["texts"] = None if texts is None else list(texts)
    return instantiate(spec)


def _plain(node):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, SubsetHeadLM) else model


def handoff_state(model: nn.Module, adapter: str) -> dict[str, dict[str, torch.Tensor]]:
    """The LLM weights an artifact must carry (see the module docstring), as CPU tensors.

    Returns:
        ``{"full": state_dict}`` for ``full``; otherwise ``{"lora": peft state}`` when
        ``adapter="lora"`` and ``{"draft_head": {"vocab_ids": (S,), "weight": (S, H)}}`` for drafts.
    """
    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True)

    if adapter == "full":
        return {"full": {k: cpu(v) for k, v in model.state_dict().items()}}
    state: dict[str, dict[str, torch.Tensor]] = {}
    if adapter == "lora":
        from peft import get_peft_model_state_dict

        state["lora"] = {k: cpu(v) for k, v in get_peft_model_state_dict(_inner(model)).items()}
    if isinstance(model, SubsetHeadLM):
        state["draft_head"] = {"vocab_ids": cpu(model.vocab_ids), "weight": cpu(model.get_output_embeddings().weight)}
    return state


def load_handoff_state(model: nn.Module, adapter: str, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Load :func:`handoff_state` output into an LLM built from the same spec and adapter.

    Raises:
        LLMStateError: a part or key is missing or unexpected, or a shape differs.
    """
    expected_parts = set(handoff_state_parts(model, adapter))
    if set(state) != expected_parts:
        raise LLMStateError(
            f"stored LLM weights have parts {sorted(state)}, but a {adapter!r} "
            f"{type(model).__name__} needs {sorted(expected_parts)}"
        )
    if "full" in state:
        result = model.load_state_dict(state["full"], strict=False)
        # Tied weights (embeddings = head) may be stored once; anything else missing is an error.
        missing = [k for k in result.missing_keys if not _is_tied(model, k)]
        if missing or result.unexpected_keys:
            raise LLMStateError(
                f"full LLM weights do not match: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
    if "lora" in state:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        want = get_peft_model_state_dict(_inner(model))
        got = state["lora"]
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [k for k in set(want) & set(got) if want[k].shape != got[k].shape]
        if missing or unexpected or wrong:
            raise LLMStateError(
                f"LoRA weights do not match this LLM's LoRA layout: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]} (different lora settings?)"
            )
        result = set_peft_model_state_dict(_inner(model), dict(got))
        if getattr(result, "unexpected_keys", None):
            raise LLMStateError(f"peft did not place LoRA weights {result.unexpected_keys[:5]}")
    if "draft_head" in state:
        head = state["draft_head"]
        if set(head) != {"vocab_ids", "weight"}:
            raise LLMStateError(f"draft head needs vocab_ids and weight, got {sorted(head)}")
        weight = model.get_output_embeddings().weight
        if head["vocab_ids"].shape != model.vocab_ids.shape or head["weight"].shape != weight.shape:
            raise LLMStateError(
                f"draft head of {tuple(head['weight'].shape)} rows x width does not fit this draft's "
                f"{tuple(weight.shape)} (different head_rows?)"
            )
        with torch.no_grad():
            model.vocab_ids.copy_(head["vocab_ids"])
            weight.copy_(head["weight"])
        model.full_to_subset = model._inverse(model.vocab_ids)


def handoff_state_parts(model: nn.Module, adapter: str) -> list[str]:
    """Names of the parts :func:`handoff_state` returns for this model and adapter."""
    if adapter == "full":
        return ["full"]
    return (["lora"] if adapter == "lora" else []) + (["draft_head"] if isinstance(model, SubsetHeadLM) else [])


def _is_tied(model: nn.Module, key: str) -> bool:
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return tied and key.endswith("lm_head.weight")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA updates into the base weights (``merge_and_unload``); a draft stays a SubsetHeadLM."""
    if isinstance(model, SubsetHeadLM):
        model.model = merge_lora(model.model)
        return model
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model


def change_adapter(model: nn.Module, previous: str, adapter: str, lora=None) -> nn.Module:
    """Turn an LLM trained with adapter ``previous`` into one that trains with ``adapter``.

    ``lora`` is the new ``peft.LoraConfig`` (for ``adapter="lora"``). Same adapter: returned as
    is (LoRA training continues on the loaded adapter). ``lora -> full``: LoRA is merged first.

    Raises:
        LLMStateError: for transitions outside :data:`TRANSITIONS`.
    """
    if (previous, adapter) not in TRANSITIONS:
        raise LLMStateError(
            f"cannot continue a {previous!r} LLM with adapter {adapter!r}: the new artifact would not "
            f"store the changed base weights. Allowed: {sorted(TRANSITIONS)}"
        )
    if previous == adapter:
        return model
    if previous == "lora":
        model = merge_lora(model)
    return apply_adapter(model, adapter, lora)
