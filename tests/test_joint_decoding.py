"""Joint CTC/LLM decoding: the CTC prefix scorer against brute force, the joint beam search
against beam search and against the CTC alone, and its wiring as a decode option."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from efin.artifacts import ArtifactError
from efin.decoding.ctc_prefix import CTCPrefixScorer, LabelSequenceScores
from efin.decoding.generate import decode, detokenize
from efin.decoding.joint import TokenCTCScores, joint_beam_search, joint_decode
from efin.decoding.text_ctc import TextCTC, TextCTCScores
from efin.models.llm import build_tiny_llm
from efin.models.projector import StackingMLPProjector, TokenCTCProjector
from efin.models.speech_llm import SpeechLLM
from efin.text import normalize
from efin.tokenizer import CharVocab
from tests.conftest import LinearEncoder, compose_config, padded_feature_batch

MAX_NEW = 16
LETTERS = "abcdefgh"


# ---- the prefix scorer ----------------------------------------------------------------------


def _collapse(path) -> tuple[int, ...]:
    out, prev = [], None
    for c in path:
        if c != prev and c != 0:
            out.append(c)
        prev = c
    return tuple(out)


def _brute_force_prefix_probs(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """log P(the collapsed labels start with g) for every g, by summing over all C^N paths."""
    n, c = log_probs.shape
    probs: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(c), repeat=n):
        p = math.exp(sum(log_probs[t, k].item() for t, k in enumerate(path)))
        labels = _collapse(path)
        for length in range(len(labels) + 1):
            probs[labels[:length]] = probs.get(labels[:length], 0.0) + p
    return {g: math.log(p) for g, p in probs.items()}


def _state_of(scorer: CTCPrefixScorer, labels: tuple[int, ...]):
    state = scorer.initial_state()
    for c in labels:
        state = scorer.extend(state, torch.tensor([c]))
    return state


@pytest.mark.parametrize("n, c", [(5, 3), (4, 4), (1, 3)])
def test_prefix_scores_match_brute_force(n, c):
    log_probs = torch.randn(n, c, generator=torch.Generator().manual_seed(n * 10 + c)).log_softmax(-1)
    brute = _brute_force_prefix_probs(log_probs)
    scorer = CTCPrefixScorer(log_probs)
    assert any(len(set(g)) < len(g) for g in brute) or n < 2  # repeated labels are covered
    for g, want in brute.items():
        state = _state_of(scorer, g)
        assert state.score.item() == pytest.approx(want, abs=1e-5), g
        # every one-label extension at once, as the search uses them
        nxt = scorer.next_scores(state)[0]
        assert nxt[0] == float("-inf")  # the blank is no label
        for k in range(1, c):
            expected = brute.get(g + (k,), float("-inf"))
            assert nxt[k].item() == pytest.approx(expected, abs=1e-5) if expected > -math.inf else nxt[k] < -30
        # the end score is the probability of exactly g: what CTC loss scores
        if g:
            loss = F.ctc_loss(log_probs[:, None], torch.tensor([g]), torch.tensor([n]), torch.tensor([len(g)]),
                              reduction="none")
            exact = -loss.item()
        else:
            exact = log_probs[:, 0].sum().item()
        assert scorer.end_scores(state).item() == pytest.approx(exact, abs=1e-5), g


def test_long_utterances_match_the_frame_by_frame_recursion():
    """extend() computes the frame recursions in closed form; on 600 peaked frames (12 s at 50
    frames/s, log-probabilities summing to thousands) it matches the plain loop over frames."""
    log_probs = (6 * torch.randn(600, 12, generator=torch.Generator().manual_seed(3))).log_softmax(-1)
    scorer = CTCPrefixScorer(log_probs)
    state = scorer.initial_state()
    for label in log_probs[:, 1:].argmax(-1)[::40] + 1:  # a sequence the frames can hold, repeats included
        labels = label.reshape(1)
        phi = torch.logaddexp(state.r[..., 0], state.r[..., 1])
        phi = torch.where((labels == state.last)[:, None], state.r[..., 1], phi)
        x = log_probs[:, labels].T
        r_n = torch.full_like(x, float("-inf"))
        r_b = torch.full_like(x, float("-inf"))
        r_n[:, 0] = x[:, 0] if state.length.item() == 0 else float("-inf")
        for t in range(1, x.shape[1]):
            r_n[:, t] = torch.logaddexp(r_n[:, t - 1], phi[:, t - 1]) + x[:, t]
            r_b[:, t] = torch.logaddexp(r_n[:, t - 1], r_b[:, t - 1]) + log_probs[t, 0]
        state = scorer.extend(state, labels)
        want = torch.stack([r_n, r_b], dim=-1)
        assert torch.equal(torch.isfinite(want), torch.isfinite(state.r))
        finite = torch.isfinite(want)
        # float32's rounding of the loop's running sums (thousands of nats) is the tolerance
        torch.testing.assert_close(state.r[finite], want[finite], rtol=1e-5, atol=1e-3)


def test_no_frames_allow_only_the_empty_sequence():
    scorer = CTCPrefixScorer(torch.zeros(0, 4))
    state = scorer.initial_state()
    assert scorer.end_scores(state).item() == 0.0
    assert (scorer.next_scores(state) == float("-inf")).all()


# ---- the joint search -----------------------------------------------------------------------


def _ctc_model(seed: int = 1) -> SpeechLLM:
    torch.manual_seed(seed)
    llm, tok = build_tiny_llm(seed=seed)
    proj = TokenCTCProjector(16, 64, vocab_size=len(LETTERS), stack=1, hidden_dim=32, kernel_size=3)
    ids = torch.tensor(sorted(tok.convert_tokens_to_ids(list(LETTERS))))
    proj.set_vocabulary(ids, llm.get_input_embeddings().weight)
    return SpeechLLM(LinearEncoder(), proj, llm, tok, instruction="Transcribe.").eval()


@pytest.fixture(scope="module")
def model():
    return _ctc_model()


@pytest.fixture(scope="module")
def batch():
    return padded_feature_batch()


@pytest.mark.parametrize("num_beams, length_penalty", [(3, 1.0), (2, 0.0)])
def test_ctc_weight_zero_is_beam_search(model, batch, num_beams, length_penalty):
    feats, lens = batch
    opts = dict(num_beams=num_beams, length_penalty=length_penalty, max_new_tokens=MAX_NEW)
    joint = joint_decode(model, feats, lens, ctc_weight=0.0, **opts)
    beam = decode(model, feats, lens, **opts)
    assert [h.tokens for h in joint] == [h.tokens for h in beam]
    assert [h.stop_token for h in joint] == [h.stop_token for h in beam]
    assert [h.log_prob for h in joint] == pytest.approx([h.log_prob for h in beam], abs=1e-5)
    # the case is not trivial: some stop on the end token, others run to the limit, and tokens
    # outside the CTC vocabulary are produced when the CTC has no say
    assert {h.stop_token is None for h in beam} == {True, False}
    assert any(t not in model.projector.vocab_ids.tolist() for h in beam for t in h.tokens)


def _prompt(model, length: int = 6):
    """A random (1, L, H) prompt for the search alone."""
    embeds = torch.randn(1, length, 64, generator=torch.Generator().manual_seed(3))
    return embeds, torch.ones(1, length, dtype=torch.long), torch.arange(length)[None]


def _peaked(classes: list[int], num_classes: int, sharpness: float = 30.0) -> torch.Tensor:
    """(N, C) log-probs whose best path is ``classes`` (0 = blank) almost surely."""
    return (sharpness * F.one_hot(torch.tensor(classes), num_classes).float()).log_softmax(-1)


@pytest.mark.parametrize("ctc_weight", [1.0, 0.9])
def test_peaked_ctc_posterior_decides_the_transcript(model, ctc_weight):
    # path: a a _ b _ b c _ -> a b b c (a repeated label needs its blank)
    path = [1, 1, 0, 2, 0, 2, 3, 0]
    log_probs = _peaked(path, 1 + len(LETTERS))
    vocab = model.projector.vocab_ids
    expected = [int(vocab[c - 1]) for c in _collapse(path)]
    stops = model.prompt.stop_ids
    hyp = joint_beam_search(model.llm, *_prompt(model), TokenCTCScores(log_probs, vocab, stops, 3), stops, MAX_NEW,
                            num_beams=3, ctc_weight=ctc_weight)
    assert hyp.tokens == expected
    assert hyp.stop_token in model.prompt.stop_ids  # ended by its stop token, well before the limit
    assert hyp.ctc_log_prob == pytest.approx(0.0, abs=1e-3)
    # the random LLM alone says something else
    alone = joint_beam_search(model.llm, *_prompt(model), None, stops, MAX_NEW, num_beams=3, ctc_weight=0.0)
    assert alone.tokens != expected


def test_an_empty_ctc_transcript_stops_at_once(model):
    log_probs = _peaked([0, 0, 0], 1 + len(LETTERS))
    stops = model.prompt.stop_ids
    ctc = TokenCTCScores(log_probs, model.projector.vocab_ids, stops, 2)
    hyp = joint_beam_search(model.llm, *_prompt(model), ctc, stops, MAX_NEW, num_beams=2, ctc_weight=0.5)
    assert hyp.tokens == [] and hyp.stop_token in model.prompt.stop_ids


def test_joint_decoding_emits_only_ctc_vocabulary(model, batch):
    feats, lens = batch
    hyps = joint_decode(model, feats, lens, ctc_weight=0.3, num_beams=2, max_new_tokens=MAX_NEW)
    vocab = set(model.projector.vocab_ids.tolist())
    assert all(set(h.tokens) <= vocab for h in hyps)
    # batched equals one at a time (each utterance is searched on its own prompt)
    for b, h in enumerate(hyps):
        alone = joint_decode(model, feats[b : b + 1, : lens[b]], lens[b : b + 1], ctc_weight=0.3, num_beams=2,
                             max_new_tokens=MAX_NEW)[0]
        assert alone.tokens == h.tokens and alone.stop_token == h.stop_token


# ---- another CTC, through the hypotheses' text --------------------------------------------


def test_label_sequences_are_scored_as_one_label_at_a_time():
    log_probs = torch.randn(6, 4, generator=torch.Generator().manual_seed(5)).log_softmax(-1)
    scorer = CTCPrefixScorer(log_probs)
    sequences = LabelSequenceScores(log_probs)
    seqs = [(1, 2, 2), (1,), (), (3, 1), (1, 2, 3, 1), (1, 2)]  # shared prefixes, repeats, the empty one
    prefix, end = sequences.prefix(seqs), sequences.end(seqs)
    for seq, p, e in zip(seqs, prefix.tolist(), end.tolist()):
        state = _state_of(scorer, seq)
        assert p == pytest.approx(float(state.score), abs=1e-5)
        assert e == pytest.approx(float(scorer.end_scores(state)), abs=1e-5)


def _char_path(text: str, vocab: CharVocab) -> list[int]:
    """A CTC path spelling ``text``: each label twice, a blank after each word and between repeats."""
    path = []
    for i, c in enumerate(text):
        label = vocab.index[c]
        if path and path[-1] == label:
            path.append(0)
        path += [label, label]
        if c == " " or i == len(text) - 1:
            path.append(0)
    return path


@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_peaked_character_ctc_decides_the_text(model, num_beams):
    vocab = CharVocab()
    target = "bad cafe"
    log_probs = _peaked(_char_path(target, vocab), vocab.size)
    stops = model.prompt.stop_ids
    ctc = TextCTCScores(log_probs, vocab.encode, model.tokenizer, stops, pre_beam=len(model.tokenizer))
    hyp = joint_beam_search(model.llm, *_prompt(model), ctc, stops, 4 * MAX_NEW, num_beams=num_beams, ctc_weight=0.9)
    assert normalize(model.tokenizer.decode(hyp.tokens, skip_special_tokens=True)) == target
    assert hyp.ctc_log_prob == pytest.approx(0.0, abs=1e-2)
    alone = joint_beam_search(model.llm, *_prompt(model), None, stops, 4 * MAX_NEW, num_beams=num_beams, ctc_weight=0)
    assert normalize(model.tokenizer.decode(alone.tokens, skip_special_tokens=True)) != target


def test_text_ctc_candidates_are_the_llm_pre_beam(model):
    vocab = CharVocab()
    stops = model.prompt.stop_ids
    ctc = TextCTCScores(torch.zeros(3, vocab.size).log_softmax(-1), vocab.encode, model.tokenizer, stops, pre_beam=2)
    log_probs = torch.tensor([[0.0, -1.0, -5.0, -0.5, -9.0], [-9.0, -9.0, 0.0, -9.0, -9.0]]).log_softmax(-1)
    log_probs = F.pad(log_probs, (0, len(model.tokenizer) - 5), value=-30.0)
    ids, is_stop = ctc.candidates(log_probs, torch.tensor([True, False]), [[], []])  # beam 1 is padding
    assert set(ids.tolist()) == {0, 3, *stops}
    assert is_stop.tolist() == [i in stops for i in ids.tolist()]


def test_the_ctc_proposes_the_tokens_that_spell_its_continuation(model):
    vocab = CharVocab()
    text_ctc = TextCTC(torch.nn.Identity(), vocab)
    spellings = text_ctc.spellings(model.tokenizer)
    tok = model.tokenizer
    assert sorted(spellings[(vocab.index["a"],)]) == sorted(tok.convert_tokens_to_ids(["a", "A"]))
    assert tok.convert_tokens_to_ids(" ") in spellings[(vocab.index[" "],)]
    assert all(labels for labels in spellings)  # tokens that spell nothing (specials) are left out
    log_probs = _peaked(_char_path("bad cafe", vocab), vocab.size)
    stops = model.prompt.stop_ids
    ctc = TextCTCScores(log_probs, vocab.encode, tok, stops, pre_beam=1, spellings=spellings, lookahead=3)
    beam = tok.convert_tokens_to_ids(list("bad"))
    assert ctc.sequences.best_continuation(tuple(vocab.encode("bad")), 3) == tuple(vocab.encode("bad ca"))[3:]
    assert ctc.sequences.best_continuation(tuple(vocab.encode("bad cafe")), 3) == ()  # the audio ends there
    ids, _ = ctc.candidates(F.pad(torch.zeros(1, 5), (0, len(tok) - 5), value=-9.0), torch.tensor([True]), [beam])
    # the LLM's best (id 0) and every token spelling a prefix of " ca": here those that break a word
    assert set(ids.tolist()) == {0, *spellings[(vocab.index[" "],)], *stops}


def test_the_label_bonus_is_added_per_label(model):
    vocab = CharVocab()
    log_probs = torch.randn(12, vocab.size, generator=torch.Generator().manual_seed(2)).log_softmax(-1)
    stops, tok = model.prompt.stop_ids, model.tokenizer
    plain = TextCTCScores(log_probs, vocab.encode, tok, stops, pre_beam=4)
    bonus = TextCTCScores(log_probs, vocab.encode, tok, stops, pre_beam=4, label_bonus=1.5)
    beams = [tok.convert_tokens_to_ids(list("ab")), tok.convert_tokens_to_ids(list("a,"))]
    cands = torch.tensor([*tok.convert_tokens_to_ids(["c", " ", "!"]), stops[0]])
    is_stop = torch.tensor([False, False, False, True])
    lengths = torch.tensor([[3.0, 3.0, 3.0, 2.0], [3.0, 2.0, 2.0, 1.0]])  # "abc", "ab ", "ab " | "ab"; "a c", "a ", ...
    assert torch.allclose(bonus.scores(beams, cands, is_stop), plain.scores(beams, cands, is_stop) + 1.5 * lengths)
    # "a," then "!" adds no label: allowed once, not twice in a row
    assert plain.scores(beams, cands, is_stop)[1, 2] > float("-inf")
    twice = plain.scores([tok.convert_tokens_to_ids(list("a,!"))], cands, is_stop)
    assert twice[0, 2] == float("-inf") and twice[0, 0] > float("-inf")


def test_joint_decoding_with_the_encoders_ctc(model, batch):
    """Any projector works with the encoder's CTC; a batch equals its utterances one at a time."""
    from efin.inference import SpeechLLMRecognizer

    feats, lens = batch
    torch.manual_seed(0)
    vocab = CharVocab()
    head = torch.nn.Linear(16, vocab.size)
    llm, tok = build_tiny_llm()
    plain = SpeechLLM(LinearEncoder(), StackingMLPProjector(16, 64, stack=2, hidden_dim=32), llm, tok).eval()
    text_ctc = TextCTC(head, vocab)
    hyps = joint_decode(plain, feats, lens, ctc_weight=0.5, num_beams=2, max_new_tokens=MAX_NEW, text_ctc=text_ctc,
                        pre_beam=4)
    for b, h in enumerate(hyps):
        alone = joint_decode(plain, feats[b : b + 1, : lens[b]], lens[b : b + 1], ctc_weight=0.5, num_beams=2,
                             max_new_tokens=MAX_NEW, text_ctc=text_ctc, pre_beam=4)[0]
        assert alone.tokens == h.tokens and alone.stop_token == h.stop_token
    first_pass = {"ctc_head": {"vocab": vocab.state(), "state_dict": head.state_dict()}}
    rec = SpeechLLMRecognizer.from_model(plain, ctc_weight=0.5, num_beams=2, max_new_tokens=MAX_NEW,
                                         joint_ctc="encoder", joint_pre_beam=4, first_pass=first_pass)
    assert rec.transcribe(feats, lens) == detokenize(plain, hyps)
    with pytest.raises(ArtifactError, match="joint_ctc=encoder: .*lacks it"):
        SpeechLLMRecognizer.from_model(plain, ctc_weight=0.5, joint_ctc="encoder", first_pass={})
    pieces = {"ctc_head": {"vocab": {"kind": "sentencepiece"}, "state_dict": {}}}
    with pytest.raises(ValueError, match="joint_ctc=encoder: .*needs a character CTC"):
        SpeechLLMRecognizer.from_model(plain, ctc_weight=0.5, joint_ctc="encoder", first_pass=pieces)
    with pytest.raises(ValueError, match="joint_ctc=frames: choose projector"):
        SpeechLLMRecognizer.from_model(plain, ctc_weight=0.5, joint_ctc="frames")


