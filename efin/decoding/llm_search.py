"""Greedy and beam search for an LLM over embedding prefixes, with a KV cache.

Prompts arrive left-padded (see ``efin.models.prompt.PromptBuilder.generation_inputs``): every
prompt ends at the last column, so new tokens are appended in one column for the whole batch.
Positions are passed explicitly (transformers >= 5.4 ignores ``cache_position``) and continue
from each item's own last position, and the 2-D attention mask grows with the cache, so a
batched run decodes exactly as each utterance alone (fp32).

Building blocks for other decoders (speculative decoding reuses them):
  * :func:`forward_step` runs new positions through the model with the cache -> float32 logits;
  * :func:`prefill` / :func:`extend` keep a :class:`DecodeState` (cache, mask, next positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from efin.models.protocols import SubsetVocabularyLM


@dataclass
class Hypothesis:
    """One decoded continuation.

    tokens: generated ids, stop token excluded.
    log_prob: sum of the model's log-probabilities of the generated ids, stop token included.
    stop_token: the stop id that ended it, or None when it hit the length limit.
    """

    tokens: list[int]
    log_prob: float
    stop_token: int | None = None

    @property
    def length(self) -> int:
        """Generated tokens the score is normalised by (stop token included)."""
        return len(self.tokens) + (self.stop_token is not None)

    def score(self, length_penalty: float = 1.0) -> float:
        """``log_prob / length ** length_penalty`` (0 = raw sum, 1 = per-token mean)."""
        return self.log_prob / max(self.length, 1) ** length_penalty


@dataclass
class DecodeState:
    """What the next :func:`extend` needs.

    cache: the KV cache (``transformers.DynamicCache``) over all positions so far.
    attention_mask: (B, P) long over the cached positions (0 on left padding).
    next_position: (B,) long position id of each row's next token.
    """

    cache: object
    attention_mask: torch.Tensor
    next_position: torch.Tensor

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows ``rows`` (B',) in place: beam reordering, finished rows."""
        self.cache.reorder_cache(rows)
        self.attention_mask = self.attention_mask.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)

    def repeat_interleave(self, times: int) -> None:
        """Repeat every row ``times`` times (row b -> rows b*times .. b*times+times-1)."""
        self.cache.batch_repeat_interleave(times)
        self.attention_mask = self.attention_mask.repeat_interleave(times, dim=0)
        self.next_position = self.next_position.repeat_interleave(times, dim=0)


def new_cache(llm: nn.Module):
    """An empty ``DynamicCache`` laid out for ``llm`` (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=_config(llm))


def forward_step(
    llm: nn.Module,
    cache,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Run Q new positions through ``llm``, appending them to ``cache``.

    Args:
        attention_mask: (B, P+Q) 2-D mask over cached + new positions, or an additive float
            (B, 1, Q, P+Q) mask (0 / dtype min) for tree verification.
        position_ids: (B, Q) positions of the new tokens.
        input_ids: (B, Q) token ids, or inputs_embeds (B, Q, H).
        logits_to_keep: compute logits for the last this-many positions only (0 = all).

    Returns:
        (B, Q', V) float32 logits over the full vocabulary (a draft's subset head is expanded,
        ``-inf`` off its subset), Q' = logits_to_keep or Q.
    """
    out = llm(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    logits = out.logits
    if isinstance(llm, SubsetVocabularyLM):
        logits = llm.expand_logits(logits)
    return logits.float()


def prefill(
    llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, DecodeState]:
    """Encode left-padded prompts (B, L, H) into a fresh cache.

    Returns:
        logits (B, V) float32 for the token after each prompt, and the decode state.
    """
    cache = new_cache(llm)
    logits = forward_step(llm, cache, attention_mask, position_ids, inputs_embeds=inputs_embeds, logits_to_keep=1)
    state = DecodeState(cache, attention_mask.long(), position_ids[:, -1].long() + 1)
    return logits[:, -1], state


def extend(llm: nn.Module, state: DecodeState, token_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
    """Append token_ids (B, Q) to every row; returns (B, Q', V) float32 logits (see forward_step)."""
    q = token_ids.shape[1]
    positions = state.next_position[:, None] + torch.arange(q, device=token_ids.device)[None, :]
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(token_ids.shape)], dim=1)
    logits = forward_step(llm, state.cache, mask, positions, input_ids=token_ids, logits_to_keep=logits_to_keep)
    state.attention_mask = mask
    state.next_position = state.next_position + q
    return logits


