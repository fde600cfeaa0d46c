"""Lossless speculative decoding of a SpeechLLM (greedy acceptance), one utterance at a time.

Per utterance (batch size 1; a batch is decoded utterance by utterance)::

    encoder (once, shared) -> target projector -> target prompt
    drafter.begin(...)                                   # draft projector / CTC sequence
    loop:
        draft = drafter.propose(committed, depth)         # a token chain or sparse tree
        one target forward over [lead] + draft            # lead = prompt (first pass) or the
                                                          # pending token (the last bonus)
        accept the longest draft path equal to the target's argmax, plus the target's own next
        token (the bonus); roll the target's KV cache back to the accepted path

The first target forward is the prompt prefill *fused* with verifying the first draft (for the
CTC drafter that can be the whole transcript). Output equals greedy autoregressive decoding of
the target token for token (fp32; same stop tokens, same length limit
``SpeechLLM.max_new_tokens_for``), whatever the drafter proposes. With :class:`NoDrafter` the
loop is autoregressive greedy decoding itself, the baseline in the same harness.

``accept_margin`` > 0 relaxes the acceptance (lossy, off by default): a drafted token is also
taken where the target finds it within that many nats of its best. The output then depends on
the draft; with the transcript a transcript LLM reads as the draft, it is greedy generation that
keeps a read word unless the LLM is sure of another (README Results).

The target LLM is only called through ``efin.decoding.llm_search.forward_step`` (one place to
follow transformers' keyword changes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch

from efin.decoding.drafters import Drafter, DraftPolicy, NoDrafter, SpeechLLMDrafter, UtteranceContext, rollback
from efin.decoding.llm_search import DecodeState, Hypothesis, forward_step, new_cache
from efin.decoding.loops import trim_loop
from efin.decoding.sequence_drafters import CTCDrafter, TranscriptDrafter
from efin.decoding.tree import TokenTree, compact_cache, greedy_accept, tree_attention_mask, tree_position_ids
from efin.models.protocols import TranscriptInput
from efin.models.weights import same_weights

log = logging.getLogger(__name__)


@dataclass
class SpeculativeConfig(DraftPolicy):
    """``decode.speculative``: which draft, and how it drafts (fields of :class:`DraftPolicy`).

    draft: ``"ctc"`` (the target's own CTC projector), ``"none"`` (autoregressive greedy in the
        same harness), or the name of a draft stage run / artifact, which the caller resolves to
        a built draft ``SpeechLLM`` and passes to :func:`make_drafter`.

    Unlike a bare :class:`DraftPolicy`, ``adaptive`` and ``recycle`` are on: chosen on 40 dev
    utterances of chain c6, where the CTC draft was 1.38x faster than greedy with both, 1.27x
    without (``scripts/bench_specdec_dev_ctc_k.json``).
    """

    draft: str = "ctc"
    adaptive: bool = True
    recycle: bool = True
    accept_margin: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.accept_margin < 0:
            raise ValueError(f"decode.speculative.accept_margin must be >= 0 (nats; 0 = lossless), "
                             f"got {self.accept_margin}")

    @property
    def policy(self) -> DraftPolicy:
        names = {f.name for f in fields(DraftPolicy)}
        return DraftPolicy(**{k: v for k, v in asdict(self).items() if k in names})


@dataclass
class UtteranceStats:
    """Speculative decoding statistics of one utterance.

    Per target forward pass i (the first is the prompt prefill fused with the first draft):
    ``accepted[i]`` tokens committed by it - the accepted draft tokens plus the target's own
    bonus token, the stop token counted as a token; so ``sum(accepted)`` equals the
    hypothesis' ``length`` (tokens + stop token); ``accepted_draft[i]`` of those came from the
    draft; ``drafted[i]`` draft tokens (tree nodes) it verified; ``draft_depth[i]`` the
    deepest branch (= ``drafted`` for a chain).

    Seconds: ``encoder_s`` encoder + target projector + prompt; ``prefill_s`` the first target
    forward (prompt + first draft); ``draft_s`` everything the drafter did (its projector and
    prefill included); ``verify_s`` the other target forwards.
    """

    target_forwards: int = 0
    draft_forwards: int = 0
    accepted: list[int] = field(default_factory=list)
    accepted_draft: list[int] = field(default_factory=list)
    drafted: list[int] = field(default_factory=list)
    draft_depth: list[int] = field(default_factory=list)
    encoder_s: float = 0.0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def committed(self) -> int:
        return sum(self.accepted)

    @property
    def mean_accepted(self) -> float:
        """Tokens committed per target forward (bonus token included)."""
        return self.committed / max(self.target_forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        """Share of verified draft tokens that were committed (tree nodes off the path count as
        not accepted); 0 when nothing was drafted."""
        return sum(self.accepted_draft) / max(sum(self.drafted), 1)

    @property
    def total_s(self) -> float:
        return self.encoder_s + self.prefill_s + self.draft_s + self.verify_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(committed=self.committed, mean_accepted=self.mean_accepted, acceptance_rate=self.acceptance_rate)
        return out


def summarize(stats: Sequence[UtteranceStats]) -> dict:
    """Totals and means over utterances.

    ``mean_accepted_length``: committed tokens per target forward over the whole set (bonus
    token included); ``acceptance_rate``: committed draft tokens / verified draft tokens;
    ``mean_draft_length``: draft tokens per target forward that verified any.
    """
    n = len(stats)
    forwards = sum(s.target_forwards for s in stats)
    committed = sum(s.committed for s in stats)
    drafted = [d for s in stats for d in s.drafted if d]
    out = {
        "utterances": n,
        "committed_tokens": committed,
        "target_forwards": forwards,
        "draft_forwards": sum(s.draft_forwards for s in stats),
        "target_forwards_per_utt": forwards / max(n, 1),
        "draft_forwards_per_utt": sum(s.draft_forwards for s in stats) / max(n, 1),
        "mean_accepted_length": committed / max(forwards, 1),
        "acceptance_rate": sum(sum(s.accepted_draft) for s in stats) / max(sum(sum(s.drafted) for s in stats), 1),
        "mean_draft_length": sum(drafted) / max(len(drafted), 1),
    }
    for key in ("encoder_s", "prefill_s", "draft_s", "verify_s", "total_s"):
        out[key] = sum(getattr(s, key) for s in stats)
    return out


def make_drafter(target, draft, policy: DraftPolicy | None = None) -> Drafter:
    """A drafter for ``target`` (a SpeechLLM).

    draft: ``"ctc"`` (the target's CTC projector, or the transcript its projector reads),
        ``None`` / ``"none"`` (no drafting: autoregressive greedy), or a built draft SpeechLLM
        sharing the target's tokenizer.
    """
    policy = policy or DraftPolicy()
    if draft is None or draft == "none":
        return NoDrafter(policy)
    if draft == "ctc":
        if target.has_ctc:
            return CTCDrafter(target.projector, policy)
        if isinstance(target.projector, TranscriptInput):
            return TranscriptDrafter(target.projector, policy, target.tokenizer)
        raise ValueError("draft='ctc' needs a target whose projector has a CTC head (projector=ctc) or reads the "
                         "encoder's CTC transcript (projector=transcript)")
    if isinstance(draft, str):
        raise ValueError(f"draft {draft!r}: resolve a draft stage run to a built SpeechLLM first")
    if draft.prompt.end_id != target.prompt.end_id or len(draft.tokenizer) != len(target.tokenizer):
        raise ValueError("the draft must share the target's tokenizer (same ids, same end token)")
    share = same_weights(target.encoder, draft.encoder)  # equal encoders: the draft reuses the target's output
    # A draft of a transcript LLM reads the very transcript its target reads (greedy or CTC + word LM).
    transcripts = isinstance(draft.projector, TranscriptInput) and isinstance(target.projector, TranscriptInput)
    if share and transcripts and not draft.projector.read_from(target.projector):
        log.warning("the draft's transcript projector has another CTC head than the target's: it reads "
                    "its own %s transcript", draft.projector.ctc_decoding)
    return SpeechLLMDrafter(draft, policy, share_encoder=share)


class SpeculativeDecoder:
    """Greedy speculative decoding of ``target`` with ``drafter``; lossless unless ``accept_margin`` > 0.

    Batch size 1 inside; :meth:`decode` takes a padded batch and decodes it utterance by
    utterance. ``stats`` holds the :class:`UtteranceStats` of the last :meth:`decode` call.
    """

    def __init__(self, target, drafter: Drafter | None = None, accept_margin: float = 0.0):
        self.target = target
        self.drafter = drafter or NoDrafter()
        self.accept_margin = accept_margin  # > 0: relaxed acceptance (greedy_accept), not lossless
        self.stats: list[UtteranceStats] = []

    @classmethod
    def from_config(cls, target, config: SpeculativeConfig | dict, draft=None) -> SpeculativeDecoder:
        """Build from ``decode.speculative`` (a :class:`SpeculativeConfig` or its fields as a
        mapping). ``config.draft`` ``"ctc"`` / ``"none"`` need nothing more; any other value
        names a draft stage run, which the caller builds and passes as ``draft`` (a SpeechLLM)."""
        if not isinstance(config, SpeculativeConfig):
            config = SpeculativeConfig(**dict(config))
        if config.draft in ("ctc", "none"):
            if draft is not None:
                raise ValueError(f"draft={config.draft!r} takes no draft model")
            return cls(target, make_drafter(target, config.draft, config.policy), config.accept_margin)
        if draft is None:
            raise ValueError(f"draft {config.draft!r} names a draft model: build it and pass draft=")
        return cls(target, make_drafter(target, draft, config.policy), config.accept_margin)

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, feats: torch.Tensor, feat_lens: torch.Tensor, max_new_tokens=None) -> list[Hypothesis]:
        """feats (B, T, F), feat_lens (B,) -> B hypotheses (greedy's, token for token).

        max_new_tokens: None (each utterance's ``target.max_new_tokens_for``), an int, or (B,).
        Hypotheses that reach the limit lose a trailing loop when ``target.trim_loops`` (as greedy).
        """
        limits = max_new_tokens
        if limits is None or isinstance(limits, int):
            limits = [limits] * feats.shape[0]
        limits = [None if x is None else int(x) for x in (limits.tolist() if torch.is_tensor(limits) else limits)]
        hyps, self.stats = [], []
        for b in range(feats.shape[0]):
            n = int(feat_lens[b])
            hyp, st = self.decode_one(feats[b : b + 1, :n], feat_lens[b : b + 1], limits[b])
            hyps.append(trim_loop(hyp) if self.target.trim_loops else hyp)
            self.stats.append(st)
        return hyps

    @torch.no_grad()
    def generate(self, feats: torch.Tensor, feat_lens: torch.Tensor, max_new_tokens=None) -> list[str]:
        """Like ``SpeechLLM.generate``: B transcripts."""
        hyps = self.decode(feats, feat_lens, max_new_tokens)
        tok = self.target.tokenizer
        return [tok.decode(h.tokens, skip_special_tokens=True).strip() for h in hyps]

    @torch.no_grad()
    def decode_one(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, limit: int | None = None
    ) -> tuple[Hypothesis, UtteranceStats]:
        """One utterance: feats (1, T, F), feat_lens (1,), at most ``limit`` generated tokens
        (stop token included; None: the target's ``max_new_tokens_for``, as greedy decoding)
        -> its hypothesis and statistics."""
        if feats.shape[0] != 1:
            raise ValueError(f"decode_one takes one utterance, got a batch of {feats.shape[0]}")
        target, drafter = self.target, self.drafter
        hyp, st = Hypothesis([], 0.0), UtteranceStats()
        if limit is not None and limit <= 0:
            return hyp, st
        stops = set(target.prompt.stop_ids)

        t0 = time.perf_counter()
        hidden, hidden_lens = target.encoder(feats, feat_lens)
        speech, speech_lens = target.project(hidden, hidden_lens)
        if limit is None:
            limit = int(target.max_new_tokens_for(feat_lens, speech_lens)[0])
        embed = target.llm.get_input_embeddings()
        inputs = target.prompt.generation_inputs(embed, speech, speech_lens)
        st.encoder_s = time.perf_counter() - t0

        drafter.reset_counters()
        ctx = UtteranceContext(
            feats, feat_lens, hidden, hidden_lens, target.prompt.end_id, tuple(target.prompt.stop_ids)
        )
        drafter.begin(ctx)

        lead, state = inputs.inputs_embeds, None
        while True:
            depth = limit - len(hyp.tokens) - 1  # the bonus token takes the last slot
            tree = drafter.propose(list(hyp.tokens), depth)
            tree_depth = max(tree.depths(), default=0)
            if tree_depth > max(depth, 0):
                raise ValueError(f"{type(drafter).__name__} proposed {tree_depth} tokens deep, allowed {depth}")

            t0 = time.perf_counter()
            logits, state, past = verify(target.llm, state, lead, tree)
            acc = greedy_accept(tree, logits, self.accept_margin)
            log_probs = logits.log_softmax(-1)
            committed, done = 0, False
            for tok, row in zip(acc.tokens, acc.logits_rows):
                hyp.log_prob += float(log_probs[row, tok])
                committed += 1
                if tok in stops:
                    hyp.stop_token, done = tok, True
                    break
                hyp.tokens.append(tok)
                if len(hyp.tokens) >= limit:
                    done = True
                    break
            if not done:
                keep_path(state, tree, acc.path, past, lead.shape[1])
                lead = embed(torch.tensor([[acc.tokens[-1]]], device=lead.device))
            elapsed = time.perf_counter() - t0
            if st.target_forwards == 0:
                st.prefill_s += elapsed
            else:
                st.verify_s += elapsed
            st.target_forwards += 1
            st.accepted.append(committed)
            st.accepted_draft.append(min(len(acc.path), committed))
            st.drafted.append(len(tree))
            st.draft_depth.append(tree_depth)
            if done:
                break
        st.draft_forwards, st.draft_s = drafter.forwards, drafter.seconds
        return hyp, st


def verify(
    llm, state: DecodeState | None, lead: torch.Tensor, tree: TokenTree
) -> tuple[torch.Tensor, DecodeState, int]:
    """One target forward over ``lead`` (1, L, H) embeddings and the tree's Q draft tokens.

    ``state`` None starts a new cache (``lead`` is then the whole prompt, positions from 0).
    A chain uses the ordinary 2-D mask; a branching tree the additive 4-D tree mask with
    depth-based positions.

    Returns:
        logits (1 + Q, V) float32 - row 0 at the last lead position (predicts the first draft
        token), row 1 + i at node i; the state, now caching all L + Q positions; and ``past``,
        the cached length before this forward.
    """
    q, width = len(tree), lead.shape[1]
    if state is None:
        past, start = 0, 0
        state = DecodeState(new_cache(llm), torch.ones(1, 0, dtype=torch.long, device=lead.device), None)
    else:
        past, start = state.attention_mask.shape[1], int(state.next_position[0])
    x = lead
    if q:
        ids = torch.tensor([tree.tokens], dtype=torch.long, device=lead.device)
        x = torch.cat([lead, llm.get_input_embeddings()(ids).to(lead.dtype)], dim=1)
    if tree.is_chain:
        mask = torch.ones(1, past + width + q, dtype=torch.long, device=lead.device)
        positions = torch.arange(start, start + width + q, device=lead.device)[None]
    else:
        mask = tree_attention_mask(tree, past, width, x.dtype, lead.device)
        positions = tree_position_ids(tree, start, width, lead.device)
    logits = forward_step(llm, state.cache, mask, positions, inputs_embeds=x, logits_to_keep=q + 1)[0]
    state.attention_mask = torch.ones(1, past + width + q, dtype=torch.long, device=lead.device)
    state.next_position = torch.tensor([start + width + q], device=lead.device)
    return logits, state, past


def keep_path(state: DecodeState, tree: TokenTree, path: list[int], past: int, lead: int) -> None:
    """After :func:`verify`, keep in the cache only the lead and the accepted ``path`` nodes:
    a chain is cropped (``DynamicCache.crop(-n)``), a tree compacted (index select)."""
    q = len(tree)
    if tree.is_chain:
        rollback(state, q - len(path))
        return
    device = state.attention_mask.device
    keep = torch.cat([torch.arange(past + lead), past + lead + torch.tensor(path, dtype=torch.long)]).to(device)
    compact_cache(state.cache, keep)
    state.attention_mask = torch.ones(1, keep.numel(), dtype=torch.long, device=device)
    state.next_position = state.next_position - (q - len(path))
