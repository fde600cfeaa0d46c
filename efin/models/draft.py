"""Draft LLMs for speculative decoding: a target's first layers with a smaller output head.

:class:`SubsetHeadLM` scores only a subset of the tokenizer's ids; :func:`draft_vocab` chooses
that subset from the training transcripts; :func:`build_draft_llm` is the config builder.
"""

from __future__ import annotations

import collections
import copy
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from efin.models.llm import apply_adapter
from efin.text import normalize


class SubsetHeadLM(nn.Module):
    """A causal LM whose output head scores only ``vocab_ids``, a subset of the tokenizer's ids.

    The head of a small LLM dominates its per-token cost (SmolLM2: 49,152 x 576 = 28 M MACs vs
    3.5 M per decoder layer), so a draft scores only the tokens transcripts use (FR-Spec style).
    Inputs still embed any id (the embedding table keeps the full vocabulary; lookups cost no
    MACs). ``expand_logits`` puts subset logits back at their full-vocabulary ids (``-inf``
    elsewhere), so a draft proposes ordinary token ids and verification by the target stays exact.

    Attributes:
        model: the inner Hugging Face causal LM; its ``lm_head`` has ``len(vocab_ids)`` rows.
        vocab_ids: (S,) long buffer, sorted full-vocabulary ids of the head rows (saved in the
            state dict, so a reloaded draft scores the same tokens).
    """

    def __init__(self, model: nn.Module, vocab_ids: torch.Tensor):
        super().__init__()
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        rows = model.get_output_embeddings().weight.shape[0]
        if rows != vocab_ids.numel():
            raise ValueError(f"head has {rows} rows but {vocab_ids.numel()} vocab ids were given")
        self.model = model
        self.vocab_size = base_config(model).vocab_size
        self.register_buffer("vocab_ids", vocab_ids.clone())
        self.register_buffer("full_to_subset", self._inverse(vocab_ids), persistent=False)
        self.register_load_state_dict_post_hook(self._refresh_inverse)

    def _inverse(self, vocab_ids: torch.Tensor) -> torch.Tensor:
        inverse = torch.full((self.vocab_size,), -1, dtype=torch.long, device=vocab_ids.device)
        inverse[vocab_ids] = torch.arange(vocab_ids.numel(), device=vocab_ids.device)
        return inverse

    @staticmethod
    def _refresh_inverse(module, incompatible_keys) -> None:
        module.full_to_subset = module._inverse(module.vocab_ids)

    @property
    def config(self):
        return base_config(self.model)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def forward(self, *args, **kwargs):
        """The inner model's forward; ``.logits`` are (B, Q, S) over ``vocab_ids``."""
        return self.model(*args, **kwargs)

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., S) subset logits -> (..., V) full-vocabulary logits, ``-inf`` off the subset."""
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, logits)

    def subset_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Map full-vocabulary labels to head rows; ids outside the subset (and -100) become -100."""
        mapped = self.full_to_subset[labels.clamp(min=0)]
        return torch.where((labels >= 0) & (mapped >= 0), mapped, torch.full_like(labels, -100))


