"""Sparse token trees for speculative decoding: layout, attention mask, positions, acceptance,
and compaction of the KV cache to the accepted path.

A draft is a tree of candidate tokens hanging below a *root*: the last position the target has
already been given (the pending token, or the end of the prompt). A plain draft is the special
case of a chain. Nodes are stored in topological order (every parent before its children), so
one target forward over ``lead + nodes`` scores every branch at once when each node attends
only to the cache, the lead positions and its own ancestors (and itself), and sits at the
position ``root position + depth``. The target's logits at a node then equal the logits of
running that node's branch alone (tests pin it).

Masks follow the facts in DESIGN.md: a 4-D mask handed to a transformers 5.x Llama must be an
additive float mask (0 where attended, dtype min elsewhere) of shape (B, 1, Q, P + Q); a boolean
one is silently wrong under eager attention. FlashAttention-2 cannot take it (use sdpa/eager).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

ROOT = -1  # parent index of the root's children


@dataclass
class TokenTree:
    """Candidate tokens below a root, topologically ordered.

    tokens: token id of each node.
    parents: index of each node's parent node, ``ROOT`` (-1) for the root's children.
    probs: the drafter's confidence in each node (informational; 1.0 when unknown).
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)

    @classmethod
    def chain(cls, tokens: Sequence[int], probs: Sequence[float] | None = None) -> TokenTree:
        """A linear draft: node i is the parent of node i + 1."""
        tokens = [int(t) for t in tokens]
        probs = [1.0] * len(tokens) if probs is None else [float(p) for p in probs]
        return cls(tokens, [i - 1 for i in range(len(tokens))], probs)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, prob: float = 1.0) -> int:
        """Append a node below ``parent`` (a node index or ``ROOT``); returns its index."""
        if parent != ROOT and not 0 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a node of this {len(self.tokens)}-node tree")
        self.tokens.append(int(token))
        self.parents.append(int(parent))
        self.probs.append(float(prob))
        return len(self.tokens) - 1

    def add_branch(self, tokens: Sequence[int], parent: int, probs: Sequence[float] | None = None) -> list[int]:
        """Append a chain of nodes below ``parent``; returns their indices (siblings are not merged)."""
        probs = [1.0] * len(tokens) if probs is None else probs
        idx = []
        for tok, p in zip(tokens, probs):
            parent = self.add(tok, parent, p)
            idx.append(parent)
        return idx

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for the root's children."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p == ROOT else depth[p] + 1)
        return depth

    def children(self, node: int) -> list[int]:
        """Indices of the children of ``node`` (or of the root for ``ROOT``), in node order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def branch(self, node: int) -> list[int]:
        """Token ids from the root's child down to ``node`` (inclusive)."""
        path = []
        while node != ROOT:
            path.append(self.tokens[node])
            node = self.parents[node]
        return path[::-1]

    def ancestry(self) -> torch.Tensor:
        """(Q, Q) bool: [i, j] True when node j is node i or one of its ancestors."""
        q = len(self.tokens)
        anc = torch.zeros(q, q, dtype=torch.bool)
        for i, p in enumerate(self.parents):
            if p != ROOT:
                anc[i] = anc[p]
            anc[i, i] = True
        return anc


def tree_attention_mask(tree: TokenTree, past: int, lead: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Additive mask (1, 1, lead + Q, past + lead + Q) for one forward over ``lead`` ordinary
    positions followed by the tree's Q nodes, with ``past`` positions already cached.

    Lead positions are causal among themselves; every node sees the cache, the whole lead, and
    its own ancestors and itself. 0 = attend, ``torch.finfo(dtype).min`` = masked (batch size 1,
    no padding).
    """
    q = len(tree)
    allowed = torch.zeros(lead + q, past + lead + q, dtype=torch.bool)
    allowed[:, :past] = True
    allowed[:lead, past : past + lead] = torch.ones(lead, lead, dtype=torch.bool).tril()
    allowed[lead:, past : past + lead] = True
    allowed[lead:, past + lead :] = tree.ancestry()
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def tree_position_ids(tree: TokenTree, next_position: int, lead: int, device=None) -> torch.Tensor:
    """(1, lead + Q) position ids: the lead continues from ``next_position``; a node sits at
    ``next_position + lead - 1 + depth`` (its place on its own branch)."""
    lead_pos = list(range(next_position, next_position + lead))
    base = next_position + lead - 1
    return torch.tensor([lead_pos + [base + d for d in tree.depths()]], dtype=torch.long, device=device)


@dataclass
class Acceptance:
    """Outcome of greedy verification of a tree.

    path: accepted node indices, root to leaf (tokens = the draft's tokens on that path).
    tokens: token ids of the path, then the target's own next token (the bonus); the whole list
        is what this verification commits (before stop/limit handling).
    logits_rows: for each entry of ``tokens``, the row of the verification logits that
        predicted it (0 = the root's row, 1 + i = node i's row).
    """

    path: list[int]
    tokens: list[int]
    logits_rows: list[int]


def greedy_accept(tree: TokenTree, logits: torch.Tensor, margin: float = 0.0) -> Acceptance:
    """Walk the tree along the target's argmax.

    Args:
        logits: (1 + Q, V) target logits: row 0 at the root (predicts the root's children),
            row 1 + i at node i (predicts node i's children).
        margin: 0 (lossless): a drafted token is accepted only where it is the target's argmax.
            > 0 (relaxed, lossy): also where the target's log-probability of it is within
            ``margin`` nats of its best (among such children, the likeliest).

    Returns:
        the longest path whose every token the target accepts at its parent, plus the argmax
        after it (the bonus token).
    """
    best = logits.argmax(-1).tolist()
    log_probs = logits.float().log_softmax(-1) if margin > 0 else None
    kids: dict[int, dict[int, int]] = {}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        kids.setdefault(p, {}).setdefault(tok, i)  # first sibling wins among duplicates
    node, row, path, tokens, rows = ROOT, 0, [], [], []
    while True:
        options = kids.get(node, {})
        child = options.get(best[row])
        if child is None and log_probs is not None and options:
            scores = log_probs[row]
            tok = max(options, key=lambda t: float(scores[t]))
            if float(scores[tok]) >= float(scores[best[row]]) - margin:
                child = options[tok]
        tokens.append(best[row] if child is None else tree.tokens[child])
        rows.append(row)
        if child is None:
            return Acceptance(path, tokens, rows)
        path.append(child)
        node, row = child, 1 + child


def compact_cache(cache, keep: torch.Tensor) -> None:
    """Keep only cached positions ``keep`` (K,) long, in that order, in every layer of a
    ``DynamicCache`` (in place): after tree verification the accepted path's entries move next
    to the prefix, and the rejected branches' entries go.

    Sliding-window layers are refused: their buffers are not indexed by absolute position.
    """
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("tree verification with sliding-window cache layers is not supported")
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        idx = keep.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)
        layer.values = layer.values.index_select(-2, idx)
