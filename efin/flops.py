"""Cost model: multiply-accumulates per token of Llama-family decoders (targets and drafts).

Used to compare drafts against their target (``scripts/bench_decode.py``) and, later, to
account training strategies in FLOPs.
"""

from __future__ import annotations

from efin.models.draft import base_config


def forward_flops_per_token(model_config, head_rows: int | None = None, context_len: int = 0) -> int:
    """Multiply-accumulates (MACs) to run one token through a Llama-family decoder.

    Counts per layer the q/k/v/o projections (with grouped-query k/v), the gated MLP
    (gate, up, down: ``3 * hidden * intermediate``) and, when ``context_len > 0``, the attention
    scores and weighted sum against ``context_len`` cached positions (``2 * heads * head_dim *
    context_len``); then the output head (``hidden * head_rows``, default the full vocabulary).
    Embedding lookups, norms, rotary and softmax are ignored (no MACs or negligible).

    Args:
        model_config: a transformers config (or a model; its ``.config`` is used).
        head_rows: rows of the output head (a draft's vocabulary subset); None = ``vocab_size``.
        context_len: positions attended to; 0 ignores the context-dependent attention cost.
    """
    cfg = getattr(model_config, "config", model_config)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    projections = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * cfg.intermediate_size
    attention = 2 * heads * head_dim * context_len
    rows = cfg.vocab_size if head_rows is None else head_rows
    return cfg.num_hidden_layers * (projections + mlp + attention) + hidden * rows


def model_flops_per_token(model, context_len: int = 0) -> int:
    """:func:`forward_flops_per_token` for a built model (reads a draft's head size itself)."""
    head = model.get_output_embeddings()
    return forward_flops_per_token(base_config(model), head_rows=head.weight.shape[0], context_len=context_len)
