"""LLM decoding: greedy/beam with KV cache over speech prompts, batched == one at a time."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from efin.decoding.generate import decode, generate, score_transcripts
from efin.decoding.llm_search import (
    extend,
    forward_step,
    greedy_search,
    new_cache,
    prefill,
    score_continuations,
)
from efin.models.draft import build_draft_llm
from efin.models.llm import build_tiny_llm
from efin.models.projector import StackingMLPProjector
from efin.models.speech_llm import SpeechLLM
from tests.conftest import LinearEncoder, padded_feature_batch

MAX_NEW = 24


def _speech_llm(llm, tok, seed=0):
    torch.manual_seed(seed)
    hidden = llm.get_input_embeddings().weight.shape[1]
    proj = StackingMLPProjector(16, hidden, stack=2, hidden_dim=32)
    # The search itself is under test: no loop trimming (tests/test_loops.py covers it).
    return SpeechLLM(LinearEncoder(), proj, llm, tok, instruction="Transcribe.", trim_loops=False).eval()


@pytest.fixture(scope="module")
def model():
    return _speech_llm(*build_tiny_llm())


@pytest.fixture(scope="module")
def batch():
    return padded_feature_batch()


def _one_by_one(model, feats, lens, **kw):
    return [decode(model, feats[b : b + 1, : lens[b]], lens[b : b + 1], **kw)[0] for b in range(len(lens))]


def test_greedy_batched_equals_one_at_a_time(model, batch):
    feats, lens = batch
    batched = decode(model, feats, lens, max_new_tokens=MAX_NEW)
    single = _one_by_one(model, feats, lens, max_new_tokens=MAX_NEW)
    assert [h.tokens for h in batched] == [h.tokens for h in single]
    assert [h.stop_token for h in batched] == [h.stop_token for h in single]
    # the case is not trivial: some stop early, some run to the limit
    assert {h.stop_token is None for h in batched} == {True, False}
    texts = generate(model, feats, lens, max_new_tokens=MAX_NEW)
    assert texts == [model.tokenizer.decode(h.tokens, skip_special_tokens=True).strip() for h in single]


def test_greedy_log_prob_matches_teacher_forcing(model, batch):
    feats, lens = batch
    hyps = decode(model, feats, lens, max_new_tokens=MAX_NEW)
    inputs = model.generation_inputs(feats, lens)
    conts = [h.tokens + ([h.stop_token] if h.stop_token is not None else []) for h in hyps]
    scores = score_continuations(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, conts)
    torch.testing.assert_close(scores, torch.tensor([h.log_prob for h in hyps]), rtol=1e-4, atol=1e-4)


def test_per_item_length_limits(model, batch):
    feats, lens = batch
    limits = model.max_new_tokens_for(lens)
    # ceil(8 tokens/s * seconds + 10), at 100 feature frames per second
    assert limits.tolist() == [16, 12, 14, 11]
    inputs = model.generation_inputs(feats, lens)
    hyps = greedy_search(
        model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, (), torch.tensor([3, 0, 5, 1])
    )
    assert [len(h.tokens) for h in hyps] == [3, 0, 5, 1]


def test_beam_of_one_is_greedy(model, batch):
    feats, lens = batch
    greedy = decode(model, feats, lens, max_new_tokens=MAX_NEW)
    beam = decode(model, feats, lens, max_new_tokens=MAX_NEW, num_beams=1)
    assert [h.tokens for h in beam] == [h.tokens for h in greedy]
    assert [h.stop_token for h in beam] == [h.stop_token for h in greedy]


def test_beam_scores_at_least_greedy(model, batch):
    """Ranked by total log-probability (length_penalty=0), beam search finds sequences at least as
    likely as greedy's, here strictly better for some. Beam search has no such guarantee in
    general (the greedy prefix can be pruned), and with length normalisation (length_penalty=1)
    it does lose to greedy on one of these random-model utterances."""
    feats, lens = batch
    greedy = decode(model, feats, lens, max_new_tokens=MAX_NEW)
    beam = decode(model, feats, lens, max_new_tokens=MAX_NEW, num_beams=4, length_penalty=0.0)
    for g, b in zip(greedy, beam):
        assert b.log_prob >= g.log_prob - 1e-5
    assert any(b.log_prob > g.log_prob + 1e-3 for g, b in zip(greedy, beam))


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_reports_model_log_prob(model, batch, length_penalty):
    feats, lens = batch
    beam = decode(model, feats, lens, max_new_tokens=MAX_NEW, num_beams=4, length_penalty=length_penalty)
    inputs = model.generation_inputs(feats, lens)
    conts = [h.tokens + ([h.stop_token] if h.stop_token is not None else []) for h in beam]
    scores = score_continuations(model.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, conts)
    torch.testing.assert_close(scores, torch.tensor([h.log_prob for h in beam]), rtol=1e-4, atol=1e-4)


def test_beam_batched_equals_one_at_a_time(model, batch):
    feats, lens = batch
    batched = decode(model, feats, lens, max_new_tokens=MAX_NEW, num_beams=3)
    single = _one_by_one(model, feats, lens, max_new_tokens=MAX_NEW, num_beams=3)
    assert [h.tokens for h in batched] == [h.tokens for h in single]


def test_cached_steps_match_full_forward(model, batch):
    """KV-cache steps with explicit position_ids give the logits of one full forward pass."""
    feats, lens = batch
    llm = model.llm
    inputs = model.generation_inputs(feats, lens)
    tokens = torch.randint(10, 90, (4, 5), generator=torch.Generator().manual_seed(0))
    first, state = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    steps = [extend(llm, state, tokens[:, i : i + 1])[:, -1] for i in range(4)]
    chunk = extend(llm, state, tokens[:, 4:5])[:, -1]

    embeds = torch.cat([inputs.inputs_embeds, llm.get_input_embeddings()(tokens)], dim=1)
    mask = torch.cat([inputs.attention_mask, torch.ones_like(tokens)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    width = inputs.inputs_embeds.shape[1]
    torch.testing.assert_close(torch.stack([first, *steps, chunk], 1), full[:, width - 1 :], rtol=1e-4, atol=1e-4)


def test_dynamic_cache_crop_takes_negative_count():
    """Pin DynamicCache.crop semantics of the installed transformers (speculative decoding relies on it)."""
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4), layer_idx=0)
    cache.crop(-3)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError):
        cache.crop(2)


def test_forward_step_verifies_several_tokens(model, batch):
    """Scoring Q tokens in one call equals Q single steps (the verification primitive)."""
    feats, lens = batch
    llm = model.llm
    inputs = model.generation_inputs(feats, lens)
    tokens = torch.randint(10, 90, (4, 3), generator=torch.Generator().manual_seed(2))
    _, state = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    one_call = extend(llm, state, tokens)
    _, state2 = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    steps = torch.cat([extend(llm, state2, tokens[:, i : i + 1]) for i in range(3)], dim=1)
    torch.testing.assert_close(one_call, steps, rtol=1e-4, atol=1e-4)
    assert state.cache.get_seq_length() == state2.cache.get_seq_length() == inputs.inputs_embeds.shape[1] + 3


def test_draft_decodes_within_its_vocabulary(batch):
    llm, tok = build_tiny_llm()
    draft, draft_tok = build_draft_llm((llm, tok), num_layers=1, head_rows=40, texts=["hello there"])
    assert draft_tok is tok
    model = _speech_llm(draft, tok)
    feats, lens = batch
    inputs = model.generation_inputs(feats, lens)
    logits = forward_step(
        draft, new_cache(draft), inputs.attention_mask, inputs.position_ids, inputs_embeds=inputs.inputs_embeds
    )
    assert logits.shape[-1] == len(tok)
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[draft.vocab_ids] = False
    assert torch.isinf(logits[..., outside]).all() and torch.isfinite(logits[..., ~outside]).all()
    hyps = decode(model, feats, lens, max_new_tokens=MAX_NEW)
    allowed = set(draft.vocab_ids.tolist())
    assert all(set(h.tokens) <= allowed for h in hyps)
    assert [h.tokens for h in hyps] == [h.tokens for h in _one_by_one(model, feats, lens, max_new_tokens=MAX_NEW)]
    out = model(feats, lens, ["hello", "there"] * 2)  # trains over its subset head
    assert out.num_tokens == 2 * (len("hello") + 1 + len("there") + 1) and torch.isfinite(out.loss)


def test_lora_model_decodes(batch):
    from peft import LoraConfig

    llm, tok = build_tiny_llm(adapter="lora", lora=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model = _speech_llm(llm, tok)
    feats, lens = batch
    assert [h.tokens for h in decode(model, feats, lens, max_new_tokens=8)] == [
        h.tokens for h in _one_by_one(model, feats, lens, max_new_tokens=8)
    ]


def test_score_transcripts_is_the_teacher_forced_log_prob(model, batch):
    feats, lens = batch
    speech, speech_lens = model.embed_speech(feats, lens)
    candidates = [["hello there", "hello"], ["a b"], ["there", "hello there", ""], ["b"]]
    scores = score_transcripts(model, speech, speech_lens, candidates)
    assert [len(s) for s in scores] == [2, 1, 3, 1]
    for b, texts in enumerate(candidates):
        for text, score in zip(texts, scores[b]):
            with torch.no_grad():
                alone = model(feats[b : b + 1, : lens[b]], lens[b : b + 1], [text])  # mean over its tokens
            assert score == pytest.approx(-alone.loss.item() * alone.num_tokens, rel=1e-4)
    assert len(set(scores[2])) == 3  # candidates really get different scores
    # too long for the prompt: cannot be produced
    model.prompt.max_text_tokens, saved = 3, model.prompt.max_text_tokens
    try:
        too_long, short = score_transcripts(model, speech[1:2], speech_lens[1:2], [["hello", "a b"]])[0]
        assert too_long == float("-inf") and short == pytest.approx(scores[1][0], rel=1e-5)
    finally:
        model.prompt.max_text_tokens = saved


def test_draft_cannot_score_tokens_outside_its_head(batch):
    llm, tok = build_tiny_llm()
    draft, _ = build_draft_llm((llm, tok), num_layers=1, head_rows=12, texts=["hello"])
    model = _speech_llm(draft, tok)
    feats, lens = batch
    speech, speech_lens = model.embed_speech(feats[:1], lens[:1])
    inside, outside = score_transcripts(model, speech, speech_lens, [["hello", "quiz"]])[0]
    assert math.isfinite(inside) and inside < 0 and outside == float("-inf")
