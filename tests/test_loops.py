"""Output guards: loop trimming and the CTC-heard length bound."""

from __future__ import annotations

import torch

from efin.decoding.llm_search import Hypothesis
from efin.decoding.loops import loop_start, trim_loop
from efin.models.llm import build_tiny_llm
from efin.models.projector import StackingMLPProjector, TokenCTCProjector
from efin.models.speech_llm import SpeechLLM
from tests.conftest import LinearEncoder


def test_loop_start_finds_the_longest_trailing_loop():
    assert loop_start([1, 2, 4, 5, 6, 4, 5, 6, 4, 5, 6]) == 5       # unit (4 5 6) x 3
    assert loop_start([1, 2, 4, 5, 6, 4, 5, 6, 4, 5, 6, 4]) == 5    # ... and an unfinished 4th copy
    assert loop_start([9, 7, 7, 7, 7]) == 2                          # one token repeated
    assert loop_start([1, 2, 3, 4, 5, 6, 4, 5, 6, 4, 5]) is None     # only two copies
    assert loop_start([1, 2, 3, 1, 2, 3], min_repeats=2) == 3
    assert loop_start([]) is None and loop_start([5, 6, 7]) is None


def test_trim_loop_only_touches_outputs_cut_by_the_limit():
    looping = [3, 8, 1, 2, 1, 2, 1, 2, 1]
    assert trim_loop(Hypothesis(looping, -4.0, None)).tokens == [3, 8, 1, 2]
    stopped = Hypothesis(looping, -4.0, stop_token=0)  # it ended by itself: kept as is
    assert trim_loop(stopped) is stopped


def test_length_limit_bounded_by_ctc_tokens_heard():
    llm, tok = build_tiny_llm()
    hidden = llm.get_input_embeddings().weight.shape[1]
    ctc = TokenCTCProjector(16, hidden, vocab_size=8, stack=2, hidden_dim=32)
    model = SpeechLLM(LinearEncoder(), ctc, llm, tok, tokens_per_second=8.0, extra_tokens=10, tokens_per_ctc_token=2.0)
    feat_lens, heard = torch.tensor([400, 400, 100]), torch.tensor([3, 40, 1])
    # duration: ceil(8 x 4 s + 10) = 42 and ceil(8 x 1 s + 10) = 18; heard: ceil(2 x N + 10)
    assert model.max_new_tokens_for(feat_lens).tolist() == [42, 42, 18]
    assert model.max_new_tokens_for(feat_lens, heard).tolist() == [16, 42, 12]
    model.tokens_per_ctc_token = None
    assert model.max_new_tokens_for(feat_lens, heard).tolist() == [42, 42, 18]
    mlp = SpeechLLM(LinearEncoder(), StackingMLPProjector(16, hidden, stack=2, hidden_dim=32), llm, tok,
                    tokens_per_second=8.0, extra_tokens=10)
    assert mlp.max_new_tokens_for(feat_lens, heard).tolist() == [42, 42, 18]  # no CTC head: frames, not tokens
