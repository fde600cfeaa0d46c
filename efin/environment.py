"""Start-up check that torch and torchaudio load together.

torchaudio's compiled library links against one torch build: a user who upgrades one of the
two by hand gets an ``undefined symbol`` deep inside an import. ``import efin`` (and so every
``python -m efin.*`` command) checks the pair first and fails with one line that names both
installed versions and the command that fixes them.
"""

from __future__ import annotations

from importlib import metadata

# The pair the test suite was last run with; pyproject.toml pins exactly these.
TESTED_TORCH = "2.11.0"
TESTED_TORCHAUDIO = "2.11.0"
FIX_COMMAND = f"pip install torch=={TESTED_TORCH} torchaudio=={TESTED_TORCHAUDIO}"


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _release(version: str) -> tuple[str, ...]:
    """'2.11.0+cu130' -> ('2', '11')."""
    return tuple(version.split("+", 1)[0].split(".")[:2])


def check_torch_pair() -> None:
    """Raise ImportError (one line, both versions, the fix) unless torch and torchaudio load
    together and share their major.minor release."""
    torch_version, torchaudio_version = _installed("torch"), _installed("torchaudio")
    problem = None
    try:
        import torch  # noqa: F401
        import torchaudio  # noqa: F401
    except (ImportError, OSError) as error:  # OSError: libtorchaudio.so with an undefined symbol
        problem = f"they do not load together ({type(error).__name__}: {str(error).splitlines()[0]})"
    else:
        if _release(torch_version) != _release(torchaudio_version):
            problem = "torchaudio only works with the torch release of its own version number"
    if problem:
        raise ImportError(
            f"efin needs torch and torchaudio as one matching pair; installed: torch {torch_version}, "
            f"torchaudio {torchaudio_version}: {problem}. Fix: `{FIX_COMMAND}` "
            f"(tested pair; to move to a newer torch, install the torchaudio of the same version with it)."
        ) from None
