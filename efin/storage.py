"""One clear message when the output location cannot be written (read-only, no permission,
disk or quota full), naming the setting that moves it, instead of a chained traceback from
deep inside a checkpoint or artifact writer."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

# The errors a user fixes by pointing efin somewhere else (or freeing space).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
OUTPUT_SETTINGS = "EFIN_ROOT (or paths.root_dir=...; paths.* in conf/paths/default.yaml)"


class StorageError(OSError):
    """An output location cannot be written; the message names the path and the setting."""


def _explain(error: OSError, what: str, path: str | os.PathLike, settings: str) -> StorageError:
    reason = error.strerror or str(error)
    return StorageError(
        error.errno,
        f"cannot write {what} to {path} ({reason}). Finished work there is kept; point {settings} at a "
        f"writable location with free space, or free space, then rerun (add ckpt_path=auto to resume).",
    )


@contextlib.contextmanager
def storage_errors(what: str, path: str | os.PathLike, settings: str = OUTPUT_SETTINGS) -> Iterator[None]:
    """Turn a read-only / permission / no-space OSError raised inside into a :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        raise _explain(error, what, getattr(error, "filename", None) or path, settings) from error


def check_writable(directory: str | os.PathLike, what: str, settings: str = OUTPUT_SETTINGS) -> None:
    """Create ``directory`` and write + remove a probe file in it, before any work starts."""
    directory = Path(directory)
    with storage_errors(what, directory, settings):
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
