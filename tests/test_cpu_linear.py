"""CPULinear: the same product as nn.Linear in other matmul forms; decoding output unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from efin.decoding.generate import decode as llm_decode
from efin.decoding.speculative import SpeculativeDecoder, make_drafter
from efin.models.cpu_linear import KERNELS, MAX_ROWS, CPULinear, fastest_kernel, for_decoding, use_cpu_linear
from tests.conftest import padded_feature_batch
from tests.test_speculative import MAX_NEW, _target


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 7), (2, 7), (5, 7), (2, 3, 7), (1, 1, 7), (MAX_ROWS + 1, 7)])
def test_forward_equals_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(7, 11, bias=bias)
    fast = CPULinear.from_linear(linear)
    x = torch.randn(*shape)
    with torch.no_grad():
        want, got = F.linear(x, linear.weight, linear.bias), fast(x)
    assert got.shape == want.shape == (*shape[:-1], 11)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_computes_the_linear_product(name):
    torch.manual_seed(0)
    linear = nn.Linear(7, 11, bias=False)
    fast = CPULinear.from_linear(linear)
    for rows in (1, 2, 5):
        x = torch.randn(rows, 7)
        torch.testing.assert_close(KERNELS[name](fast, x), F.linear(x, linear.weight), rtol=1e-5, atol=1e-6)


def test_the_fastest_kernel_is_chosen_once_per_shape_and_row_bucket(monkeypatch):
    """Timed on first use, then remembered: 3 and 4 rows share a bucket, 5 rows do not."""
    import efin.models.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "_FASTEST", {})
    calls = []

    def counted(kernel):
        def run(layer, rows):
            calls.append(rows.shape[0])
            return kernel(layer, rows)
        return run

    monkeypatch.setattr(cpu_linear, "KERNELS", {name: counted(k) for name, k in KERNELS.items()})
    fast = CPULinear.from_linear(nn.Linear(7, 11))
    with torch.no_grad():
        first = fastest_kernel(fast, torch.randn(3, 7), repeats=2)
        assert first in KERNELS and len(calls) == 3 * (1 + 2)
        assert fastest_kernel(fast, torch.randn(4, 7)) == first and len(calls) == 9
        fastest_kernel(fast, torch.randn(5, 7), repeats=2)
        assert len(calls) == 18 and len(cpu_linear._FASTEST) == 2


def test_training_path_is_plain_linear():
    """With gradients on, the layer is nn.Linear: gradients reach the shared weight."""
    linear = nn.Linear(4, 3)
    fast = CPULinear.from_linear(linear)
    fast(torch.randn(2, 4)).sum().backward()
    assert linear.weight.grad is not None and fast.weight is linear.weight


def test_swap_keeps_state_dict_and_tied_weights():
    llm = _target().llm
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in llm.modules())
    assert use_cpu_linear(llm) == linears > 0
    assert not any(type(m) is nn.Linear for m in llm.modules())
    assert use_cpu_linear(llm) == 0  # already swapped
    after = llm.state_dict()
    assert after.keys() == before.keys()  # weight_t is not saved
    assert all(torch.equal(after[k], before[k]) for k in before)
    head, embed = llm.get_output_embeddings(), llm.get_input_embeddings()
    assert isinstance(head, CPULinear)
    if llm.config.tie_word_embeddings:
        assert head.weight is embed.weight


def test_decoding_output_unchanged():
    """Greedy and speculative decoding of the swapped model write what the plain one writes."""
    target = _target()
    feats, lens = padded_feature_batch()
    with torch.inference_mode():
        want = llm_decode(target, feats, lens, max_new_tokens=MAX_NEW)
        fast = for_decoding(copy.deepcopy(target), "cpu")
        assert any(isinstance(m, CPULinear) for m in fast.llm.modules())
        greedy = llm_decode(fast, feats, lens, max_new_tokens=MAX_NEW)
        spec = SpeculativeDecoder(fast, make_drafter(fast, "ctc")).decode(feats, lens, max_new_tokens=MAX_NEW)
    for hyps in (greedy, spec):
        assert [h.tokens for h in hyps] == [w.tokens for w in want]
        assert [h.stop_token for h in hyps] == [w.stop_token for w in want]
    plain = for_decoding(copy.deepcopy(target), "cpu", cpu_linear=False)
    assert not any(isinstance(m, CPULinear) for m in plain.llm.modules())
