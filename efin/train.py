"""Training entry point: python -m efin.train stage=<encoder|projector|llm> [overrides].

Composes the config, builds the components it names, loads the previous stage's artifact,
fits, tests the best checkpoint and exports this stage's artifact. Everything stage-specific
lives in the stage's config file and LightningModule, not here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from efin.artifacts import load_artifact, publish, save_artifact
from efin.checkpoints import find_resume_checkpoint

log = logging.getLogger("efin.train")


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last``: the newest intact checkpoint among this stage's runs (an error if
    there is none); ``auto``: the same, or None (a fresh start) when there is nothing to resume.
    Broken checkpoints are skipped with a warning (efin.checkpoints). A path is used as is."""
    if cfg.ckpt_path not in ("last", "auto"):
        return cfg.ckpt_path
    return find_resume_checkpoint(cfg.paths.stage_dir, mode=cfg.ckpt_path)


def load_init_artifact(cfg: DictConfig) -> dict | None:
    """The artifact this stage starts from, with a message naming the command that makes it."""
    if cfg.init_from is None:
        return None
    requires = cfg.stage.requires
    hint = (
        f"Run the previous stage first: `python -m efin.train stage={requires.command}"
        f" name={cfg.name}` (same experiment), or pass init_from=PATH/TO/artifact."
    )
    return load_artifact(cfg.init_from, expected_stage=tuple(requires.kinds), hint=hint)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage; returns the final metrics (val/* and test/*)."""
    pl.seed_everything(cfg.seed, workers=True)
    init = load_init_artifact(cfg)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.stage.module)
    if init is not None:
        module.init_from_artifact(init)

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not logger:  # nothing to report learning rates to (~logger, debug=fast)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.test_after_fit:
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    elif best:  # export the best weights, as trainer.test would have loaded them
        checkpoint = torch.load(best, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)

    if trainer.is_global_zero and not trainer.fast_dev_run:
        artifact_dir = save_artifact(
            Path(cfg.paths.output_dir) / "artifact", cfg.stage.name, module.artifact_payload(),
            OmegaConf.to_yaml(cfg, resolve=True),
        )
        publish(artifact_dir, Path(cfg.paths.stage_dir) / "artifact")
        log.info("Exported %s artifact to %s (linked from %s/artifact)", cfg.stage.name, artifact_dir, cfg.paths.stage_dir)
    log.info("Final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
