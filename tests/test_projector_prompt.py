"""Projectors (shapes, lengths, padding invariance) and prompt construction (labels, padding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from efin.models.llm import build_tiny_llm, build_tiny_tokenizer
from efin.models.projector import ConvProjector, StackingMLPProjector
from efin.models.prompt import IGNORE_INDEX, PromptBuilder
from efin.models.speech_llm import SpeechLLM
from efin.text import normalize
from tests.conftest import LinearEncoder

PROJECTORS = [
    lambda: StackingMLPProjector(16, 24, stack=3, hidden_dim=32),
    lambda: ConvProjector(16, 24, stride=3, hidden_dim=32),
    lambda: ConvProjector(16, 24, stride=3, kernel_size=5, hidden_dim=32),
]


@pytest.mark.parametrize("make", PROJECTORS)
def test_projector_shapes_and_lengths(make):
    torch.manual_seed(0)
    proj = make()
    for t in (1, 9, 10, 11):
        x = torch.randn(2, t, 16)
        lens = torch.tensor([t, max(1, t - 4)])
        y, ylens = proj(x, lens)
        assert y.shape == (2, -(-t // 3), 24)
        assert ylens.tolist() == [-(-int(n) // 3) for n in lens]
    assert proj.audio_tokens_per_second(25.0) == pytest.approx(25.0 / 3)


@pytest.mark.parametrize("make", PROJECTORS)
def test_projector_ignores_padding(make):
    """An utterance gives the same audio tokens alone or padded in a batch (garbage padding)."""
    torch.manual_seed(0)
    proj = make()
    x = torch.randn(2, 14, 16)
    lens = torch.tensor([14, 7])
    y, ylens = proj(x, lens)
    alone, alone_lens = proj(x[1:, :7], lens[1:])
    assert ylens[1] == alone_lens[0]
    torch.testing.assert_close(y[1, : ylens[1]], alone[0], rtol=1e-5, atol=1e-6)


def test_projector_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(B, T, 16\)"):
        StackingMLPProjector(16, 24)(torch.randn(1, 5, 15), torch.tensor([5]))


def test_speech_llm_checks_widths_at_build_time():
    llm, tok = build_tiny_llm()
    with pytest.raises(ValueError, match="output_dim=32.*64 wide"):
        SpeechLLM(LinearEncoder(), StackingMLPProjector(16, 32), llm, tok)
    with pytest.raises(ValueError, match="input_dim=12.*16 features"):
        SpeechLLM(LinearEncoder(), StackingMLPProjector(12, 64), llm, tok)


# -- prompts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llm()


def _speech(lens, hidden=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lens), max(lens), hidden, generator=g), torch.tensor(lens)


def test_chat_template_split_and_end_token(tiny):
    _, tok = tiny
    prompt = PromptBuilder(tok, instruction="Say <speech> now.", system="Sys.")
    assert tok.decode(prompt.prefix_ids) == "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nSay "
    assert tok.decode(prompt.suffix_ids) == " now.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.end_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert set(prompt.stop_ids) == {prompt.end_id, tok.eos_token_id}


def test_labels_cover_exactly_transcript_and_end_token(tiny):
    llm, tok = tiny
    prompt = PromptBuilder(tok, instruction="Transcribe.")
    texts = ["Hello, World!", "it's  ok", "A"]
    targets, keep = prompt.encode_transcripts(texts)
    assert keep.all()
    speech, lens = _speech([5, 2, 4])
    inputs = prompt.training_inputs(llm.get_input_embeddings(), speech, lens, targets, keep)
    emb = llm.get_input_embeddings()
    n_pre, n_suf = len(prompt.prefix_ids), len(prompt.suffix_ids)
    for b, text in enumerate(texts):
        length = int(inputs.attention_mask[b].sum())
        # right padding: real positions first, positions count from 0
        assert inputs.attention_mask[b, :length].all() and not inputs.attention_mask[b, length:].any()
        assert inputs.position_ids[b, :length].tolist() == list(range(length))
        labelled = (inputs.labels[b] != IGNORE_INDEX).nonzero()[:, 0]
        expected = tok(normalize(text), add_special_tokens=False)["input_ids"] + [prompt.end_id]
        assert inputs.labels[b, labelled].tolist() == expected
        assert labelled.tolist() == list(range(length - len(expected), length))  # the last positions
        assert tok.decode(inputs.labels[b, labelled[:-1]]) == normalize(text)
        # speech sits right after the prefix, text embeddings elsewhere
        n = int(lens[b])
        torch.testing.assert_close(inputs.inputs_embeds[b, n_pre : n_pre + n], speech[b, :n])
        suffix = torch.tensor(prompt.suffix_ids)
        torch.testing.assert_close(inputs.inputs_embeds[b, n_pre + n : n_pre + n + n_suf], emb(suffix))


def test_long_transcripts_are_reported_and_not_trained(tiny):
    llm, tok = tiny
    prompt = PromptBuilder(tok, max_text_tokens=5)
    targets, keep = prompt.encode_transcripts(["short", "much too long"])
    assert keep.tolist() == [True, False]
    assert len(targets[1]) == 6  # cut to the limit + end token: the batch stays bounded
    speech, lens = _speech([3, 3])
    inputs = prompt.training_inputs(llm.get_input_embeddings(), speech, lens, targets, keep)
    assert (inputs.labels[1] == IGNORE_INDEX).all()
    assert (inputs.labels[0] != IGNORE_INDEX).sum() == 6


def test_generation_inputs_left_pad_consistently(tiny):
    llm, tok = tiny
    prompt = PromptBuilder(tok)
    speech, lens = _speech([6, 2, 4])
    batch = prompt.generation_inputs(llm.get_input_embeddings(), speech, lens)
    assert batch.labels is None
    assert batch.attention_mask[:, -1].all()  # every prompt ends at the last column
    for b in range(3):
        alone = prompt.generation_inputs(llm.get_input_embeddings(), speech[b : b + 1, : lens[b]], lens[b : b + 1])
        n = alone.inputs_embeds.shape[1]
        pad = batch.inputs_embeds.shape[1] - n
        assert not batch.attention_mask[b, :pad].any()
        assert batch.position_ids[b, pad:].tolist() == list(range(n))
        torch.testing.assert_close(batch.inputs_embeds[b, pad:], alone.inputs_embeds[0])


def test_prompt_without_chat_template_uses_eos():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    prompt = PromptBuilder(tok, instruction="Transcribe: <speech>")
    assert prompt.end_id == tok.eos_token_id
    assert tok.decode(prompt.prefix_ids) == "<s>Transcribe: "
    assert tok.decode(prompt.suffix_ids) == "\n"


def test_speech_llm_loss_counts_label_tokens(tiny):
    torch.manual_seed(0)
    llm, tok = tiny
    model = SpeechLLM(LinearEncoder(), StackingMLPProjector(16, 64, stack=2, hidden_dim=32), llm, tok)
    feats, feat_lens = torch.randn(2, 40, 8), torch.tensor([40, 24])
    out = model(feats, feat_lens, ["ab c", "Hi!"])
    assert out.num_tokens == len("ab c") + 1 + len("hi") + 1
    assert out.keep.all() and out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.projector.net[0].weight.grad is not None

    # the same loss from the Hugging Face model's full logits (labels shifted inside)
    targets, keep = model.prompt.encode_transcripts(["ab c", "Hi!"])
    speech, lens = model.embed_speech(feats, feat_lens)
    inputs = model.prompt.training_inputs(llm.get_input_embeddings(), speech, lens, targets, keep)
    logits = llm(
        inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
    ).logits
    ref = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs.labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
