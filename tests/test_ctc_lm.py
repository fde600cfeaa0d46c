"""Word n-gram LM (Kneser-Ney, ARPA) and CTC lexicon beam search."""

from __future__ import annotations

import math

import pytest
import torch

from efin.decoding.ctc import CTCLexiconBeamSearch, build_ctc_lm, ctc_greedy, lm_decoder
from efin.decoding.ngram import NgramLM, kneser_ney_arpa
from efin.tokenizer import CharVocab

SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "a cat saw the dog", "the cat ran"]


@pytest.mark.parametrize("order, min_count", [(1, 1), (2, 1), (3, 1), (3, 2), (2, 3)])
def test_kneser_ney_distributions_sum_to_one(order, min_count):
    lm = NgramLM(kneser_ney_arpa(SENTENCES, order, min_count))
    vocab = [*lm.vocab, "</s>", "<unk>"]
    histories = {g[:-1] for g in lm.prob if len(g) > 1} | {()} | {("the", "zebra"), ("<s>", "cat")}
    for h in histories:
        total = sum(math.exp(lm.log_prob(h, w)) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4), h


def test_pruning_drops_rare_ngrams_only():
    full, pruned = NgramLM(kneser_ney_arpa(SENTENCES, 3)), NgramLM(kneser_ney_arpa(SENTENCES, 3, min_count=2))
    assert ("sat", "on", "the") in pruned.prob and ("on", "the") in pruned.prob  # seen twice
    assert ("the", "cat", "ran") in full.prob and ("the", "cat", "ran") not in pruned.prob  # once
    assert {g for g in full.prob if len(g) == 1} == {g for g in pruned.prob if len(g) == 1}
    assert len(pruned.prob) < len(full.prob)
    # the pruned LM still loads into the C++ decoder
    lm_decoder(CharVocab(), build_ctc_lm(SENTENCES, order=3, min_count=2))


def test_kneser_ney_prefers_seen_continuations():
    lm = NgramLM(kneser_ney_arpa(SENTENCES, 3))
    assert lm.log_prob(("sat", "on"), "the") > lm.log_prob(("sat", "on"), "cat")
    assert math.isclose(lm.prob[("<s>",)], -99.0)


def test_kneser_ney_rejects_bad_input():
    with pytest.raises(ValueError, match="order"):
        kneser_ney_arpa(SENTENCES, 0)
    with pytest.raises(ValueError, match="no words"):
        kneser_ney_arpa(["", "  "], 2)


def _log_probs(text: str, vocab: CharVocab, confusions: dict[int, str] | None = None) -> torch.Tensor:
    """(T, V) CTC log-probs spelling ``text`` (a blank after every char); at char positions in
    ``confusions`` the named wrong char gets 0.6 and the right one 0.4."""
    rows = []
    for i, ch in enumerate(text):
        p = torch.full((vocab.size,), 1e-4)
        if confusions and i in confusions:
            p[vocab.index[confusions[i]]], p[vocab.index[ch]] = 0.6, 0.4
        else:
            p[vocab.index[ch]] = 1.0
        blank = torch.full((vocab.size,), 1e-4)
        blank[0] = 1.0
        rows += [p / p.sum(), blank / blank.sum()]
    return torch.stack(rows).log()


def test_lexicon_beam_search_fixes_a_misspelling_greedy_keeps():
    vocab = CharVocab()
    lp = _log_probs("the cat sat", vocab, confusions={5: "o"})[None]  # greedy: "the cot sat"
    lens = torch.tensor([lp.shape[1]])
    assert vocab.decode(ctc_greedy(lp, lens)[0]) == "the cot sat"
    lm = build_ctc_lm(SENTENCES, order=2)
    assert lm_decoder(vocab, lm)(lp, lens) == ["the cat sat"]
    assert lm_decoder(vocab, lm, beam_size=1, lm_weight=0.0)(lp, lens) != ["the cot sat"]  # "cot" is not a word


def test_lexicon_beam_search_is_batched():
    vocab = CharVocab()
    a, b = _log_probs("the dog ran", vocab), _log_probs("a cat", vocab)
    batch = torch.full((2, a.shape[0], vocab.size), -30.0)
    batch[0], batch[1, : b.shape[0]] = a, b
    decoder = lm_decoder(vocab, build_ctc_lm(SENTENCES, order=2))
    assert decoder(batch, torch.tensor([a.shape[0], b.shape[0]])) == ["the dog ran", "a cat"]


def test_lexicon_beam_search_needs_a_space_symbol():
    with pytest.raises(ValueError, match="space symbol"):
        CTCLexiconBeamSearch(["<blank>", "a", "b"], ["ab"])


def test_lexicon_beam_search_nbest_lists_distinct_transcripts_best_first():
    vocab = CharVocab()
    lp = _log_probs("the cat sat", vocab, confusions={5: "o"})[None]
    lens = torch.tensor([lp.shape[1]])
    decoder = lm_decoder(vocab, build_ctc_lm(SENTENCES, order=2), nbest=5)
    (nbest,) = decoder.nbest(lp, lens)
    texts, scores = [t for t, _ in nbest], [s for _, s in nbest]
    assert texts[0] == "the cat sat" and decoder(lp, lens) == ["the cat sat"]
    assert 1 < len(texts) <= 5 and len(set(texts)) == len(texts)
    assert scores == sorted(scores, reverse=True)
