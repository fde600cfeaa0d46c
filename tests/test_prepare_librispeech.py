"""scripts/prepare_librispeech.py on a small fake LibriSpeech tree of real FLAC files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from efin.data.manifest import load_manifest
from tests.conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_librispeech.py"
prep = load_script("prepare_librispeech")


def flac(path: Path, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, np.full(int(seconds * 16000), 0.1, np.float32), 16000, format="FLAC")


def chapter(root: Path, speaker: str, chap: str, utts: dict[str, float | None], lines: list[str]) -> Path:
    """utts: UTT suffix -> seconds (None: no audio file); lines: transcript lines as written."""
    d = root / speaker / chap
    d.mkdir(parents=True, exist_ok=True)
    for utt, seconds in utts.items():
        if seconds is not None:
            flac(d / f"{speaker}-{chap}-{utt}.flac", seconds)
    (d / f"{speaker}-{chap}.trans.txt").write_text("".join(line + "\n" for line in lines))
    return d


@pytest.fixture
def tree(tmp_path):
    clean100 = tmp_path / "LibriSpeech" / "train-clean-100"
    chapter(
        clean100, "19", "198",
        {"0000": 1.0, "0001": 2.0, "0002": None, "0003": 1.5, "0004": 30.0},
        ["19-198-0000 NORTHANGER ABBEY", "19-198-0001 IT'S A TRUTH", "19-198-0002 NO AUDIO HERE",
         "19-198-0004 A VERY LONG ONE"],
    )  # fmt: skip
    clean360 = tmp_path / "LibriSpeech" / "train-clean-360"
    chapter(clean360, "100", "121669", {"0000": 0.5}, ["100-121669-0000 TOM THE PIPER'S SON"])
    return clean100, clean360


def test_merges_sources_and_reports_problems(tree, tmp_path, caplog):
    out = tmp_path / "manifests" / "train.jsonl"
    with caplog.at_level(logging.WARNING, logger="prepare_librispeech"):
        counts = prep.prepare(list(tree), out, max_duration=20)
    assert counts == {
        "written": 3,
        "audio without transcript line": 1,
        "transcript line without audio": 1,
        "longer than --max-duration 20 s": 1,
    }
    assert "19-198-0002" in caplog.text and "19-198-0003.flac" in caplog.text and "19-198-0004" in caplog.text

    utts = {u.id: u for u in load_manifest(out)}  # the manifest passes full validation
    assert sorted(utts) == ["100-121669-0000", "19-198-0000", "19-198-0001"]
    u = utts["19-198-0001"]
    assert (u.speaker, u.duration, u.text) == ("19", 2.0, "it's a truth")
    assert u.audio_filepath == str(tree[0] / "19" / "198" / "19-198-0001.flac")
    assert utts["100-121669-0000"].speaker == "100"


def test_parent_directory_and_keep_case(tree, tmp_path):
    out = tmp_path / "all.jsonl"
    counts = prep.prepare([tree[0].parent], out, keep_case=True)  # LibriSpeech/ holds both subsets
    assert counts["written"] == 4  # no --max-duration: the 30 s file is kept
    texts = {json.loads(x)["id"]: json.loads(x)["text"] for x in out.read_text().splitlines()}
    assert texts["19-198-0000"] == "NORTHANGER ABBEY"


def test_transcript_line_without_text_and_empty_source(tmp_path):
    src = tmp_path / "src"
    chapter(src, "7", "1", {"0000": 1.0, "0001": 1.0}, ["7-1-0000 HELLO", "7-1-0001"])
    counts = prep.prepare([src], tmp_path / "m.jsonl")
    assert counts["written"] == 1 and counts["transcript line without text"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no utterances found"):
        prep.prepare([tmp_path / "empty"], tmp_path / "n.jsonl")
    assert not (tmp_path / "n.jsonl").exists()


def test_cli(tree, tmp_path):
    out = tmp_path / "cli.jsonl"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--src", *map(str, tree), "--out", str(out), "--max-duration", "20"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert len(out.read_text().splitlines()) == 3
    assert "transcript line without audio" in run.stderr and "wrote" in run.stderr
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), "--src", str(tmp_path / "nope"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "is not a directory" in missing.stderr
