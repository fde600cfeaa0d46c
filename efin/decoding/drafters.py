"""Drafters for speculative decoding: who proposes the tokens the target verifies.

Every drafter works on one utterance at a time (batch size 1). The loop in
:mod:`efin.decoding.speculative` calls, per utterance::

    drafter.begin(ctx)                        # once: speech prefix, CTC sequence, ...
    tree = drafter.propose(committed, depth)  # before every target forward

``committed`` is every token the target has committed so far (the whole transcript prefix,
including the target's own bonus tokens), so a drafter detects a rejection by comparing it with
what it proposed last time, and rolls its own state back itself. ``depth`` caps how deep the
proposal may go: the target commits at most ``depth + 1`` tokens per forward, never past the
length limit. A proposal is a :class:`~efin.decoding.tree.TokenTree` (a chain for plain drafts).

Drafters:

* :class:`SpeechLLMDrafter` - a small draft SpeechLLM with its own projector, speech prefix and
  KV cache (the shared, frozen encoder's output is computed once, by the loop);
* :class:`~efin.decoding.sequence_drafters.CTCDrafter` - the target's own CTC projector's
  collapsed greedy tokens (no extra model); confidence caps each chunk, realignment recycles the
  rest after a mismatch;
* :class:`~efin.decoding.sequence_drafters.SequenceDrafter` - a fixed token sequence (an oracle
  in tests, or any external hypothesis), with the same realignment and tree logic as the CTC
  drafter;
* :class:`NoDrafter` - proposes nothing: the loop is then plain autoregressive greedy decoding.

:class:`DraftPolicy` holds the switches (draft length, adaptive length, recycling, sparse tree)
that ``decode.speculative`` exposes in YAML.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from efin.decoding.llm_search import DecodeState, extend, prefill
from efin.decoding.tree import ROOT, TokenTree


@dataclass
class DraftPolicy:
    """How drafts are made (SpecASR's mechanisms, each switchable).

    max_draft: most tokens drafted per target forward (the fixed k of plain speculative
        decoding; the cap when ``adaptive``). For the CTC drafter, the longest chunk of its
        sequence verified at once.
    adaptive: end the draft at the first token whose draft probability (CTC: per-token
        confidence, the posterior of its best frame) is below ``threshold``; that token is still
        proposed (it costs one more verified position and is often right).
    threshold: probability below which ``adaptive`` ends the draft (0..1).
    recycle: after a rejection, reuse the rest of the previous draft once the drafter lines up
        with it again: a draft model's new token equals one of the next ``recycle_window`` old
        tokens; the CTC drafter realigns its sequence to the target's last committed tokens.
        Off: a draft model drafts anew, the CTC drafter assumes a one-for-one substitution.
    recycle_window: how far ahead in the old draft (tokens) a realignment may look.
    tree: two-pass sparse token tree: after the greedy draft, add the ``tree_top_k`` next-best
        tokens at its positions whose probability is below ``tree_threshold`` (least confident
        first), each followed by the rest of the greedy draft (a substitution), within
        ``tree_budget`` nodes; all verified in one target forward.
    tree_threshold: confidence below which a draft position gets alternatives.
    tree_top_k: alternatives per low-confidence position.
    tree_budget: most tree nodes per target forward (greedy chain included).
    """

    max_draft: int = 4
    adaptive: bool = False
    threshold: float = 0.5
    recycle: bool = False
    recycle_window: int = 3
    tree: bool = False
    tree_threshold: float = 0.8
    tree_top_k: int = 1
    tree_budget: int = 16

    def __post_init__(self):
        if self.max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {self.max_draft}")
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 <= self.tree_threshold <= 1.0:
            raise ValueError(f"thresholds are probabilities in [0, 1], got {self.threshold}, {self.tree_threshold}")
        if self.recycle_window < 1 or self.tree_top_k < 1:
            raise ValueError("recycle_window and tree_top_k must be >= 1")
        if self.tree and self.tree_budget < self.max_draft:
            raise ValueError(
                f"tree_budget ({self.tree_budget}) must hold the greedy draft (max_draft={self.max_draft})"
            )


@dataclass
class UtteranceContext:
    """What a drafter may use for one utterance (batch size 1).

    feats: (1, T, F) features; feat_lens: (1,).
    hidden: (1, T', D) output of the target's encoder, computed once; hidden_lens: (1,).
    end_id: the token that closes a transcript (the target prompt's ``end_id``).
    stop_ids: every id that stops generation.
    """

    feats: torch.Tensor
    feat_lens: torch.Tensor
    hidden: torch.Tensor
    hidden_lens: torch.Tensor
    end_id: int
    stop_ids: tuple[int, ...]


class Drafter:
    """Base class. Subclasses implement :meth:`begin` and :meth:`propose`.

    Counters (reset by :meth:`reset_counters`, read by the loop after each utterance):
    ``forwards``: draft model forward passes; ``seconds``: wall time spent drafting.
    """

    name = "drafter"

    def __init__(self, policy: DraftPolicy | None = None):
        self.policy = policy or DraftPolicy()
        self.forwards = 0
        self.seconds = 0.0

    def reset_counters(self) -> None:
        self.forwards, self.seconds = 0, 0.0

    def begin(self, ctx: UtteranceContext) -> None:
        """Prepare for a new utterance."""

    def propose(self, committed: Sequence[int], depth: int) -> TokenTree:
        """A draft continuing ``committed``, at most ``depth`` tokens deep."""
        raise NotImplementedError


class NoDrafter(Drafter):
    """Proposes nothing: the speculative loop degenerates to autoregressive greedy decoding."""

    name = "none"

    def propose(self, committed: Sequence[int], depth: int) -> TokenTree:
        return TokenTree()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def add_alternatives(tree: TokenTree, chain: list[int], probs: list[float], alts: list[list[tuple[int, float]]],
                      policy: DraftPolicy, depth: int) -> None:
    """Second pass of the sparse tree: at chain positions with probability < ``tree_threshold``
    (least confident first), add up to ``tree_top_k`` alternative tokens as siblings, each
    followed by the rest of the chain (a one-token substitution), within the node budget and
    ``depth``. ``chain`` occupies nodes 0..len-1 of ``tree``."""
    weak = sorted((p, i) for i, p in enumerate(probs) if p < policy.tree_threshold)
    for _, i in weak:
        for tok, p in alts[i][: policy.tree_top_k]:
            room = policy.tree_budget - len(tree)
            if room <= 0:
                return
            if tok == chain[i]:
                continue
            tail = chain[i + 1 : min(len(chain), depth)]
            branch = ([tok] + tail)[:room]
            tree.add_branch(branch, ROOT if i == 0 else i - 1, [p] + probs[i + 1 : i + len(branch)])


# ------------------------------------------------------------------------------------------------
# A draft SpeechLLM
# ------------------------------------------------------------------------------------------------


class SpeechLLMDrafter(Drafter):
    """A draft SpeechLLM (its own projector, prompt and LLM; usually a ``SubsetHeadLM``) with its
    own KV cache. Batch size 1.

    The draft reads the target encoder's output (the encoder is shared and frozen, so it runs
    once) unless ``share_encoder`` is False, when the draft runs its own encoder on the features
    (counted as draft time).

    Per proposal: one forward feeds the committed tokens the draft has not seen (after rolling
    its cache back to the longest prefix it shares with the committed tokens) and yields the
    first draft token; every further draft token costs one forward. The last draft token is
    never fed (if the target accepts it, the next proposal's catch-up forward feeds it).
    """

    name = "model"

    def __init__(self, draft, policy: DraftPolicy | None = None, share_encoder: bool = True):
        super().__init__(policy)
        self.draft = draft
        self.share_encoder = share_encoder
        self._state: DecodeState | None = None
        self._inputs = None
        self._fed: list[int] = []
        self._last: tuple[int, list[int], list[float]] | None = None  # (offset, chain, probs)

    def begin(self, ctx: UtteranceContext) -> None:
        t0 = time.perf_counter()
        if self.share_encoder:
            hidden, lens = ctx.hidden, ctx.hidden_lens
        else:
            hidden, lens = self.draft.encoder(ctx.feats, ctx.feat_lens)
        speech, speech_lens = self.draft.project(hidden, lens)
        self._inputs = self.draft.prompt.generation_inputs(self.draft.llm.get_input_embeddings(), speech, speech_lens)
        self._state, self._fed, self._last = None, [], None
        self._stops = set(ctx.stop_ids)
        self.seconds += time.perf_counter() - t0

    def _leftover(self, committed: Sequence[int]) -> list[int]:
        """What is left of the previous draft to recycle, aligned to continue ``committed``:
        the tokens after the first rejected one, minus those the target has committed since."""
        if self._last is None:
            return []
        offset, chain, _ = self._last
        new = list(committed[offset:])
        m = common_prefix(chain, new)
        if m >= len(chain) or m >= len(new):
            return []  # fully accepted, or cut by a stop/limit
        rest, after = chain[m + 1 :], new[m + 1 :]
        r = common_prefix(rest, after)
        return rest[r:] if r == len(after) else []

    def _step_logits(self, committed: Sequence[int]) -> torch.Tensor:
        """(V,) float32 draft logits for the token after ``committed``; syncs the draft cache."""
        llm = self.draft.llm
        if self._state is None:
            inp = self._inputs
            logits, self._state = prefill(llm, inp.inputs_embeds, inp.attention_mask, inp.position_ids)
            self._fed = []
            self.forwards += 1
            logits = logits[0]
            if not committed:
                return logits
        keep = common_prefix(self._fed, committed)
        drop = len(self._fed) - keep
        if drop:
            rollback(self._state, drop)
        self._fed = list(committed[:keep])
        new = list(committed[keep:])
        if not new:
            # Everything committed is cached, but the logits after it were not kept: re-feed the
            # last token (rare: only when the target committed exactly what was fed).
            rollback(self._state, 1)
            new = [self._fed.pop()]
        ids = torch.tensor([new], dtype=torch.long, device=self._inputs.inputs_embeds.device)
        logits = extend(llm, self._state, ids, logits_to_keep=1)[0, -1]
        self._fed += new
        self.forwards += 1
        return logits

    @torch.no_grad()
    def propose(self, committed: Sequence[int], depth: int) -> TokenTree:
        policy = self.policy
        depth = min(depth, policy.max_draft)
        if depth <= 0:
            return TokenTree()
        t0 = time.perf_counter()
        leftover = self._leftover(committed) if policy.recycle else []
        logits = self._step_logits(committed)
        chain: list[int] = []
        probs: list[float] = []
        alts: list[list[tuple[int, float]]] = []
        k_alt = policy.tree_top_k + 1 if policy.tree else 1
        while True:
            p = torch.softmax(logits, -1)
            top_p, top_i = p.topk(k_alt)
            tok, prob = int(top_i[0]), float(top_p[0])
            chain.append(tok)
            probs.append(prob)
            alts.append(list(zip(top_i[1:].tolist(), top_p[1:].tolist())))
            if tok in self._stops or len(chain) >= depth or (policy.adaptive and prob < policy.threshold):
                break
            if leftover:
                hit = next((j for j, t in enumerate(leftover[: policy.recycle_window]) if t == tok), None)
                if hit is not None:
                    # Lined up with the old draft again: its rest is reused without drafting.
                    reuse = []
                    for t in leftover[hit + 1 :]:
                        if len(chain) + len(reuse) >= depth:
                            break
                        reuse.append(t)
                        if t in self._stops:
                            break
                    chain += reuse
                    probs += [1.0] * len(reuse)
                    alts += [[] for _ in reuse]
                    break
            ids = torch.tensor([[tok]], dtype=torch.long, device=logits.device)
            logits = extend(self.draft.llm, self._state, ids, logits_to_keep=1)[0, -1]
            self._fed.append(tok)
            self.forwards += 1
        self._last = (len(committed), chain, probs)
        tree = TokenTree.chain(chain, probs)
        if policy.tree:
            add_alternatives(tree, chain, probs, alts, policy, depth)
        self.seconds += time.perf_counter() - t0
        return tree


def rollback(state: DecodeState, n: int) -> None:
    """Forget the last ``n`` cached positions of a batch-1 decode state (cache, mask, position).

    Uses ``DynamicCache.crop(-n)``: in transformers 5.x a negative argument removes that many
    positions, a positive one is refused (pinned in tests/test_speculative.py).
    """
    if n <= 0:
        return
    state.cache.crop(-n)
    state.attention_mask = state.attention_mask[:, :-n]
    state.next_position = state.next_position - n


# ------------------------------------------------------------------------------------------------
# A token sequence (CTC, oracle)
# ------------------------------------------------------------------------------------------------
