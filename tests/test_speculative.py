"""Speculative decoding: lossless against greedy for every drafter and mechanism, tree
verification equal to running each branch alone, cache rollback, statistics that add up."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from efin.decoding.drafters import DraftPolicy, SpeechLLMDrafter, UtteranceContext, rollback
from efin.decoding.generate import decode as llm_decode
from efin.decoding.llm_search import extend, prefill
from efin.decoding.sequence_drafters import DraftSequence, SequenceDrafter, ctc_draft_sequence
from efin.decoding.speculative import (
    SpeculativeConfig,
    SpeculativeDecoder,
    keep_path,
    make_drafter,
    summarize,
    verify,
)
from efin.decoding.tree import ROOT, TokenTree, greedy_accept, tree_attention_mask, tree_position_ids
from efin.models.draft import build_draft_llm
from efin.models.llm import build_tiny_llm
from efin.models.projector import StackingMLPProjector, TokenCTCProjector
from efin.models.speech_llm import SpeechLLM
from tests.conftest import LinearEncoder, padded_feature_batch

MAX_NEW = 24
LETTERS = "abcdefgh"


def _target(attn="sdpa"):
    torch.manual_seed(0)
    llm, tok = build_tiny_llm(attn_implementation=attn)
    proj = TokenCTCProjector(16, 64, vocab_size=len(LETTERS), stack=1, hidden_dim=32, kernel_size=3)
    proj.set_vocabulary(
        torch.tensor(sorted(tok.convert_tokens_to_ids(list(LETTERS)))), llm.get_input_embeddings().weight
    )
    return SpeechLLM(LinearEncoder(), proj, llm, tok, instruction="Transcribe.").eval()


@pytest.fixture(scope="module")
def target():
    return _target()


@pytest.fixture(scope="module")
def draft(target):
    """A random 1-layer draft with its own projector: it disagrees with the target a lot."""
    torch.manual_seed(1)
    dllm, tok = build_draft_llm((target.llm, target.tokenizer), num_layers=1, head_rows=48)
    proj = StackingMLPProjector(16, 64, stack=2, hidden_dim=32)
    return SpeechLLM(target.encoder, proj, dllm, tok, instruction="Transcribe.").eval()


class _Perturbed(nn.Module):
    """The target's own LLM, but at every position p with p % period == phase its argmax is
    replaced by ``token``: a draft that agrees except for local substitutions (recycling's case)."""

    def __init__(self, llm, token: int, period: int = 5, phase: int = 3):
        super().__init__()
        self.llm, self.token, self.period, self.phase = llm, token, period, phase

    @property
    def config(self):
        return self.llm.config

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def forward(self, **kwargs):
        out = self.llm(**kwargs)
        logits = out.logits
        pos = kwargs["position_ids"][..., -logits.shape[1] :]
        hit = (pos % self.period == self.phase)[..., None]
        boost = torch.zeros_like(logits)
        boost[..., self.token] = 1e4
        out.logits = torch.where(hit, logits + boost, logits)
        return out


@pytest.fixture(scope="module")
def batch():
    return padded_feature_batch()


@pytest.fixture(scope="module")
def greedy(target, batch):
    feats, lens = batch
    hyps = llm_decode(target, feats, lens, max_new_tokens=MAX_NEW)
    # not trivial: some utterances stop on the end token, others run to the limit
    assert {h.stop_token is None for h in hyps} == {True, False}
    return hyps


def _full(h):
    """Tokens + stop token: what the target commits."""
    return h.tokens + ([h.stop_token] if h.stop_token is not None else [])


def _feeder(seqs):
    it = iter(list(seqs))
    return lambda ctx: next(it)


def _check(dec, hyps, ref):
    assert [h.tokens for h in hyps] == [r.tokens for r in ref]
    assert [h.stop_token for h in hyps] == [r.stop_token for r in ref]
    for h, r, st in zip(hyps, ref, dec.stats):
        assert st.committed == h.length  # bonus and stop token included
        assert st.target_forwards == len(st.accepted) == len(st.drafted)
        assert all(a >= 1 for a in st.accepted)  # every target forward commits its bonus at least
        assert all(0 <= a <= d for a, d in zip(st.accepted_draft, st.drafted))
        assert h.log_prob == pytest.approx(r.log_prob, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# transformers facts the loop relies on
# ------------------------------------------------------------------------------------------------


def test_dynamic_cache_crop_removes_a_negative_count():
    """Pinned: crop(-n) drops the last n positions; a positive argument is refused."""
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 7, 4), torch.arange(7.0).view(1, 1, 7, 1).expand(1, 2, 7, 4), layer_idx=0)
    cache.crop(-3)
    assert cache.get_seq_length() == 4
    assert cache.layers[0].values[0, 0, :, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        cache.crop(2)


def test_rollback_then_extend_matches_never_feeding(target, batch):
    feats, lens = batch
    inputs = target.generation_inputs(feats[:1], lens[:1])
    llm = target.llm
    _, state = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    extend(llm, state, torch.tensor([[40, 41, 42]]))
    rollback(state, 2)  # keep 40 only
    got = extend(llm, state, torch.tensor([[50, 51]]))
    _, fresh = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    want = extend(llm, fresh, torch.tensor([[40, 50, 51]]))[:, 1:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert state.cache.get_seq_length() == fresh.cache.get_seq_length()


# ------------------------------------------------------------------------------------------------
# the token tree
# ------------------------------------------------------------------------------------------------


def _tree() -> TokenTree:
    tree = TokenTree.chain([40, 41, 42])
    tree.add_branch([50, 51], ROOT)  # sibling of 40
    tree.add_branch([60], 0)  # sibling of 41
    tree.add(70, 1)  # sibling of 42
    return tree


def test_tree_layout():
    tree = _tree()
    assert tree.depths() == [1, 2, 3, 1, 2, 2, 3]
    assert tree.branch(6) == [40, 41, 70] and tree.branch(4) == [50, 51]
    assert not tree.is_chain and TokenTree.chain([1, 2]).is_chain
    mask = tree_attention_mask(tree, past=5, lead=2, dtype=torch.float32)
    assert mask.shape == (1, 1, 2 + 7, 5 + 2 + 7) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert allowed[:, :5].all() and not allowed[0, 6] and allowed[1, 5:7].all()  # causal lead
    assert allowed[2 + 6, 7:].tolist() == [True, True, False, False, False, False, True]  # 70: 40, 41, itself
    assert tree_position_ids(tree, 10, lead=2).tolist() == [[10, 11, 12, 13, 14, 12, 13, 13, 14]]


def test_greedy_accept_walks_the_argmax():
    tree = _tree()
    logits = torch.zeros(8, 100)
    logits[0, 40] = logits[1, 41] = logits[2, 99] = 1  # root -> 40 -> 41 -> bonus 99
    acc = greedy_accept(tree, logits)
    assert acc.path == [0, 1] and acc.tokens == [40, 41, 99] and acc.logits_rows == [0, 1, 2]
    logits[0] = 0
    logits[0, 50] = logits[1 + 3, 51] = logits[1 + 4, 7] = 1  # root -> 50 -> 51 -> bonus 7
    acc = greedy_accept(tree, logits)
    assert acc.path == [3, 4] and acc.tokens == [50, 51, 7]


def test_relaxed_acceptance_takes_drafted_tokens_within_the_margin():
    """accept_margin > 0: a drafted token the target finds almost as likely as its best is taken
    (the likeliest such child); a margin of 0 is exactly greedy acceptance."""
    tree = _tree()  # root -> {40, 50}; 40 -> {41, 60}
    logits = torch.zeros(8, 100)
    logits[0, 99], logits[0, 50], logits[0, 40] = 3.0, 2.6, 2.2  # best 99; 50 is 0.4 nats behind, 40 0.8
    logits[1 + 3, 51] = 1.0  # after 50 the target wants 51: greedy acceptance again
    assert greedy_accept(tree, logits).tokens == [99]
    assert greedy_accept(tree, logits, margin=0.3).tokens == [99]
    acc = greedy_accept(tree, logits, margin=0.5)
    assert acc.path == [3, 4] and acc.logits_rows == [0, 4, 5] and acc.tokens[:2] == [50, 51]
    assert greedy_accept(tree, logits, margin=1.0).path[0] == 3  # 50 (likelier) over 40


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_verification_gives_each_branch_its_own_logits(batch, attn):
    """One forward over a tree (additive 4-D mask, depth positions) scores every node as if its
    branch ran alone; compacting the cache to a path then continues exactly like that branch."""
    model = _target(attn)
    llm = model.llm
    feats, lens = batch
    inputs = model.generation_inputs(feats[1:2, : lens[1]], lens[1:2])
    tree = _tree()
    embed = llm.get_input_embeddings()
    # after the prompt, a pending token 30 is the lead (the usual mid-utterance case)
    _, state = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    logits, state, past = verify(llm, state, embed(torch.tensor([[30]])), tree)
    for node in range(len(tree)):
        _, alone = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        branch = extend(llm, alone, torch.tensor([[30] + tree.branch(node)]))
        torch.testing.assert_close(logits[1 + node], branch[0, -1], rtol=1e-4, atol=1e-4)
        if node == 0:
            torch.testing.assert_close(logits[0], branch[0, 0], rtol=1e-4, atol=1e-4)
    # the prompt itself as the lead (fused prefill) works the same
    fused, _, _ = verify(llm, None, inputs.inputs_embeds, tree)
    _, alone = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    branch = extend(llm, alone, torch.tensor([tree.branch(5)]))
    torch.testing.assert_close(fused[1 + 5], branch[0, -1], rtol=1e-4, atol=1e-4)
    # compaction to the path 40 -> 60, then one more token
    keep_path(state, tree, [0, 5], past, 1)
    assert state.cache.get_seq_length() == past + 3 and int(state.next_position) == past + 3
    after = extend(llm, state, torch.tensor([[77]]))
    _, alone = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    want = extend(llm, alone, torch.tensor([[30, 40, 60, 77]]))[:, -1:]
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# lossless: every drafter and mechanism equals greedy, token for token
# ------------------------------------------------------------------------------------------------

POLICIES = {
    "k1": DraftPolicy(max_draft=1),
    "k4": DraftPolicy(max_draft=4),
    "adaptive": DraftPolicy(max_draft=6, adaptive=True, threshold=0.5),
    "recycle": DraftPolicy(max_draft=4, recycle=True),
    "tree": DraftPolicy(max_draft=4, tree=True, tree_threshold=0.9, tree_top_k=2, tree_budget=10),
    "specasr": DraftPolicy(max_draft=6, adaptive=True, recycle=True, tree=True, tree_threshold=0.9, tree_top_k=2),
}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("drafter", ["model", "ctc", "perturbed"])
def test_speculative_equals_greedy(target, draft, batch, greedy, drafter, policy):
    feats, lens = batch
    if drafter == "perturbed":
        d = SpeechLLM(
            target.encoder, target.projector, _Perturbed(target.llm, token=40), target.tokenizer, prompt=target.prompt
        )
    else:
        d = {"model": draft, "ctc": "ctc"}[drafter]
    dec = SpeculativeDecoder(target, make_drafter(target, d, POLICIES[policy]))
    _check(dec, dec.decode(feats, lens, max_new_tokens=MAX_NEW), greedy)
    assert sum(s.draft_forwards for s in dec.stats) > 0 or drafter == "ctc"


def test_autoregressive_baseline_in_the_same_harness(target, batch, greedy):
    feats, lens = batch
    dec = SpeculativeDecoder(target, make_drafter(target, "none"))
    hyps = dec.decode(feats, lens, max_new_tokens=MAX_NEW)
    _check(dec, hyps, greedy)
    assert [s.target_forwards for s in dec.stats] == [h.length for h in hyps]  # one token per forward
    assert all(s.draft_forwards == 0 and s.accepted_draft == [0] * s.target_forwards for s in dec.stats)


def test_default_length_limits_match_greedy(target, batch, greedy):
    feats, lens = batch
    ref = llm_decode(target, feats, lens)  # max_new_tokens_for
    dec = SpeculativeDecoder(target, make_drafter(target, "ctc", DraftPolicy(max_draft=8, recycle=True)))
    _check(dec, dec.decode(feats, lens), ref)
    for limit in (0, 1, 2):
        ref = llm_decode(target, feats, lens, max_new_tokens=limit)
        dec = SpeculativeDecoder(target, SequenceDrafter(DraftPolicy(max_draft=8), _feeder(_full(h) for h in greedy)))
        _check(dec, dec.decode(feats, lens, max_new_tokens=limit), ref)


def _corrupt(seq, kind):
    seq = list(seq)
    if kind == "right":
        return seq
    if kind == "wrong":
        return [t + 1 if t < 90 else t - 1 for t in seq]
    if kind == "substitute":
        return [(t + 1 if t < 90 else t - 1) if i % 4 == 2 else t for i, t in enumerate(seq)]
    if kind == "delete":  # the draft misses tokens
        return [t for i, t in enumerate(seq) if i % 5 != 3]
    if kind == "insert":  # the draft has extra tokens
        return [u for i, t in enumerate(seq) for u in ([t, 44] if i % 5 == 2 else [t])]
    if kind == "early_end":  # the end token in the middle
        return seq[:3] + [2] + seq[3:]
    if kind == "past_limit":  # runs far past the length limit, no end token
        return [t for t in seq if t != 2] + [45] * 40
    raise ValueError(kind)


KINDS = ["right", "wrong", "substitute", "delete", "insert", "early_end", "past_limit"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "policy",
    [
        DraftPolicy(max_draft=64),
        DraftPolicy(max_draft=3),
        DraftPolicy(max_draft=64, recycle=True),
        DraftPolicy(max_draft=16, recycle=True, tree=True, tree_threshold=1.0, tree_top_k=1, tree_budget=24),
    ],
    ids=["whole", "k3", "recycle", "tree"],
)
def test_oracle_drafts(target, batch, greedy, kind, policy):
    """Sequence drafts that are all right, all wrong, partly right, end early or run past the
    limit: output is greedy's every time."""
    feats, lens = batch
    seqs = [_oracle(_full(h), kind) for h in greedy]
    dec = SpeculativeDecoder(target, SequenceDrafter(policy, _feeder(seqs)))
    hyps = dec.decode(feats, lens, max_new_tokens=MAX_NEW)
    _check(dec, hyps, greedy)
    forwards = [s.target_forwards for s in dec.stats]
    if kind == "right":
        k = policy.max_draft
        assert forwards == [-(-h.length // (k + 1)) for h in greedy]  # k drafted + bonus per forward
        if not policy.tree:  # a tree also verifies (wrong) alternatives
            assert all(s.acceptance_rate == 1.0 for s in dec.stats)
    if kind == "wrong" and not (policy.recycle or policy.tree):  # realigned, t + 1 may fit elsewhere
        assert all(s.accepted_draft == [0] * s.target_forwards for s in dec.stats)
        assert forwards == [h.length for h in greedy]


def _oracle(seq, kind):
    """A corrupted oracle with confidences and alternatives: every third token is weak (0.5);
    a weak substituted token's alternative is the right one, others get a wrong alternative."""
    tokens = _corrupt(seq, kind)
    conf = [0.5 if i % 3 == 2 else 1.0 for i in range(len(tokens))]
    alts = []
    for i, t in enumerate(tokens):
        right = kind == "substitute" and i < len(seq) and seq[i] != t
        alts.append([(seq[i] if right else (t + 1 if t < 90 else t - 1), 0.4)])
    return DraftSequence(tokens, conf, alts)


def test_tree_alternatives_fix_weak_substitutions(target, batch, greedy):
    feats, lens = batch
    seqs = [_oracle(_full(h), "substitute") for h in greedy]
    runs = {}
    for tree in (False, True):
        policy = DraftPolicy(max_draft=16, tree=tree, tree_threshold=0.9, tree_budget=40)
        dec = SpeculativeDecoder(target, SequenceDrafter(policy, _feeder(seqs)))
        _check(dec, dec.decode(feats, lens, max_new_tokens=MAX_NEW), greedy)
        runs[tree] = sum(s.target_forwards for s in dec.stats)
    assert runs[True] < runs[False], runs


def test_recycling_realigns_after_insertions_and_deletions(target, batch, greedy):
    feats, lens = batch
    for kind in ("delete", "insert"):
        seqs = [_corrupt(_full(h), kind) for h in greedy]
        runs = {}
        for recycle in (False, True):
            dec = SpeculativeDecoder(target, SequenceDrafter(DraftPolicy(max_draft=64, recycle=recycle), _feeder(seqs)))
            _check(dec, dec.decode(feats, lens, max_new_tokens=MAX_NEW), greedy)
            runs[recycle] = sum(s.target_forwards for s in dec.stats)
        assert runs[True] < runs[False], (kind, runs)


def test_text_draft_realigns_by_whole_words():
    """A target that respells a word it reads in other tokens ("crim inally" -> "severely") or
    joins two ("fanatic" + " ism" -> "fanaticism"): with the tokens' text, recycling resumes the
    draft at the next word; by tokens alone it proposes the rest of the respelt word."""
    text = {1: "the", 2: " garden", 3: " was", 4: " crim", 5: "inally", 6: " neglected", 7: " severely",
            8: "fan", 9: "atic", 10: " is", 11: "m", 12: " consists", 13: "ism"}
    end = 99
    ctx = UtteranceContext(None, None, None, None, end, (end,))
    cases = [([1, 2, 3, 4, 5, 6, end], [1, 2, 3, 7], [6, end], [5, 6, end]),
             ([8, 9, 10, 11, 12, end], [8, 9, 13], [12, end], [11, 12, end])]
    for seq, committed, by_words, by_tokens in cases:
        for token_text, resumed in ((text.get, by_words), (None, by_tokens)):
            policy = DraftPolicy(max_draft=64, recycle=True)
            drafter = SequenceDrafter(policy, lambda ctx, s=seq: s, token_text=token_text)
            drafter.begin(ctx)
            assert drafter.propose([], 64).tokens == seq
            assert drafter.propose(committed, 64).tokens == resumed, (committed, token_text)


def test_model_draft_recycles_after_a_substitution(target, batch, greedy):
    """A draft that is right except at every 5th position: after each rejection its new token
    lines up with the rest of the old draft, which is reused without drafting it again."""
    feats, lens = batch
    d = SpeechLLM(
        target.encoder, target.projector, _Perturbed(target.llm, token=40), target.tokenizer, prompt=target.prompt
    )
    forwards = {}
    for recycle in (False, True):
        drafter = make_drafter(target, d, DraftPolicy(max_draft=8, recycle=recycle))
        assert isinstance(drafter, SpeechLLMDrafter) and drafter.share_encoder
        dec = SpeculativeDecoder(target, drafter)
        _check(dec, dec.decode(feats, lens, max_new_tokens=MAX_NEW), greedy)
        forwards[recycle] = sum(s.draft_forwards for s in dec.stats)
    assert forwards[True] < forwards[False], forwards


def test_target_as_its_own_draft_needs_few_passes(target, batch, greedy):
    feats, lens = batch
    dec = SpeculativeDecoder(target, make_drafter(target, target, DraftPolicy(max_draft=8)))
    _check(dec, dec.decode(feats, lens, max_new_tokens=MAX_NEW), greedy)
    assert [s.target_forwards for s in dec.stats] == [-(-h.length // 9) for h in greedy]


# ------------------------------------------------------------------------------------------------
# CTC sequence, statistics, config
# ------------------------------------------------------------------------------------------------


def test_ctc_draft_sequence_collapses_runs_with_confidence():
    vocab = torch.tensor([10, 11, 12])
    # frames: a a blank a b b  -> tokens 10, 10, 11 (blank separates the repeat)
    best = [1, 1, 0, 1, 2, 2]
    logits = torch.full((6, 4), -5.0)
    for t, c in enumerate(best):
        logits[t, c] = 3.0 + t  # later frames more confident
    logits[4, 3] = 6.0  # token 12 runs second at frame 4; 11 is surest at frame 5
    seq = ctc_draft_sequence(logits, vocab, end_id=2, alternatives=1)
    assert seq.tokens == [10, 10, 11, 2]
    probs = logits.softmax(-1)
    assert seq.confidence[:3] == pytest.approx([probs[1, 1].item(), probs[3, 1].item(), probs[5, 2].item()])
    assert seq.confidence[3] == 1.0 and len(seq.alternatives) == 4 and len(seq.alternatives[0]) == 1
    assert all(t != tok for alts, tok in zip(seq.alternatives, seq.tokens) for t, _ in alts)


def test_ctc_drafter_reads_the_target_projector(target, batch):
    feats, lens = batch
    hidden, hlens = target.encoder(feats[:1, : lens[0]], lens[:1])
    drafter = make_drafter(target, "ctc")
    drafter.begin(UtteranceContext(feats[:1], lens[:1], hidden, hlens, target.prompt.end_id, target.prompt.stop_ids))
    want = target.projector.greedy_tokens(*target.projector.token_logits(hidden, hlens))[0]
    assert drafter.seq.tokens == want + [target.prompt.end_id]


def test_summary_adds_up(target, batch, greedy):
    feats, lens = batch
    dec = SpeculativeDecoder(
        target, SequenceDrafter(DraftPolicy(max_draft=4), _feeder(_corrupt(_full(h), "substitute") for h in greedy))
    )
    hyps = dec.decode(feats, lens, max_new_tokens=MAX_NEW)
    summary = summarize(dec.stats)
    assert summary["committed_tokens"] == sum(h.length for h in hyps)
    assert summary["target_forwards"] == sum(s.target_forwards for s in dec.stats)
    assert summary["mean_accepted_length"] == pytest.approx(summary["committed_tokens"] / summary["target_forwards"])
    assert 0 < summary["acceptance_rate"] < 1
    assert summary["total_s"] == pytest.approx(sum(s.total_s for s in dec.stats))
    assert set(dec.stats[0].to_dict()) >= {"target_forwards", "accepted", "mean_accepted", "acceptance_rate"}


def test_config():
    cfg = SpeculativeConfig(draft="ctc", max_draft=7, recycle=False)
    assert cfg.policy == DraftPolicy(max_draft=7, adaptive=True)  # decode.speculative's defaults: adaptive, recycle
    with pytest.raises(ValueError):
        DraftPolicy(threshold=1.5)
    with pytest.raises(ValueError):
        DraftPolicy(tree=True, max_draft=8, tree_budget=4)
    with pytest.raises(ValueError):
        make_drafter(_target_no_ctc(), "ctc")


def test_decoder_from_config(target, draft):
    dec = SpeculativeDecoder.from_config(target, {"draft": "ctc", "max_draft": 12, "adaptive": True})
    assert dec.drafter.name == "ctc" and dec.drafter.policy.max_draft == 12 and dec.drafter.policy.adaptive
    dec = SpeculativeDecoder.from_config(target, SpeculativeConfig(draft="llm_tiny_draft", recycle=True), draft=draft)
    assert isinstance(dec.drafter, SpeechLLMDrafter) and dec.drafter.policy.recycle
    with pytest.raises(ValueError):
        SpeculativeDecoder.from_config(target, {"draft": "llm_tiny_draft"})


def _target_no_ctc():
    llm, tok = build_tiny_llm()
    return SpeechLLM(LinearEncoder(), StackingMLPProjector(16, 64, stack=2, hidden_dim=32), llm, tok)


def test_bench_script_tiny_smoke(tmp_path):
    """scripts/bench_specdec.py --tiny runs every row on tiny random models; every lossless row is
    identical to AR and the one-pass bound takes one target forward per utterance."""
    from tests.conftest import load_script

    bench = load_script("bench_specdec")
    out = tmp_path / "bench.json"
    results = bench.main(["--tiny", "--threads", "1", "--ks", "4", "--out", str(out)])
    rows = results["sets"]["tiny"]
    assert {"ar", "sd_k4", "adaptive", "recycle", "specasr", "ctc", "ctc_recycle", "ctc_tree", "ctc_relaxed",
            "bound"} <= set(rows)
    assert all(r["identical_to_ar"] == 1.0 for name, r in rows.items() if name != "ctc_relaxed")
    assert rows["bound"]["target_forwards_per_utt"] == 1.0
    assert rows["ar"]["mean_accepted_length"] == 1.0
    assert out.exists()


def test_suffix_edit_cost():
    from efin.decoding.sequence_drafters import _suffix_edit_cost

    assert _suffix_edit_cost([1, 2], [9, 9, 1, 2]) == 0  # free start in the sequence
    assert _suffix_edit_cost([1, 5], [9, 1, 2]) == 1  # substitution
    assert _suffix_edit_cost([1, 2, 3], [1, 3]) == 1  # the sequence lacks a token
    assert _suffix_edit_cost([1, 3], [1, 2]) == 1  # must end where the sequence ends
