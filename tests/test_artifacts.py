"""Artifacts are safe to open: tensors in safetensors, the rest in JSON; a crafted pickle cannot run code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from efin.artifacts import ArtifactError, load_artifact, save_artifact


def _payload() -> dict:
    shared = torch.arange(6.0).reshape(2, 3)
    return {
        "encoder": {
            "config": {"d_model": 4, "dims": (1, 2), "dropout": 0.0},
            "state_dict": {"w": shared, "tied": shared},
        },
        "ctc_head": {
            "vocab": {"kind": "sentencepiece", "model_proto": b"\x00\x01binary"},
            "state_dict": {"b": torch.ones(3, dtype=torch.bfloat16)},
        },
        "features": {"n_mels": 8, "ids": {1: "one", 2: "two"}, "none": None, "list": [1.5, "x", [True]]},
    }


def test_round_trip_keeps_structure_and_uses_no_pickle(tmp_path):
    directory = save_artifact(tmp_path / "artifact", "encoder", _payload(), "a: 1\n", provenance={"git_commit": "abc"})
    assert sorted(p.name for p in directory.iterdir()) == ["artifact.json", "config.yaml", "weights.safetensors"]
    artifact = load_artifact(directory, expected_stage="encoder")
    expected = _payload()
    assert artifact["stage"] == "encoder" and artifact["provenance"] == {"git_commit": "abc"}
    assert artifact["encoder"]["config"] == expected["encoder"]["config"]  # the tuple stays a tuple
    assert torch.equal(artifact["encoder"]["state_dict"]["tied"], expected["encoder"]["state_dict"]["w"])
    assert artifact["ctc_head"]["vocab"] == expected["ctc_head"]["vocab"]
    assert artifact["ctc_head"]["state_dict"]["b"].dtype == torch.bfloat16
    assert artifact["features"] == expected["features"]


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    directory = tmp_path / "artifact"
    directory.mkdir()
    torch.save({"format_version": 1, "stage": "encoder", "x": _RunsCode(marker)}, directory / "artifact.pt")
    with pytest.raises(ArtifactError, match="refused"):
        load_artifact(directory, expected_stage="encoder")
    assert not marker.exists()
    # even when the crafted file sits next to a valid artifact.json, only the JSON is read
    save_artifact(tmp_path / "good", "encoder", _payload())
    os.replace(directory / "artifact.pt", tmp_path / "good" / "artifact.pt")
    assert load_artifact(tmp_path / "good")["stage"] == "encoder" and not marker.exists()


def test_legacy_artifact_pt_still_loads(tmp_path):
    directory = tmp_path / "old"
    directory.mkdir()
    torch.save({"format_version": 1, "stage": "encoder", **_payload()}, directory / "artifact.pt")
    artifact = load_artifact(directory, expected_stage="encoder")
    assert artifact["features"]["n_mels"] == 8


def test_damaged_artifact_gives_a_clear_error(tmp_path):
    directory = save_artifact(tmp_path / "artifact", "encoder", _payload())
    (directory / "weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError, match="not a complete artifact"):
        load_artifact(directory)