def draft_vocab(
    tokenizer,
    size: int,
    texts: Iterable[str] | None = None,
    always: Sequence[int] = (),
) -> torch.Tensor:
    """Choose the ``size`` token ids a draft's head scores, most useful first; return them sorted.

    Order of preference:
      1. ``always`` and the tokenizer's special ids (eos / end of turn must be predictable);
      2. tokens of the normalised ``texts`` (the training transcripts), most frequent first;
      3. tokens that can occur in a normalised transcript (only ``a-z``, apostrophe, space), by
         increasing id: BPE ids follow merge order, a proxy for corpus frequency;
      4. any remaining ids, by increasing id.
    The result depends only on the tokenizer, ``size`` and ``texts``; a draft rebuilt without
    ``texts`` gets the same shape and receives its trained ``vocab_ids`` from the checkpoint.

    Returns:
        (size,) long tensor of distinct token ids, ascending.
    """
    vocab_size = len(tokenizer)
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab_size}, got {size}")
    ranked: dict[int, None] = {}  # insertion-ordered set

    def add(ids: Iterable[int]) -> None:
        for i in ids:
            if len(ranked) >= size:
                return
            if 0 <= i < vocab_size:
                ranked.setdefault(int(i), None)

    specials = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids]
    add(list(always) + [i for i in specials if i is not None])
    if texts is not None:
        counts: collections.Counter[int] = collections.Counter()
        for text in texts:
            counts.update(tokenizer(normalize(text), add_special_tokens=False)["input_ids"])
        add(i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    if len(ranked) < size:
        pieces = tokenizer.batch_decode([[i] for i in range(vocab_size)])
        allowed = re.compile(r"[a-z' ]+")
        add(i for i, p in enumerate(pieces) if allowed.fullmatch(p))
        add(range(vocab_size))
    return torch.tensor(sorted(ranked), dtype=torch.long)


def build_draft(target_model, num_layers: int, vocab_ids: torch.Tensor | None = None) -> nn.Module:
    """Derive a draft LLM from a target: its first ``num_layers`` decoder layers, embeddings and
    final norm, copied (the draft trains independently afterwards).

    With ``vocab_ids`` the head keeps only those rows (copied from the target's head) and the
    result is a :class:`SubsetHeadLM`; without, the full head is kept (tied like the target's) and
    a plain Hugging Face model is returned. Assumes the Llama/Qwen/Mistral layout
    (``model.layers.N.*``). The draft shares the target's tokenizer: same ids, same specials.
    """
    base = base_model(target_model)
    config = copy.deepcopy(base.config)
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])
    subset = vocab_ids is not None
    if subset:
        config.tie_word_embeddings = False
    state = {}
    layer_key = re.compile(r"(^|\.)layers\.(\d+)\.")
    for key, value in base.state_dict().items():
        match = layer_key.search(key)
        if match and int(match.group(2)) >= num_layers:
            continue
        state[key] = value.detach().clone()
    head_module = base.get_output_embeddings()
    head_key = next(n for n, m in base.named_modules() if m is head_module) + ".weight"
    if subset:
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).cpu()
        state[head_key] = state[head_key][vocab_ids].clone()

    draft = type(base)(config).to(dtype=base.dtype)
    if subset:
        hidden = config.hidden_size
        draft.set_output_embeddings(nn.Linear(hidden, vocab_ids.numel(), bias=False, dtype=base.dtype))
    draft.load_state_dict(state, strict=True)
    draft.requires_grad_(True)
    return SubsetHeadLM(draft, vocab_ids) if subset else draft


def build_draft_llm(
    target,
    num_layers: int = 2,
    head_rows: int | None = 8192,
    texts: Iterable[str] | None = None,
    adapter: str = "full",
    lora=None,
):
    """Builder for configs: a draft from ``target = (model, tokenizer)`` (e.g. a nested
    ``build_llm`` / ``build_tiny_llm`` node), returning ``(draft, tokenizer)``.

    ``head_rows``: size of the draft's output vocabulary (None keeps the full head);
    ``texts``: training transcripts used to rank that vocabulary; the stage passes them when it
    builds the draft fresh (a draft loaded from an artifact gets ``vocab_ids`` from its weights).
    """
    target_model, tokenizer = target
    end_ids = [i for i in {tokenizer.eos_token_id, _end_of_turn_id(tokenizer)} if i is not None]
    vocab_ids = None if head_rows is None else draft_vocab(tokenizer, head_rows, texts, always=end_ids)
    draft = build_draft(target_model, num_layers, vocab_ids)
    return apply_adapter(draft, adapter, lora), tokenizer


def _end_of_turn_id(tokenizer) -> int | None:
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            return tid
    return None


def base_model(model) -> nn.Module:
    """Unwrap peft / SubsetHeadLM to the Hugging Face model."""
    if isinstance(model, SubsetHeadLM):
        model = model.model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_config(model):
    return base_model(model).config
