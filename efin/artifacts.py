"""Stage handoff: each stage exports one named artifact that the next stage loads.

An artifact is a directory holding ``weights.safetensors`` (every tensor), ``artifact.json``
(everything else: configs, vocabulary, word LM, provenance; tensors appear there as
``{"__tensor__": name}``) and ``config.yaml`` (the run's composed config, for humans).
Opening an artifact never unpickles anything, so a crafted one cannot run code; artifacts of
the older ``artifact.pt`` format load with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain containers. Loading checks that the artifact is of the kind
the caller expects and holds every expected key, instead of loading whatever is there with
``strict=False``.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
ARTIFACT_FILE = "artifact.json"
WEIGHTS_FILE = "weights.safetensors"
LEGACY_FILE = "artifact.pt"  # format of efin before safetensors: read with weights_only=True

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


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (see the module docstring)."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous().clone()  # safetensors refuses shared storage
        return {"__tensor__": name}
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ArtifactError(f"cannot store a {type(value).__name__} in an artifact: use tensors, numbers, strings, "
                        "bytes, lists, tuples and dicts")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_artifact(
    directory: str | Path, stage: str, payload: dict[str, Any], config_yaml: str = "", provenance: dict | None = None
) -> Path:
    """Write ``payload`` as a stage artifact into ``directory`` atomically (tmp dir + rename).

    ``provenance`` (optional): where the artifact comes from (run directory, git commit, config
    hash, the artifact it started from), stored as ``artifact["provenance"]``.
    """
    missing = [k for k in REQUIRED_KEYS.get(stage, ()) if k not in payload]
    if missing:
        raise ArtifactError(f"stage {stage!r} artifact is missing keys {missing}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    extra = {"provenance": provenance} if provenance is not None else {}
    meta = _encode({"format_version": FORMAT_VERSION, "stage": stage, **extra, **payload}, tensors)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "efin_stage": stage})
        (tmp / ARTIFACT_FILE).write_text(json.dumps(meta))
        (tmp / "config.yaml").write_text(config_yaml)
        for name in (WEIGHTS_FILE, ARTIFACT_FILE, "config.yaml"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _read(file: Path) -> Any:
    """The artifact's content without running code: JSON + safetensors, or a legacy
    ``artifact.pt`` through ``torch.load(weights_only=True)``."""
    if file.name == LEGACY_FILE:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
            raise ArtifactError(
                f"{file} holds objects other than tensors and plain containers, which loading would have to run "
                f"code to rebuild; refused ({reason}). If it is an artifact you made yourself with an older efin, "
                "re-export it with this version."
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ArtifactError(f"{file} is not a readable artifact ({type(err).__name__}: {err}).") from None
    try:
        meta = json.loads(file.read_text())
        tensors = load_file(str(file.parent / WEIGHTS_FILE), device="cpu")
    except (OSError, ValueError, SafetensorError) as err:
        raise ArtifactError(f"{file.parent} is not a complete artifact ({type(err).__name__}: {err}).") from None
    return _decode(meta, tensors)


def load_artifact(path: str | Path, expected_stage: str | tuple[str, ...] | None = None, hint: str = "") -> dict:
    """Load an artifact directory (or its ``artifact.json`` / legacy ``artifact.pt``), checking
    its kind and keys. Never runs code from the files (see the module docstring).

    Args:
        path: artifact directory or file.
        expected_stage: the stage kind(s) the caller can start from.
        hint: what to run to produce the artifact, added to the error message.
    """
    path = Path(path)
    if path.is_dir():
        file = (
            path / ARTIFACT_FILE
            if (path / ARTIFACT_FILE).exists() or not (path / LEGACY_FILE).exists()
            else path / LEGACY_FILE
        )
    else:
        file = path
    if not file.exists():
        raise ArtifactError(f"No stage artifact at {path}. {hint}".strip())
    artifact = _read(file)
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
