"""The word n-gram LM as joint decoding's third opinion: ARPA queries, scores of hypotheses'
finished words, a misspelling the character CTC cannot rule out, and the decode options."""

from __future__ import annotations

import math

import pytest
import torch

from efin.artifacts import ArtifactError
from efin.decoding.ctc import build_ctc_lm
from efin.decoding.generate import detokenize
from efin.decoding.joint import joint_beam_search, joint_decode
from efin.decoding.ngram import EOS, UNK, NgramLM, kneser_ney_arpa
from efin.decoding.text_ctc import TextCTC, TextCTCScores
from efin.decoding.word_lm import WordLM, WordLMScores
from efin.models.llm import build_tiny_llm
from efin.models.projector import StackingMLPProjector
from efin.models.speech_llm import SpeechLLM
from efin.text import normalize
from efin.tokenizer import CharVocab
from tests.conftest import LinearEncoder, compose_config, padded_feature_batch

SENTENCES = ["bad cafe", "a bad face", "bead cafe", "dab a bead", "a cafe"]


@pytest.fixture(scope="module")
def lm() -> NgramLM:
    return NgramLM(kneser_ney_arpa(SENTENCES, order=3))


def test_ngram_queries_back_off(lm):
    # (that every history's distribution sums to one: tests/test_ctc_lm.py)
    # a stored trigram is read as is (log10 -> ln); an unknown word is <unk>; only 2 words of history count
    assert lm.log_prob(("<s>", "bad"), "cafe") == pytest.approx(lm.prob[("<s>", "bad", "cafe")] * math.log(10))
    assert lm.log_prob(("a",), "dog") == lm.log_prob(("a",), UNK) < lm.log_prob(("a",), "cafe")
    assert lm.log_prob(("x", "<s>", "bad"), "cafe") == lm.log_prob(("<s>", "bad"), "cafe")
    assert lm.vocab == {"a", "bad", "bead", "cafe", "dab", "face"}
    with pytest.raises(ValueError, match="not an ARPA n-gram line"):
        NgramLM("\\data\\\nngram 1=1\nnonsense\n")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(text))


def test_finished_words_are_scored_and_a_misspelling_pays_at_once(lm):
    _, tok = build_tiny_llm()
    word_lm = WordLM(lm, weight=0.5, word_score=1.0)
    scores = WordLMScores(word_lm, tok)
    bad = lm.log_prob(("<s>",), "bad")
    # "bad ca": one finished word; "ca" may still become "cafe"
    assert scores.score(_ids(tok, "bad ca")) == pytest.approx(0.5 * bad + 1.0)
    assert scores.score(_ids(tok, "bad ")) == pytest.approx(0.5 * bad + 1.0)
    assert scores.score(_ids(tok, "bad")) == 0.0  # "bad" may still become "badge"
    # "bad cg": no word starts with "cg": it pays <unk> now, as it would when finished
    unk = lm.log_prob(("<s>", "bad"), UNK)
    assert scores.score(_ids(tok, "bad cg")) == pytest.approx(0.5 * (bad + unk) + 1.0)
    # final: every word and the end of the sentence
    final = bad + lm.log_prob(("<s>", "bad"), "cafe") + lm.log_prob(("bad", "cafe"), EOS)
    assert scores.score(_ids(tok, "bad cafe"), final=True) == pytest.approx(0.5 * final + 2.0)
    # oov_score: once per word outside the vocabulary, finished or already impossible to finish
    strict = WordLMScores(WordLM(lm, weight=0.5, word_score=1.0, oov_score=-3.0), tok)
    assert strict.score(_ids(tok, "bad cg")) == pytest.approx(scores.score(_ids(tok, "bad cg")) - 3.0)
    assert strict.score(_ids(tok, "bad cg"), final=True) == pytest.approx(
        scores.score(_ids(tok, "bad cg"), final=True) - 3.0)
    assert strict.score(_ids(tok, "bad ca")) == scores.score(_ids(tok, "bad ca"))
    # the search's matrix: each beam followed by each candidate, a stop's entry the beam's final score
    beams = [_ids(tok, "bad caf"), _ids(tok, "a")]
    cands = torch.tensor([*_ids(tok, "eg "), 0])
    is_stop = torch.tensor([False, False, False, True])
    got = scores.scores(beams, cands, is_stop)
    want = [[scores.score(b + [c]) for c in cands[:3].tolist()] + [scores.score(b, final=True)] for b in beams]
    assert torch.allclose(got, torch.tensor(want))


