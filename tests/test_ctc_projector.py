"""TokenCTCProjector: CTC over the LLM's tokens, soft embeddings of the collapsed positions."""

from __future__ import annotations

import pytest
import torch

from efin.decoding.generate import ctc_transcribe
from efin.models.llm import build_tiny_llm
from efin.models.projector import TokenCTCProjector
from efin.models.speech_llm import SpeechLLM
from tests.conftest import LinearEncoder


def _projector(llm, tok, letters="abcdefgh", **kwargs):
    proj = TokenCTCProjector(16, 64, vocab_size=len(letters), stack=1, hidden_dim=32, kernel_size=3, **kwargs)
    ids = torch.tensor(sorted(tok.convert_tokens_to_ids(list(letters))))
    proj.set_vocabulary(ids, llm.get_input_embeddings().weight)
    return proj, ids


def _spoken(tokens: list[int], ids: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """Frames that 'say' each token for 2 frames, with a silent (zero) frame after each: (T, 16)."""
    frames = []
    for t in tokens:
        k = int((ids == t).nonzero())
        frames += [patterns[k], patterns[k], torch.zeros(16)]
    return torch.stack(frames)


def test_learns_token_sequences_and_hands_the_llm_their_embeddings():
    torch.manual_seed(0)
    llm, tok = build_tiny_llm()
    proj, ids = _projector(llm, tok, temperature=0.1)
    patterns = torch.randn(len(ids), 16)
    words = [[ids[i].item() for i in torch.randint(0, len(ids), (5,))] for _ in range(16)]
    x = torch.stack([_spoken(w, ids, patterns) for w in words])
    lens = torch.full((len(words),), x.shape[1])
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    for _ in range(150):
        loss = proj.ctc_loss(*proj.token_logits(x, lens), words)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    logits, logit_lens = proj.token_logits(x, lens)
    got = proj.greedy_tokens(logits, logit_lens)
    assert got == words  # a silent frame separates repeated tokens, as CTC needs
    # what the LLM reads: one vector per collapsed token, close to that token's embedding
    embeds, counts = proj(x, lens)
    assert counts.tolist() == [len(g) for g in got]
    table = llm.get_input_embeddings().weight
    nearest = torch.cdist(embeds[0, : counts[0]], table).argmin(-1)
    assert nearest.tolist() == got[0]


def test_padding_does_not_change_an_utterance():
    torch.manual_seed(0)
    llm, tok = build_tiny_llm()
    proj, _ = _projector(llm, tok)
    x, lens = torch.randn(2, 12, 16), torch.tensor([12, 7])
    logits, logit_lens = proj.token_logits(x, lens)
    alone, alone_lens = proj.token_logits(x[1:, :7], lens[1:])
    assert logit_lens.tolist() == [12, 7] and alone_lens.tolist() == [7]
    torch.testing.assert_close(logits[1, :7], alone[0], rtol=1e-5, atol=1e-5)
    embeds, counts = proj(x, lens)
    single, single_counts = proj(x[1:, :7], lens[1:])
    assert counts[1] == single_counts[0] >= 1
    torch.testing.assert_close(embeds[1, : counts[1]], single[0, : counts[1]], rtol=1e-5, atol=1e-5)


def test_vocabulary_survives_a_state_dict_round_trip():
    llm, tok = build_tiny_llm()
    proj, ids = _projector(llm, tok)
    fresh = TokenCTCProjector(16, 64, vocab_size=len(ids), stack=1, hidden_dim=32, kernel_size=3)
    fresh.load_state_dict(proj.state_dict())
    assert fresh.vocab_ids.tolist() == ids.tolist()
    x, lens = torch.randn(1, 9, 16), torch.tensor([9])
    targets = [[ids[0].item(), ids[3].item()]]
    assert fresh.ctc_loss(*fresh.token_logits(x, lens), targets) == proj.ctc_loss(*proj.token_logits(x, lens), targets)
    with pytest.raises(ValueError, match="expected 8 vocab ids"):
        proj.set_vocabulary(ids[:3], llm.get_input_embeddings().weight)


def test_speech_llm_without_lm_trains_only_through_ctc():
    torch.manual_seed(0)
    llm, tok = build_tiny_llm()
    proj = TokenCTCProjector(16, 64, vocab_size=40, hidden_dim=32, kernel_size=3, stack=1)
    proj.set_vocabulary(torch.arange(6, 46), llm.get_input_embeddings().weight)
    model = SpeechLLM(LinearEncoder(), proj, llm, tok)
    llm.requires_grad_(False)
    feats, lens = torch.randn(2, 40, 8), torch.tensor([40, 30])
    out = model(feats, lens, ["ab c", "hi"], lm=False)
    assert out.num_tokens == 0 and out.loss.item() == 0 and torch.isfinite(out.ctc_loss)
    out.ctc_loss.backward()
    assert proj.inp.weight.grad is not None and proj.blank.grad is not None
    both = model(feats, lens, ["ab c", "hi"])  # with the LLM: both losses
    assert both.num_tokens == len("ab c") + 1 + len("hi") + 1 and torch.isfinite(both.loss)
    assert len(ctc_transcribe(model, feats, lens)) == 2
