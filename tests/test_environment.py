"""The torch/torchaudio pair: the installed one loads, and a mismatched one stops every
``python -m efin.*`` command at start-up with one line naming both versions and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from efin.environment import FIX_COMMAND, TESTED_TORCH, TESTED_TORCHAUDIO


def test_installed_pair_loads_and_is_the_tested_one():
    import torch
    import torchaudio

    assert torch.__version__.split("+")[0] == TESTED_TORCH
    assert torchaudio.__version__.split("+")[0] == TESTED_TORCHAUDIO
    assert f"pip install torch=={TESTED_TORCH} torchaudio=={TESTED_TORCHAUDIO}" == FIX_COMMAND


def _fake_torchaudio(root: Path, version: str, body: str) -> Path:
    """A torchaudio package + dist-info that shadows the installed one on PYTHONPATH."""
    (root / "torchaudio").mkdir(parents=True)
    (root / "torchaudio" / "__init__.py").write_text(body)
    info = root / f"torchaudio-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchaudio\nVersion: {version}\n")
    return root


BROKEN = 'raise OSError("libtorchaudio.so: undefined symbol: torch_exception_get_what")'


@pytest.mark.parametrize(
    "command, version, body, problem",
    [
        # what pip installed when torchaudio==2.11.* admitted 2.11.1
        ("efin.train", "2.11.1", BROKEN, "do not load together"),
        ("efin.evaluate", "2.11.1", BROKEN, "do not load together"),
        ("efin.train", "2.12.0", "", "torch release of its own version number"),
    ],
)
def test_mismatched_pair_stops_commands_with_one_line(tmp_path, command, version, body, problem):
    fake = _fake_torchaudio(tmp_path / "site", version, body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(Path(__file__).resolve().parents[1])])}
    proc = subprocess.run(
        [sys.executable, "-m", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    message = lines[0]
    assert f"torch {TESTED_TORCH}" in message and f"torchaudio {version}" in message
    assert problem in message
    assert FIX_COMMAND in message


def test_mismatched_pair_is_an_import_error_for_library_users(tmp_path):
    fake = _fake_torchaudio(tmp_path / "site", "2.12.0", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(Path(__file__).resolve().parents[1])])}
    proc = subprocess.run(
        [sys.executable, "-c", "import efin"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "ImportError: efin needs torch and torchaudio as one matching pair" in proc.stderr
