"""Shared fixtures: composing the real Hydra configs with tiny components."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from torch import nn

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EFIN_DIR = str(Path(__file__).resolve().parents[1] / "efin")
#: Stage encoder's word LM from the tiny corpus' transcripts only: the default adds WordNet's
#: 1.2 M words, a ~40 s build that tests of the stage do not need.
TRANSCRIPTS_LM = "stage.module.lm.sources=[transcripts]"

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine extra threads
# make every step many times slower.
torch.set_num_threads(1)


def load_script(name: str):
    """scripts/<name>.py imported as a module (scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose_config(
    overrides: list[str], root: Path, data_dir: Path | None = None, config_name: str = "train", run: str = "run1"
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the CLI would, with outputs under ``root``.

    The run directory is ``<stage_dir>/runs/<run>``, where the CLI would put a timestamp.
    """
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} resolve outside @hydra.main
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
        if "output_dir" in cfg.paths:
            cfg.paths.output_dir = "${paths.stage_dir}/runs/" + run
        del cfg.hydra
    return cfg


def with_values(cfg: DictConfig, **values) -> DictConfig:
    """A copy of ``cfg`` with top-level keys set (new keys allowed)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        for k, v in values.items():
            cfg[k] = v
    return cfg


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory) -> Path:
    """One data directory per test session, so the tiny corpus is generated once."""
    return tmp_path_factory.mktemp("data")


class LinearEncoder(nn.Module):
    """Stand-in encoder with the real interface: 4x subsampling + Linear."""

    def __init__(self, feat_dim: int = 8, output_dim: int = 16):
        super().__init__()
        self.lin = nn.Linear(feat_dim, output_dim)
        self.output_dim = output_dim

    def forward(self, feats, feat_lens):
        return self.lin(feats[:, ::4]), torch.div(feat_lens + 3, 4, rounding_mode="floor")


@pytest.fixture(autouse=True)
def _grad_enabled():
    """Every test starts with autograd on: a Lightning run stopped by an error inside
    ``trainer.fit`` (tests of bad input do that) can leave grad mode off in this process."""
    with torch.enable_grad():
        yield


class DeprecatedCallError(AssertionError):
    """A deprecated API of a dependency was called from efin's own code."""


def _caller_outside(frame, package_dir: str):
    """The first frame above ``frame`` that is neither in ``package_dir`` (the library that
    warned) nor in torch's module-call or functools plumbing between it and its caller."""
    plumbing = ("torch/nn/modules/module.py", "functools.py", "contextlib.py")
    while frame is not None and (
        frame.f_code.co_filename.startswith(package_dir) or frame.f_code.co_filename.endswith(plumbing)
    ):
        frame = frame.f_back
    return frame


_original_warn = warnings.warn


def _warn_failing_on_our_deprecated_calls(message, category=None, stacklevel=1, source=None, **kwargs):
    """``warnings.warn`` that raises when a dependency deprecates something efin calls directly.

    Libraries attribute their deprecation warnings to whatever called them (``stacklevel=2``),
    which for a model's ``forward`` is torch's call plumbing, not us; so a ``filterwarnings``
    module pattern cannot catch them. Here we walk the stack instead: from the warning's
    origin, past the warning library's own frames, to the first caller. If that is efin code,
    the test fails, so a deprecation (transformers' ``past_key_values`` -> ``cache``) is fixed
    before the release that removes the old name breaks users. Deprecations that a
    dependency triggers inside itself (peft calling transformers) are not ours to fix.
    """
    if category is None and isinstance(message, Warning):
        category = type(message)
    if category is not None and issubclass(category, (DeprecationWarning, FutureWarning)):
        origin = sys._getframe(1)
        library = origin.f_code.co_filename
        site = library.rsplit("/site-packages/", 1)
        if len(site) == 2:
            package_dir = site[0] + "/site-packages/" + site[1].split("/", 1)[0]
            caller = _caller_outside(origin, package_dir)
            if caller is not None and caller.f_code.co_filename.startswith(EFIN_DIR):
                raise DeprecatedCallError(
                    f"{caller.f_code.co_filename}:{caller.f_lineno} calls a deprecated API: {message}"
                )
    return _original_warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _warn_failing_on_our_deprecated_calls


def padded_feature_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Four utterances of 8-dim random features, lengths 64 / 23 / 41 / 8 frames, with garbage
    (7.0) in the padding that decoding must ignore: feats (4, 64, 8), lens (4,)."""
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([64, 23, 41, 8])
    feats = torch.randn(4, 64, 8, generator=g)
    feats[torch.arange(64)[None, :] >= lens[:, None]] = 7.0
    return feats, lens
