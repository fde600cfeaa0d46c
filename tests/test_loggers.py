"""wandb runs offline without an account, and the file can be synced later."""

from __future__ import annotations

from pathlib import Path

from efin.loggers import build_wandb_logger


def test_wandb_without_account_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = build_wandb_logger(project="efin-test", save_dir=str(tmp_path), run_name="unit")
    logger.log_metrics({"train/loss": 1.5}, step=1)
    logger.experiment.finish()
    runs = list(Path(tmp_path).glob("wandb/offline-run-*"))
    assert runs, "an offline run directory that `wandb sync` can upload"
    assert list(runs[0].glob("*.wandb"))


def test_wandb_mode_from_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = build_wandb_logger(project="efin-test", save_dir=str(tmp_path))
    logger.log_metrics({"x": 1.0}, step=0)
    assert not list(Path(tmp_path).glob("wandb/offline-run-*"))