def _char_log_probs(text: str, vocab: CharVocab, swap: dict[int, tuple[str, float]]) -> torch.Tensor:
    """(N, C) CTC log-probs spelling ``text`` (each label on one frame, a blank after it), where the
    character at position i is instead ``swap[i][0]`` with probability ``swap[i][1]``."""
    rows = []
    for i, c in enumerate(text):
        probs = torch.full((vocab.size,), 1e-4)
        if i in swap:
            other, p = swap[i]
            probs[vocab.index[other]], probs[vocab.index[c]] = p, 1 - p
        else:
            probs[vocab.index[c]] = 1.0
        rows.append(probs)
        blank = torch.full((vocab.size,), 1e-4)
        blank[0] = 1.0
        rows.append(blank)
    return (torch.stack(rows) / torch.stack(rows).sum(-1, keepdim=True)).log()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_word_lm_spells_what_the_character_ctc_cannot_tell_apart(lm, num_beams):
    llm, tok = build_tiny_llm()
    vocab = CharVocab()
    # the audio leans to "bad cafa" (0.6), the lexicon only has "cafe"
    log_probs = _char_log_probs("bad cafe", vocab, {7: ("a", 0.6)})
    stops = [tok.eos_token_id]
    prompt = (torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(3)), torch.ones(1, 6, dtype=torch.long),
              torch.arange(6)[None])

    def search(word_lm):
        ctc = TextCTCScores(log_probs, vocab.encode, tok, stops, pre_beam=len(tok), label_bonus=1.0)
        hyp = joint_beam_search(llm, *prompt, ctc, stops, 24, num_beams=num_beams, ctc_weight=0.9, word_lm=word_lm)
        return normalize(tok.decode(hyp.tokens, skip_special_tokens=True)), hyp

    assert search(None)[0] == "bad cafa"
    text, hyp = search(WordLMScores(WordLM(lm, weight=1.0), tok))
    assert text == "bad cafe"
    assert hyp.lm_score == pytest.approx(WordLMScores(WordLM(lm, weight=1.0), tok).score(hyp.tokens, final=True))
    with pytest.raises(ValueError, match="needs a character CTC"):
        joint_beam_search(llm, *prompt, None, stops, 4, ctc_weight=0.0, word_lm=WordLMScores(WordLM(lm), tok))


def test_recognizer_options_of_the_word_lm(tmp_path):
    from efin.inference import SpeechLLMRecognizer

    feats, lens = padded_feature_batch()
    torch.manual_seed(0)
    vocab = CharVocab()
    head = torch.nn.Linear(16, vocab.size)
    llm, tok = build_tiny_llm()
    model = SpeechLLM(LinearEncoder(), StackingMLPProjector(16, 64, stack=2, hidden_dim=32), llm, tok).eval()
    first_pass = {"ctc_head": {"vocab": vocab.state(), "state_dict": head.state_dict()},
                  "ctc_lm": build_ctc_lm(SENTENCES)}
    opts = dict(ctc_weight=0.5, num_beams=2, max_new_tokens=12, joint_ctc="encoder", joint_pre_beam=4)
    rec = SpeechLLMRecognizer.from_model(model, first_pass=first_pass, joint_lm_weight=0.7, joint_word_score=0.5,
                                         **opts)
    word_lm = rec.joint_options["word_lm"]
    lm_vocab = set(" ".join(SENTENCES).split())
    assert (word_lm.weight, word_lm.word_score, word_lm.lm.vocab) == (0.7, 0.5, lm_vocab)
    hyps = joint_decode(model, feats, lens, ctc_weight=0.5, num_beams=2, max_new_tokens=12,
                        text_ctc=TextCTC(head, vocab), pre_beam=4, word_lm=word_lm)
    assert rec.transcribe(feats, lens) == detokenize(model, hyps)
    # lm_sources: the word LM rebuilt from other text, for joint decoding as for rescoring
    text = tmp_path / "lm.txt"
    text.write_text("dig a deep hedge\n")
    rebuilt = SpeechLLMRecognizer.from_model(model, first_pass=first_pass, joint_lm_weight=0.7,
                                             lm_sources=[str(text)], **opts)
    assert rebuilt.joint_options["word_lm"].lm.vocab == {"dig", "a", "deep", "hedge"} != lm_vocab
    with pytest.raises(ArtifactError, match="joint_lm_weight=0.7: .*no word LM.*decode.lm_sources"):
        SpeechLLMRecognizer.from_model(model, first_pass={"ctc_head": first_pass["ctc_head"]}, joint_lm_weight=0.7,
                                       **opts)
    with pytest.raises(ValueError, match="joint_lm_weight=0.7: .*in joint decoding .*decode=joint"):
        SpeechLLMRecognizer.from_model(model, first_pass=first_pass, joint_lm_weight=0.7, **{**opts, "ctc_weight": 0})


def test_decode_options_carry_the_word_lm(tmp_path):
    from efin.evaluate import decode_options

    overrides = ["artifact=a", "manifest=m.jsonl", "decode=joint", "decode.joint_lm_weight=0.4",
                 "decode.joint_word_score=1.5", "decode.lm_sources=[wordnet]"]
    cfg = compose_config(overrides, tmp_path, config_name="evaluate")
    options = decode_options(cfg.decode, tmp_path, "default")
    assert (options["joint_lm_weight"], options["joint_word_score"], options["lm_sources"]) == (0.4, 1.5, ["wordnet"])
