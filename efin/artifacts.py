"""Stage handoff: each stage exports one named artifact that the next stage loads.

An artifact is a directory holding ``artifact.pt`` (weights and the configs needed to rebuild
every component) and ``config.yaml`` (the run's composed config, for humans). Loading checks
that the artifact is of the kind the caller expects and holds every expected key, instead of
loading whatever is there with ``strict=False``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.pt"

# Keys every artifact of a stage must hold; later stages add their own.
# Stages 2 and 3 (efin.stages.speech_llm) share one layout: encoder and projector weights with
# their configs, the LLM as a build spec plus only the weights a rebuild cannot reproduce
# (see efin.models.llm_state), prompt and generation settings; a carried-on ctc_head is optional.
_SPEECH_LLM_KEYS = ("encoder", "projector", "llm", "prompt", "generation", "features")
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "encoder": ("encoder", "ctc_head", "features"),
    "projector": _SPEECH_LLM_KEYS,
    "llm": _SPEECH_LLM_KEYS,
}


# The encoder stage's CTC head and word LM: projector/llm artifacts (and Hugging Face exports)
# carry them on unchanged while the encoder stays frozen, for n-best rescoring (efin.inference).
FIRST_PASS_KEYS = ("ctc_head", "ctc_lm")


class ArtifactError(RuntimeError):
    """An artifact is missing, of the wrong kind, or incomplete."""


def save_artifact(directory: str | Path, stage: str, payload: dict[str, Any], config_yaml: str = "") -> Path:
    """Write ``payload`` as a stage artifact into ``directory`` atomically (tmp dir + rename)."""
    missing = [k for k in REQUIRED_KEYS.get(stage, ()) if k not in payload]
    if missing:
        raise ArtifactError(f"stage {stage!r} artifact is missing keys {missing}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    torch.save({"format_version": FORMAT_VERSION, "stage": stage, **payload}, tmp / ARTIFACT_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load_artifact(path: str | Path, expected_stage: str | tuple[str, ...] | None = None, hint: str = "") -> dict:
    """Load an artifact directory (or its ``artifact.pt``), checking its kind and keys.

    Args:
        path: artifact directory or file.
        expected_stage: the stage kind(s) the caller can start from.
        hint: what to run to produce the artifact, added to the error message.
    """
    path = Path(path)
    file = path / ARTIFACT_FILE if path.is_dir() else path
    if not file.exists():
        raise ArtifactError(f"No stage artifact at {path}. {hint}".strip())
    artifact = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(artifact, dict) or artifact.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{file} is not an efin artifact (format_version {FORMAT_VERSION} expected).")
    stage = artifact.get("stage")
    expected = (expected_stage,) if isinstance(expected_stage, str) else expected_stage
    if expected and stage not in expected:
        raise ArtifactError(f"{file} is a {stage!r} artifact; this step needs one of {list(expected)}. {hint}".strip())
    missing = [k for k in REQUIRED_KEYS.get(stage, ()) if k not in artifact]
    if missing:
        raise ArtifactError(f"{file} ({stage!r} artifact) lacks keys {missing}; re-export it with this efin version.")
    return artifact


def publish(artifact_dir: Path, link: Path) -> None:
    """Point ``link`` (e.g. outputs/default/encoder/artifact) at the newest finished artifact.

    Replacing a symlink is atomic, so a reader never sees a half-published artifact and older
    runs stay untouched.
    """
    link.parent.mkdir(parents=True, exist_ok=True)  # hydra.run.dir may live outside the stage dir
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(artifact_dir, link.parent))
    os.replace(tmp, link)
