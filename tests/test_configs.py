"""Every config file composes, and every tiny one builds, so a renamed argument fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config

GROUPS = sorted(
    p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in {"hydra", "local"}
)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((Path(CONF_DIR) / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_composes(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("group", [g for g in GROUPS if (Path(CONF_DIR) / g / "tiny.yaml").exists()])
def test_tiny_components_instantiate(group, tmp_path):
    cfg = compose_config([f"{group}=tiny"], tmp_path)
    built = instantiate(cfg[group], _partial_=False) if "_target_" in cfg[group] else None
    assert built is not None


def test_misspelled_key_fails_clearly(tmp_path):
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_config(["stage.module.lrr=0.1"], tmp_path)


def test_unknown_group_option_fails_clearly(tmp_path):
    with pytest.raises(ConfigCompositionException, match="encoder"):
        compose_config(["encoder=huge"], tmp_path)
