"""Logger builders that need more than a plain `_target_` (wandb's offline fallback)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
        return netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_wandb_logger(
    project: str,
    save_dir: str,
    entity: str | None = None,
    run_name: str | None = None,
    group: str | None = None,
    mode: str | None = None,
    log_model: bool = False,
):
    """A Lightning WandbLogger that runs offline when no account is configured.

    The mode is, in order: the `mode` argument, `WANDB_MODE`, "online" when credentials exist,
    otherwise "offline" (sync later with `wandb sync <save_dir>/wandb/offline-run-*`).
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = mode or os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")
    if mode == "offline":
        log.info("wandb: no account configured or WANDB_MODE=offline; logging offline under %s/wandb", save_dir)
    return WandbLogger(
        project=project, entity=entity, name=run_name, group=group, save_dir=save_dir,
        mode=mode, log_model=log_model,
    )