# ---- wiring ---------------------------------------------------------------------------------


def test_recognizer_option_decodes_jointly(model, batch):
    from efin.inference import SpeechLLMRecognizer

    feats, lens = batch
    rec = SpeechLLMRecognizer.from_model(model, ctc_weight=0.3, num_beams=2, max_new_tokens=MAX_NEW,
                                         speculative={"draft": "auto"})  # transcribe's default: off here
    assert rec.speculative is None
    assert SpeechLLMRecognizer.from_model(model, speculative={"draft": "auto"}).speculative is not None  # unchanged
    beam = SpeechLLMRecognizer.from_model(model, num_beams=2, speculative={"draft": "auto"})
    assert beam.speculative is None  # beam search asked for: auto steps aside instead of refusing
    expected = detokenize(model, joint_decode(model, feats, lens, ctc_weight=0.3, num_beams=2, max_new_tokens=MAX_NEW))
    assert rec.transcribe(feats, lens) == expected


def test_joint_decoding_refuses_what_it_cannot_do(model):
    from efin.inference import SpeechLLMRecognizer

    llm, tok = build_tiny_llm()
    plain = SpeechLLM(LinearEncoder(), StackingMLPProjector(16, 64, stack=2, hidden_dim=32), llm, tok).eval()
    with pytest.raises(ValueError, match=r"ctc_weight=0.3: .*StackingMLPProjector\) has none.*joint_ctc=encoder"):
        SpeechLLMRecognizer.from_model(plain, ctc_weight=0.3)
    with pytest.raises(ValueError, match="cannot be combined with n-best rescoring"):
        SpeechLLMRecognizer.from_model(model, ctc_weight=0.3, rescore_nbest=4)
    with pytest.raises(ValueError, match="not joint CTC/LLM decoding"):
        SpeechLLMRecognizer.from_model(model, ctc_weight=0.3, speculative={"draft": "ctc"})
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        SpeechLLMRecognizer.from_model(model, ctc_weight=1.5)
    with pytest.raises(TypeError, match="needs a CTC projector"):
        joint_decode(plain, torch.zeros(1, 8, 8), torch.tensor([8]))


def test_joint_options_are_refused_for_an_encoder_artifact(tmp_path):
    from efin.artifacts import save_artifact
    from efin.inference import load_recognizer

    path = save_artifact(tmp_path / "artifact", "encoder", {"encoder": {}, "ctc_head": {}, "features": {}})
    with pytest.raises(ValueError, match=r"\['ctc_weight'\] do not apply to an encoder artifact"):
        load_recognizer(path, ctc_weight=0.3)


@pytest.mark.parametrize("config_name, inputs", [("evaluate", "manifest=m.jsonl"), ("transcribe", "audio=a.wav")])
def test_decode_joint_composes(tmp_path, config_name, inputs):
    from efin.evaluate import decode_options

    cfg = compose_config(["artifact=a", inputs, "decode=joint"], tmp_path, config_name=config_name)
    assert cfg.decode.ctc_weight == 0.6 and cfg.decode.num_beams == 4 and cfg.decode.joint_ctc == "encoder"
    options = decode_options(cfg.decode, tmp_path, "default")
    assert options["ctc_weight"] == 0.6 and options["joint_label_bonus"] == 2.5
