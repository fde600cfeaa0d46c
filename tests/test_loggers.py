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


def test_wandb_with_a_key_but_no_network_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    import logging
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on: the "server" refuses at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="efin.loggers"):
        logger = build_wandb_logger(project="efin-test", save_dir=str(tmp_path), run_name="unit")
        logger.log_metrics({"train/loss": 1.5}, step=1)
        logger.experiment.finish()
    assert time.monotonic() - start < 60  # was ~100 s of retries, then a crash
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot reach" in warnings[0].getMessage() and "offline" in warnings[0].getMessage()
    assert logger._wandb_init["mode"] == "offline"
