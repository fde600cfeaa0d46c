"""A full disk or read-only output location gets one message naming the path and the setting."""

from __future__ import annotations

import errno

import pytest

import efin.checkpoints
from efin.storage import StorageError, check_writable, storage_errors
from efin.train import train
from tests.conftest import TRANSCRIPTS_LM, compose_config


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_storage_errors_name_the_path_and_setting(tmp_path, code):
    with pytest.raises(StorageError) as info, storage_errors("checkpoints", tmp_path):
        raise OSError(code, "simulated", str(tmp_path / "last.ckpt"))
    message = str(info.value)
    assert str(tmp_path / "last.ckpt") in message and "EFIN_ROOT" in message and "simulated" in message
    assert info.value.errno == code


def test_other_os_errors_pass_through(tmp_path):
    with pytest.raises(FileNotFoundError), storage_errors("checkpoints", tmp_path):
        raise FileNotFoundError(errno.ENOENT, "missing", "x")


def test_check_writable_creates_and_leaves_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    check_writable(target, "outputs")
    assert target.is_dir() and list(target.iterdir()) == []


def test_full_disk_during_training_is_one_clear_error(tmp_path, shared_data_dir, monkeypatch):
    """The disk fills up when the first checkpoint is written (fault injected into the writer)."""

    def no_space(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(efin.checkpoints, "atomic_write", no_space)
    cfg = compose_config(["data=tiny", "encoder=tiny", "~logger", "trainer.max_epochs=1", TRANSCRIPTS_LM], tmp_path,
                         shared_data_dir)
    with pytest.raises(StorageError, match="No space left on device.*EFIN_ROOT"):
        train(cfg)
