"""Tiny end-to-end encoder stage: train, export, reload the artifact, decode, resume."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import pytest

from efin.artifacts import ArtifactError, load_artifact
from efin.evaluate import evaluate
from efin.inference import load_recognizer
from efin.train import resolve_ckpt_path, train
from tests.conftest import TRANSCRIPTS_LM, compose_config, with_values

TINY = ["data=tiny", "encoder=tiny", "~logger", "trainer.max_epochs=1", TRANSCRIPTS_LM]


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, shared_data_dir):
    root = tmp_path_factory.mktemp("encoder_run")
    cfg = compose_config(TINY, root, shared_data_dir)
    metrics = train(cfg)
    return cfg, metrics


def test_reports_dev_and_test_error_rates(encoder_run):
    _, metrics = encoder_run
    for key in ("val/wer/dev", "val/cer/dev", "test/wer/test", "test/cer/test", "train/loss",
                "val/wer/dev_lm", "test/wer/test_lm", "test/cer/test_lm"):
        assert key in metrics
    # The logged error rates are the corpus rates of the transcripts the stage wrote, recomputed
    # here independently (jiwer), over every test utterance exactly once.
    cfg, _ = encoder_run
    expected_ids = {json.loads(line)["id"] for line in Path(cfg.data.test).read_text().splitlines()}
    for split, metric in (("test", "test/cer/test"), ("test_lm", "test/cer/test_lm")):
        rows = [json.loads(line) for line in (Path(cfg.paths.output_dir) / f"decode/{split}.hyps.jsonl").open()]
        assert sorted(r["id"] for r in rows) == sorted(expected_ids)
        refs, hyps = [r["ref"] for r in rows], [r["hyp"] for r in rows]
        assert metrics[metric] == pytest.approx(jiwer.cer(refs, hyps))
        assert metrics[metric.replace("cer", "wer")] == pytest.approx(jiwer.wer(refs, hyps))


def test_artifact_round_trip_reproduces_test_transcripts(encoder_run, tmp_path):
    cfg, metrics = encoder_run
    link = Path(cfg.paths.stage_dir) / "artifact"
    assert link.is_symlink(), "the stage directory links its newest artifact"
    artifact = load_artifact(link, expected_stage="encoder")
    assert set(artifact) >= {"encoder", "ctc_head", "features", "ctc_lm"}
    assert artifact["encoder"]["config"]["d_model"] == 32

    # Default: the stored word LM (matches the stage's test_lm pass); decode.lm=false: greedy.
    for options, stage_split, metric in (
        ([], "test_lm", "test/cer/test_lm"),
        (["decode.lm=false"], "test", "test/cer/test"),
    ):
        out = tmp_path / stage_split
        eval_cfg = compose_config(
            [f"artifact={link}", f"manifest={cfg.data.test}", f"out_dir={out}",
             f"batch_seconds={cfg.data.val_max_batch_seconds}", f"num_buckets={cfg.data.num_buckets}", *options],
            tmp_path, config_name="evaluate",
        )
        result = evaluate(eval_cfg)
        decoded = Path(cfg.paths.output_dir) / f"decode/{stage_split}.hyps.jsonl"
        stage_hyps = {r["id"]: r["hyp"] for r in map(json.loads, decoded.read_text().splitlines())}
        eval_hyps = {r["id"]: r["hyp"] for r in map(json.loads, (out / "test.hyps.jsonl").read_text().splitlines())}
        assert eval_hyps == stage_hyps
        assert result["cer"] == pytest.approx(metrics[metric])


def test_llm_decode_options_are_refused_for_a_ctc_artifact(encoder_run):
    cfg, _ = encoder_run
    with pytest.raises(ValueError, match=r"\['num_beams'\] do not apply to an encoder artifact"):
        load_recognizer(Path(cfg.paths.stage_dir) / "artifact", num_beams=4)


def test_wrong_artifact_kind_is_refused(encoder_run):
    cfg, _ = encoder_run
    with pytest.raises(ArtifactError, match="needs one of"):
        load_artifact(Path(cfg.paths.stage_dir) / "artifact", expected_stage="llm")


def test_missing_artifact_names_what_to_run(tmp_path):
    with pytest.raises(ArtifactError, match="stage=encoder"):
        load_artifact(
            tmp_path / "nothing", expected_stage="encoder", hint="Run `python -m efin.train stage=encoder` first."
        )


def test_resume_from_last_checkpoint(encoder_run, shared_data_dir):
    cfg, _ = encoder_run
    assert resolve_ckpt_path(with_values(cfg, ckpt_path="last")).endswith("last.ckpt")
    resumed = compose_config(TINY + ["trainer.max_epochs=2", "ckpt_path=last", "test_after_fit=false"],
                             Path(cfg.paths.root_dir), shared_data_dir, run="run2")
    metrics = train(resumed)
    assert "val/cer/dev" in metrics


def test_ckpt_path_last_without_runs_fails_clearly(tmp_path):
    cfg = compose_config(TINY + ["ckpt_path=last"], tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        resolve_ckpt_path(cfg)



def test_each_test_set_is_scored_on_its_own(tmp_path, shared_data_dir):
    """data.test as {name: manifest}: one test/wer/<name> (and <name>_lm) per set, one decode file each."""
    tiny = "${paths.data_dir}/synthetic-tiny"
    cfg = compose_config(TINY + [f"data.test={{accent:{tiny}/test.jsonl,voices:{tiny}/test_voices.jsonl}}"],
                         tmp_path, shared_data_dir)
    metrics = train(cfg)
    sizes = {"accent": 8, "voices": 4}  # conf/data/tiny.yaml: num_test, num_test_voices
    for name in ("accent", "voices", "accent_lm", "voices_lm"):
        assert f"test/wer/{name}" in metrics and f"test/loss/{name.removesuffix('_lm')}" in metrics
        scored = json.loads((Path(cfg.paths.output_dir) / "decode" / f"{name}.metrics.json").read_text())
        assert scored["utterances"] == sizes[name.removesuffix("_lm")]
