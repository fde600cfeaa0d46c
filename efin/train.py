"""Training entry point: python -m efin.train stage=<encoder|projector|llm> [overrides].

Composes the config, builds the components it names, loads the previous stage's artifact,
fits, tests the best checkpoint and exports this stage's artifact. Everything stage-specific
lives in the stage's config file and LightningModule, not here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from efin.artifacts import load_artifact, publish, save_artifact
from efin.checkpoints import find_resume_checkpoint
from efin.storage import check_writable, storage_errors

log = logging.getLogger("efin.train")


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path=last``: the newest intact checkpoint among this stage's runs (an error if
    there is none); ``auto``: the same, or None (a fresh start) when there is nothing to resume.
    Broken checkpoints are skipped with a warning (efin.checkpoints). A path is used as is."""
    if cfg.ckpt_path not in ("last", "auto"):
        return cfg.ckpt_path
    return find_resume_checkpoint(cfg.paths.stage_dir, mode=cfg.ckpt_path)


def load_init_artifact(cfg: DictConfig) -> dict | None:
    """The artifact this stage starts from, with a message naming the command that makes it.

    ``cfg.init_from`` is replaced by the resolved path (not the moving ``<stage>/artifact``
    link), so the run's config and this stage's artifact record which run it started from.
    """
    if cfg.init_from is None:
        return None
    requires = cfg.stage.requires
    hint = (
        f"Run the previous stage first: `python -m efin.train stage={requires.command}"
        f" name={cfg.name}` (same experiment), or pass init_from=PATH/TO/artifact."
    )
    artifact = load_artifact(cfg.init_from, expected_stage=tuple(requires.kinds), hint=hint)
    with open_dict(cfg):
        cfg.init_from = os.path.realpath(cfg.init_from)
    origin = artifact.get("provenance") or {}
    log.info(
        "Starting from the %s artifact %s (run %s, git %s, config sha256 %s)",
        artifact["stage"],
        cfg.init_from,
        origin.get("run_dir", "unknown"),
        origin.get("git_commit", "unknown"),
        origin.get("config_sha256", "unknown"),
    )
    return artifact


def _git_commit() -> str | None:
    """The efin checkout's commit, "+dirty" with uncommitted changes; None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance(cfg: DictConfig, config_yaml: str, init: dict | None) -> dict:
    """Where an artifact comes from: this run's directory, the code's commit, a hash of the
    resolved config, and the resolved artifact it started from (with that one's provenance)."""
    return {
        "run_dir": str(Path(cfg.paths.output_dir).resolve()),
        "git_commit": _git_commit(),
        "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
        "init_from": cfg.init_from,
        "init_provenance": (init or {}).get("provenance"),
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one stage; returns the final metrics (val/* and test/*)."""
    check_writable(cfg.paths.output_dir, "this run's checkpoints and artifact")
    with storage_errors("checkpoints, results or the artifact", cfg.paths.output_dir):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, float]:
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
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        origin = provenance(cfg, config_yaml, init)
        artifact_dir = save_artifact(
            Path(cfg.paths.output_dir) / "artifact", cfg.stage.name, module.artifact_payload(), config_yaml, origin,
        )
        publish(artifact_dir, Path(cfg.paths.stage_dir) / "artifact")
        log.info("Exported %s artifact to %s (linked from %s/artifact); run %s, git %s, config sha256 %s",
                 cfg.stage.name, artifact_dir, cfg.paths.stage_dir, origin["run_dir"], origin["git_commit"],
                 origin["config_sha256"])
    log.info("Final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
