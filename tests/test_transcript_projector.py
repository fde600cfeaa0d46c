"""The transcript projector (projector=transcript): stage llm reading the encoder stage's own
character CTC transcript as text, from the encoder artifact, with tiny components."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from efin.artifacts import ArtifactError, load_artifact
from efin.evaluate import manifest_loader
from efin.handoff import set_transcript_decoding
from efin.inference import load_recognizer
from efin.models.projector import TranscriptProjector
from efin.train import train
from tests.conftest import TRANSCRIPTS_LM, compose_config, load_script

TINY = ["data=tiny", "encoder=tiny", "llm=tiny", "~logger", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "~callbacks.progress_bar", "~callbacks.lr_monitor"]


def _train(root, data_dir, overrides):
    cfg = compose_config(TINY + overrides, root, data_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = f"{cfg.paths.stage_dir}/runs/test"
    return train(cfg)


@pytest.fixture(scope="module")
def transcript_llm(tmp_path_factory, shared_data_dir):
    root = tmp_path_factory.mktemp("transcript")
    _train(root, shared_data_dir, ["stage=encoder", "projector=tiny", TRANSCRIPTS_LM])
    metrics = _train(root, shared_data_dir, ["experiment=transcript_llm"])
    return root, shared_data_dir, metrics


def test_llm_reads_the_encoder_ctc_transcript(transcript_llm):
    root, data_dir, metrics = transcript_llm
    outputs = root / "outputs" / "default"
    encoder = load_artifact(outputs / "encoder" / "artifact")
    stored = load_artifact(outputs / "llm_tiny_transcript" / "artifact")
    assert "test/wer/test" in metrics and metrics["val/wer/dev_ctc"] >= 0  # the transcript it reads, scored
    projector = stored["projector"]
    assert projector["config"]["symbols"] == encoder["ctc_head"]["vocab"]["symbols"]
    for k, v in encoder["ctc_head"]["state_dict"].items():  # the CTC head is copied, frozen
        assert torch.equal(projector["state_dict"][f"head.{k}"], v)

    llm_rec, featurizer = load_recognizer(outputs / "llm_tiny_transcript" / "artifact")
    ctc_rec, _ = load_recognizer(outputs / "encoder" / "artifact", lm=False)
    feats = torch.randn(2, 120, featurizer.n_mels)
    lens = torch.tensor([120, 80])
    model = llm_rec.model
    # what the LLM reads: the encoder CTC's greedy transcript, tokenised as training transcripts are
    texts = ctc_rec.transcribe(feats, lens)
    hidden, hidden_lens = model.encoder(feats, lens)
    assert model.projector.transcripts(hidden, hidden_lens) == texts
    ids = [model.tokenizer(t or " ", add_special_tokens=False)["input_ids"] for t in texts]
    speech, speech_lens = model.embed_speech(feats, lens)
    assert speech_lens.tolist() == [len(i) for i in ids]
    table = model.llm.get_input_embeddings()
    for b, row in enumerate(ids):
        assert torch.equal(speech[b, : len(row)], table(torch.tensor(row)))
        assert not speech[b, len(row):].any()
    assert len(llm_rec.transcribe(feats, lens)) == 2


def _never_blank(head: torch.nn.Linear) -> None:
    """A barely trained CTC head writes nothing; without blanks it spells (an error-full transcript)."""
    with torch.no_grad():
        head.bias[0] = -1e4


def test_llm_reads_the_word_lm_transcript(transcript_llm):
    """ctc_decoding=lm: the LLM reads the encoder's CTC + word LM transcript, trained that way
    (projector.ctc_decoding=lm) or chosen when decoding (decode.transcript_decoding=lm)."""
    root, data_dir, _ = transcript_llm
    outputs = root / "outputs" / "default"
    dev = data_dir / "synthetic-tiny" / "dev.jsonl"
    read_with = [f"stage.module.transcript_lm_sources=[{dev}]", "test_after_fit=false"]  # its own LM in training
    with pytest.raises(ValueError, match="projector.ctc_decoding=lm"):
        _train(root, data_dir, ["experiment=transcript_llm", "stage.run_name=llm_tiny_transcript_x", *read_with])
    metrics = _train(root, data_dir, ["experiment=transcript_llm", "projector.ctc_decoding=lm",
                                      "stage.run_name=llm_tiny_transcript_lm", *read_with])
    assert metrics["val/wer/dev_ctc"] >= 0
    trained = outputs / "llm_tiny_transcript_lm" / "artifact"
    stored = load_artifact(trained)
    assert stored["projector"]["config"]["ctc_decoding"] == "lm"
    assert stored["ctc_lm"] == load_artifact(outputs / "encoder" / "artifact")["ctc_lm"]  # decoding reads with it
    texts = {}
    for lm in (True, False):  # the encoder artifact's own decodings: CTC + word LM, greedy CTC
        ctc_rec, featurizer = load_recognizer(outputs / "encoder" / "artifact", lm=lm)
        _never_blank(ctc_rec.model.head)
        batch = next(iter(manifest_loader(data_dir / "synthetic-tiny" / "dev.jsonl", featurizer, 120.0, limit=2)))
        feats, lens = batch["feats"], batch["feat_lens"]
        texts["lm" if lm else "greedy"] = ctc_rec.transcribe(feats, lens)
    assert all(texts["greedy"]) and texts["lm"] != texts["greedy"]
    words = set(load_artifact(outputs / "encoder" / "artifact")["ctc_lm"]["words"])
    assert {w for t in texts["lm"] for w in t.split()} <= words
    for artifact, options, reads in (
        (trained, {}, "lm"),
        (trained, {"transcript_decoding": "greedy"}, "greedy"),
        (outputs / "llm_tiny_transcript" / "artifact", {"transcript_decoding": "lm"}, "lm"),
    ):
        rec, _ = load_recognizer(artifact, **options)
        _never_blank(rec.model.projector.head)
        hidden, hidden_lens = rec.model.encoder(feats, lens)
        assert rec.model.projector.transcripts(hidden, hidden_lens) == texts[reads]
        assert len(rec.transcribe(feats, lens)) == len(lens)

    with pytest.raises(ValueError, match="transcript_decoding='beam'"):
        load_recognizer(trained, transcript_decoding="beam")
    with pytest.raises(ArtifactError, match="carries none"):
        set_transcript_decoding(TranscriptProjector(input_dim=4, output_dim=8), {"ctc_head": {}}, "lm")
    with pytest.raises(ValueError, match="ctc_decoding='beam'"):
        TranscriptProjector(input_dim=4, output_dim=8, ctc_decoding="beam")


def test_transcript_projector_needs_a_character_ctc():
    projector = TranscriptProjector(input_dim=4, output_dim=8)
    with pytest.raises(ValueError, match="character CTC"):
        projector.set_ctc_head({"vocab": {"kind": "sentencepiece", "model_proto": b""}, "state_dict": {}})
    with pytest.raises(RuntimeError, match="attach"):
        projector.token_ids(torch.zeros(1, 3, 4), torch.tensor([3]))



def test_speculative_transcript_draft_equals_greedy(transcript_llm):
    """draft=ctc on a transcript projector drafts the text the LLM reads; lossless against greedy."""
    from efin.decoding.generate import generate
    from efin.decoding.sequence_drafters import TranscriptDrafter

    root, _, _ = transcript_llm
    artifact = root / "outputs" / "default" / "llm_tiny_transcript" / "artifact"
    spec_rec, featurizer = load_recognizer(artifact, speculative={"draft": "ctc"})
    assert isinstance(spec_rec.speculative.drafter, TranscriptDrafter)
    assert load_recognizer(artifact, speculative={"draft": "auto"})[0].speculative is None  # slower there: not auto
    # read with the word LM, the LLM mostly copies its input: auto drafts it
    lm_rec, _ = load_recognizer(artifact, speculative={"draft": "auto"}, transcript_decoding="lm")
    assert isinstance(lm_rec.speculative.drafter, TranscriptDrafter)
    searches = []
    search = lm_rec.model.projector._lm_decoder
    lm_rec.model.projector._lm_decoder = lambda *a: searches.append(1) or search(*a)
    torch.manual_seed(0)
    for rec in (spec_rec, lm_rec):
        _never_blank(rec.model.projector.head)  # a non-empty transcript to draft
        for n in (150, 90, 40):
            feats, lens = torch.randn(1, n, featurizer.n_mels), torch.tensor([n])
            assert rec.transcribe(feats, lens) == generate(rec.model, feats, lens)
            (stats,) = rec.last_stats
            assert stats.committed == sum(stats.accepted) and stats.draft_forwards == 0
    assert len(searches) == 6  # 3 greedy decodings + 3 speculative: the draft reuses what the prompt read


def test_trained_draft_reads_the_targets_transcript(transcript_llm):
    """A draft SpeechLLM of a transcript LLM (here: a second copy of it) reads what its target reads,
    also when the target reads with the word LM, without a search of its own; lossless."""
    from efin.decoding.generate import generate

    root, _, _ = transcript_llm
    artifact = root / "outputs" / "default" / "llm_tiny_transcript" / "artifact"
    rec, featurizer = load_recognizer(artifact, speculative={"draft": str(artifact)}, transcript_decoding="lm")
    target, draft = rec.model.projector, rec.speculative.drafter.draft.projector
    assert target.ctc_decoding == "lm" and draft.ctc_decoding == "lm"  # the draft artifact was trained greedy
    searches = []
    search = target._lm_decoder
    target._lm_decoder = lambda *a: searches.append(1) or search(*a)
    _never_blank(target.head)
    _never_blank(draft.head)
    torch.manual_seed(0)
    for n in (150, 90):
        feats, lens = torch.randn(1, n, featurizer.n_mels), torch.tensor([n])
        assert rec.transcribe(feats, lens) == generate(rec.model, feats, lens)
        (stats,) = rec.last_stats
        assert stats.draft_forwards > 0 and stats.committed == sum(stats.accepted)
    assert len(searches) == 4  # 2 speculative + 2 greedy: the draft's prompt reused the target's read
    # another CTC head: the draft reads on its own, as built
    with torch.no_grad():
        draft.head.weight.add_(1.0)
    assert not draft.read_from(load_recognizer(artifact)[0].model.projector)


def test_draft_distilled_from_the_transcript_llm_reads_what_it_reads(transcript_llm):
    """experiment=transcript_draft_distill: a draft of the transcript LLM trains on the target's
    distribution, the target reading the very transcript the draft reads (here with the word LM)."""
    from efin.stages.distill import DistillTarget

    root, data_dir, _ = transcript_llm
    metrics = _train(root, data_dir, ["experiment=transcript_draft_distill", "llm=tiny_draft",
                                      "llm.model.num_layers=1",  # the tiny target has 2 layers
                                      "stage.module.distill.target=llm_tiny_transcript", "projector.ctc_decoding=lm"])
    assert 0.0 <= float(metrics["val/agree/dev"]) <= 1.0
    outputs = root / "outputs" / "default"
    draft, featurizer = load_recognizer(outputs / "llm_tiny_draft_transcript" / "artifact")
    assert draft.model.projector.ctc_decoding == "lm"
    target = DistillTarget.build(load_artifact(outputs / "llm_tiny_transcript" / "artifact"), draft.model,
                                 dict(featurizer.config), train_encoder=False)
    assert target.share_encoder and target.model.projector.ctc_decoding == "lm"  # trained greedy, reads the draft's
    # how the transcript is read is a setting, not weights: training may continue reading it another way
    _train(root, data_dir, ["experiment=transcript_draft_distill", "llm=tiny_draft", "llm.model.num_layers=1",
                            "stage.module.distill.target=llm_tiny_transcript", "stage.run_name=draft_greedy",
                            f"stage.init_from={outputs / 'llm_tiny_draft_transcript' / 'artifact'}"])
    assert load_recognizer(outputs / "draft_greedy" / "artifact")[0].model.projector.ctc_decoding == "greedy"


def test_recall_script_scores_what_the_llm_reads(transcript_llm, capsys):
    """scripts/token_ctc_recall.py on a transcript artifact: the input's WER / CER as text and
    its bag-of-tokens recall; the pure helpers count with multiplicity."""
    script = load_script("token_ctc_recall")
    assert script.bag_scores([5, 5, 7], [5, 7, 7, 9]) == (2, 3, 4)
    probs = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.0, 0.7]])
    vocab_ids = torch.tensor([40, 41])
    assert script.kept_tokens(probs, vocab_ids, 0.5) == [40, 40, 41]  # the blank-like frame splits the repeat
    assert script.kept_tokens(probs, vocab_ids, 0.05) == [40, 41]  # kept, it merges with its neighbours

    root, data_dir, _ = transcript_llm
    artifact = root / "outputs" / "default" / "llm_tiny_transcript" / "artifact"
    script.main([str(artifact), str(data_dir / "synthetic-tiny" / "dev.jsonl"), "--limit", "3"])
    out = capsys.readouterr().out
    assert "3 utterances" in out and "CER" in out and "recall" in out