def _limits(max_new_tokens: int | torch.Tensor | Sequence[int], batch: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        return [max_new_tokens] * batch
    limits = [int(x) for x in (max_new_tokens.tolist() if torch.is_tensor(max_new_tokens) else max_new_tokens)]
    if len(limits) != batch:
        raise ValueError(f"{len(limits)} length limits for {batch} prompts")
    return limits


@torch.no_grad()
def greedy_search(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    stop_ids: Sequence[int],
    max_new_tokens: int | torch.Tensor | Sequence[int],
) -> list[Hypothesis]:
    """Greedy decoding of a left-padded batch.

    Args:
        inputs_embeds: (B, L, H) prompts; attention_mask (B, L); position_ids (B, L).
        stop_ids: ids that end a hypothesis (not included in its tokens).
        max_new_tokens: int or (B,) per-item limit on generated tokens (stop token included).

    Returns:
        one :class:`Hypothesis` per prompt, in order.
    """
    batch = inputs_embeds.shape[0]
    limits = _limits(max_new_tokens, batch)
    hyps = [Hypothesis([], 0.0) for _ in range(batch)]
    active = [b for b in range(batch) if limits[b] > 0]
    if not active:
        return hyps
    stops = set(stop_ids)
    logits, state = prefill(llm, inputs_embeds, attention_mask, position_ids)
    rows = torch.tensor(active, device=inputs_embeds.device)  # item of each state row
    if len(active) < batch:
        state.select(rows)
        logits = logits[rows]
    while True:
        log_probs = torch.log_softmax(logits, dim=-1)
        best = log_probs.argmax(dim=-1)
        best_lp = log_probs.gather(1, best[:, None])[:, 0]
        still = []
        for r, (item, tok, lp) in enumerate(zip(rows.tolist(), best.tolist(), best_lp.tolist())):
            hyp = hyps[item]
            hyp.log_prob += lp
            if tok in stops:
                hyp.stop_token = tok
            else:
                hyp.tokens.append(tok)
                if len(hyp.tokens) < limits[item]:
                    still.append(r)
        if not still:
            return hyps
        if len(still) < rows.numel():
            # Finished rows leave the batch: less work, and no effect on the others.
            keep = torch.tensor(still, device=rows.device)
            state.select(keep)
            rows, best = rows[keep], best[keep]
        logits = extend(llm, state, best[:, None], logits_to_keep=1)[:, -1]


@torch.no_grad()
def beam_search(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    stop_ids: Sequence[int],
    max_new_tokens: int | torch.Tensor | Sequence[int],
    num_beams: int = 4,
    length_penalty: float = 1.0,
) -> list[Hypothesis]:
    """Beam search over a left-padded batch; returns the best :class:`Hypothesis` per prompt.

    Hypotheses are ranked by ``Hypothesis.score(length_penalty)``. At each step every item keeps
    its ``num_beams`` best unfinished continuations; a stop token among the top ``num_beams``
    candidates finishes a hypothesis. An item is done when it holds ``num_beams`` finished
    hypotheses and its best running beam, scored at the current length, cannot beat the worst
    of them (the usual heuristic, Hugging Face's ``early_stopping=False``), or at its length
    limit (running beams are then finished as they are). With ``num_beams=1`` this is greedy.
    """
    batch = inputs_embeds.shape[0]
    k = num_beams
    if k < 1:
        raise ValueError(f"num_beams must be >= 1, got {k}")
    limits = _limits(max_new_tokens, batch)
    stops = set(stop_ids)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = [limit <= 0 for limit in limits]
    if all(done):
        return [Hypothesis([], 0.0) for _ in range(batch)]

    logits, state = prefill(llm, inputs_embeds, attention_mask, position_ids)
    device = logits.device
    state.repeat_interleave(k)
    logits = logits.repeat_interleave(k, dim=0)
    # Only beam 0 is live at first, so the k copies of the prompt do not yield duplicates.
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_tokens: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(batch)]

    def keep_best(item: int, hyp: Hypothesis) -> None:
        pool = finished[item]
        pool.append(hyp)
        pool.sort(key=lambda h: h.score(length_penalty), reverse=True)
        del pool[k:]

    step = 0
    while True:
        step += 1
        vocab = logits.shape[-1]
        cand = beam_scores.reshape(-1, 1) + torch.log_softmax(logits, dim=-1)  # (B*k, V)
        top_scores, top_idx = cand.reshape(batch, k * vocab).topk(min(2 * k, k * vocab), dim=-1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
        next_rows, next_tokens, next_scores = [], [], []
        new_tokens: list[list[list[int]]] = []
        for b in range(batch):
            chosen: list[tuple[int, int, float]] = []
            if not done[b]:
                for rank, (score, idx) in enumerate(zip(top_scores[b], top_idx[b])):
                    if score == float("-inf"):
                        break
                    beam, tok = divmod(idx, vocab)
                    if tok in stops:
                        if rank < k:
                            keep_best(b, Hypothesis(list(beam_tokens[b][beam]), score, tok))
                    else:
                        chosen.append((beam, tok, score))
                    if len(chosen) == k:
                        break
                if step >= limits[b]:
                    # Length limit: the running beams end here as they are.
                    for beam, tok, score in chosen:
                        keep_best(b, Hypothesis(beam_tokens[b][beam] + [tok], score, None))
                    done[b] = True
                elif len(finished[b]) >= k:
                    best_running = chosen[0][2] if chosen else float("-inf")
                    worst = finished[b][-1].score(length_penalty)
                    done[b] = best_running / step**length_penalty <= worst
                elif not chosen:
                    done[b] = True
            if done[b]:
                chosen = []
            chosen += [(0, 0, float("-inf"))] * (k - len(chosen))  # inert rows keep shapes fixed
            next_rows += [b * k + beam for beam, _, _ in chosen]
            next_tokens += [tok for _, tok, _ in chosen]
            next_scores += [score for _, _, score in chosen]
            new_tokens.append([beam_tokens[b][beam] + [tok] for beam, tok, _ in chosen])
        if all(done):
            break
        beam_tokens = new_tokens
        beam_scores = torch.tensor(next_scores, device=device).reshape(batch, k)
        state.select(torch.tensor(next_rows, device=device))
        tokens = torch.tensor(next_tokens, device=device)[:, None]
        logits = extend(llm, state, tokens, logits_to_keep=1)[:, -1]

    return [pool[0] if pool else Hypothesis([], float("-inf")) for pool in finished]


@torch.no_grad()
def score_continuations(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    continuations: Sequence[Sequence[int]],
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced log-probability of each continuation (M,) given its left-padded prompt.

    Continuations include their stop token if they have one. ``rows`` (M,) names each
    continuation's prompt row, so that several continuations share one prompt's prefill (n-best
    rescoring); None: one continuation per prompt. A token a draft's head cannot produce scores
    ``-inf``.
    """
    first, state = prefill(llm, inputs_embeds, attention_mask, position_ids)
    if rows is not None:
        rows = rows.to(first.device)
        first = first.index_select(0, rows)
        state.select(rows)
    longest = max((len(c) for c in continuations), default=0)
    if longest == 0:
        return torch.zeros(len(continuations))
    ids = torch.zeros((len(continuations), longest), dtype=torch.long, device=first.device)
    for b, cont in enumerate(continuations):
        ids[b, : len(cont)] = torch.tensor(list(cont), dtype=torch.long)
    # Right padding after the continuation is harmless: those positions come later causally.
    logits = torch.cat([first[:, None], extend(llm, state, ids[:, :-1])], dim=1) if longest > 1 else first[:, None]
    log_probs = logits.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    lengths = torch.tensor([len(c) for c in continuations], device=ids.device)
    valid = torch.arange(longest, device=ids.device)[None, :] < lengths[:, None]
    return torch.where(valid, log_probs, torch.zeros_like(log_probs)).sum(-1).cpu()


def _config(llm: nn.Module):
    config = getattr(llm, "config", None)
    get_base = getattr(llm, "get_base_model", None)
    if callable(get_base):
        config = get_base().config
    return config
