"""Logger builders that need more than a plain `_target_` (wandb's offline fallback)."""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlsplit

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


# Seconds to wait for the wandb server before logging offline instead (compute nodes often
# have no internet; wandb itself would retry for minutes, then fail).
WANDB_REACH_TIMEOUT = 3.0


def _wandb_reachable(timeout: float = WANDB_REACH_TIMEOUT) -> tuple[bool, str]:
    """Whether a TCP connection to the wandb server (``WANDB_BASE_URL``) opens within ``timeout``."""
    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    parts = urlsplit(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False, url
    return True, url


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
    otherwise "offline" (sync later with `wandb sync <save_dir>/wandb/offline-run-*`). "online"
    falls back to "offline", with one warning, when the server does not answer within
    :data:`WANDB_REACH_TIMEOUT` seconds.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = mode or os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")
    if mode == "online":
        reachable, url = _wandb_reachable()
        if not reachable:
            log.warning("wandb: cannot reach %s within %g s; logging offline under %s/wandb instead "
                        "(upload later with `wandb sync`)", url, WANDB_REACH_TIMEOUT, save_dir)
            mode = "offline"
    elif mode == "offline":
        log.info("wandb: no account configured or WANDB_MODE=offline; logging offline under %s/wandb", save_dir)
    return WandbLogger(
        project=project, entity=entity, name=run_name, group=group, save_dir=save_dir,
        mode=mode, log_model=log_model,
    )
