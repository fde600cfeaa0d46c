"""Manifest loading and validation against real audio files written into tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile

from efin.data.manifest import (
    SUPPORTED_SAMPLE_RATES,
    ManifestError,
    Utterance,
    load_manifest,
    write_manifest,
)


def make_audio(path: Path, seconds: float = 1.0, sample_rate: int = 16000, fmt: str = "FLAC") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), sample_rate, format=fmt)
    return path


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def corpus(tmp_path):
    """A manifest directory with one good 1 s FLAC (a.flac) and one good line for it."""
    make_audio(tmp_path / "audio" / "a.flac", 1.0)
    good = {"audio_filepath": "audio/a.flac", "duration": 1.0, "text": "Hello world.", "id": "good"}
    return tmp_path, good


def test_valid_manifest_resolves_relative_paths_and_defaults(corpus):
    root, good = corpus
    make_audio(root / "audio" / "b.flac", 2.0)
    manifest = write_lines(
        root / "m.jsonl",
        [
            good,
            "",  # blank lines are ignored
            {"audio_filepath": "audio/b.flac", "duration": 1.5, "offset": 0.5, "text": "Hi", "speaker": 7},
        ],
    )
    utts = load_manifest(manifest)
    assert utts[0] == Utterance("good", str(root / "audio" / "a.flac"), 1.0, "Hello world.")
    b = utts[1]
    assert b.id == "b-3"  # default id: audio stem + line number
    assert Path(b.audio_filepath).is_absolute() and b.audio_filepath == str(root / "audio" / "b.flac")
    assert (b.offset, b.speaker, b.duration) == (0.5, "7", 1.5)


def test_relative_paths_resolve_against_manifest_dir_not_cwd(corpus, monkeypatch, tmp_path_factory):
    root, good = corpus
    write_lines(root / "m.jsonl", [good])
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load_manifest(root / "m.jsonl")[0].audio_filepath == str(root / "audio" / "a.flac")


def _corrupt(root: Path) -> dict:
    (root / "audio" / "bad.flac").write_bytes(b"this is not audio" * 50)
    return {"audio_filepath": "audio/bad.flac", "duration": 1.0, "text": "x"}


def _rate_12k(root: Path) -> dict:
    make_audio(root / "audio" / "r12k.wav", 1.0, sample_rate=12000, fmt="WAV")
    return {"audio_filepath": "audio/r12k.wav", "duration": 1.0, "text": "x"}


def _damaged(root: Path, name: str, damage, duration: float = 1.0) -> dict:
    """A file whose header reads fine but whose audio does not decode as declared."""
    path = root / "audio" / name
    if damage is None:  # a valid WAV header with zero frames
        soundfile.write(path, np.zeros(0, dtype=np.float32), 16000, format="WAV")
    else:
        make_audio(path, 1.0)
        path.write_bytes(damage(path.read_bytes()))
        assert soundfile.info(path).frames == 16000  # the header still promises 1 s
    return {"audio_filepath": f"audio/{name}", "duration": duration, "text": "x"}


def _line(**changes):
    def build(_root):
        entry = {"audio_filepath": "audio/a.flac", "duration": 1.0, "text": "fine text"}
        entry.update(changes)
        return {k: v for k, v in entry.items() if v is not _DROP}

    return build


_DROP = object()

# (case name, builder(root) -> line, expected fragment of the problem, load kwargs)
BAD_LINES = [
    ("bad_json", lambda r: '{"audio_filepath": "audio/a.flac", "duration": 1.0,', "invalid JSON", {}),
    ("not_an_object", lambda r: "[1, 2, 3]", "expected a JSON object", {}),
    ("missing_text", _line(text=_DROP), "missing key(s) 'text'", {}),
    ("missing_two_keys", _line(duration=_DROP, audio_filepath=_DROP), "'audio_filepath', 'duration'", {}),
    ("missing_audio", _line(audio_filepath="audio/nope.flac"), "audio file not found", {}),
    ("corrupt_audio", _corrupt, "cannot decode audio", {}),
    ("zero_duration", _line(duration=0), "duration must be a positive number", {}),
    ("negative_duration", _line(duration=-1.0), "duration must be a positive number", {}),
    ("string_duration", _line(duration="1.0"), "duration must be a positive number", {}),
    (
        "nan_duration",
        lambda r: '{"audio_filepath": "audio/a.flac", "duration": NaN, "text": "x"}',
        "positive number",
        {},
    ),
    (
        "duration_longer_than_file",
        _line(duration=1.5),
        "declared duration 1.500 s but the audio decodes to 1.000 s",
        {},
    ),
    (
        "duration_shorter_than_file",
        _line(duration=0.3),
        "declared duration 0.300 s but the audio decodes to 1.000 s",
        {},
    ),
    ("truncated_flac", lambda r: _damaged(r, "trunc.flac", lambda b: b[: len(b) // 2]), "cannot decode audio", {}),
    (
        "garbled_flac",
        lambda r: _damaged(r, "garbled.flac", lambda b: b[:4000] + bytes(8000) + b[12000:]),
        "cannot decode audio",
        {},
    ),
    ("zero_frame_wav", lambda r: _damaged(r, "empty.wav", None, duration=0.05), "holds no samples", {}),
    ("offset_past_file", _line(duration=0.8, offset=0.5), "does not fit the audio file", {}),
    ("negative_offset", _line(offset=-0.5), "offset must be", {}),
    ("empty_text", _line(text=""), "empty after normalisation", {}),
    ("punctuation_only_text", _line(text=" ?! -- "), "empty after normalisation", {}),
    ("non_string_text", _line(text=123), "transcript must be a string", {}),
    ("null_text", _line(text=None), "transcript must be a string", {}),
    ("unsupported_sample_rate", _rate_12k, "unsupported sample rate 12000 Hz", {}),
    ("duplicate_id", _line(id="good"), "duplicate id 'good' (first used on line 1)", {}),
    ("bad_id_type", _line(id=["x"]), "id must be a string", {}),
    ("too_long", _line(duration=1.0), "exceeds max_duration 0.5 s", {"max_duration": 0.5}),
]


@pytest.mark.parametrize("name,build,fragment,kwargs", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_each_bad_line_is_reported_with_location_and_fix(corpus, name, build, fragment, kwargs):
    root, good = corpus
    if "max_duration" in kwargs:
        good = dict(good, duration=0.4, offset=0.0)  # keep the good line under the limit (a segment)
    manifest = write_lines(root / "m.jsonl", [good, build(root)])
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, **kwargs)
    problems = err.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{manifest}:2: ")
    assert fragment in problems[0]
    assert " — " in problems[0]  # every report says what to do
    assert fragment in str(err.value)

    kept = load_manifest(manifest, on_invalid="skip", **kwargs)
    assert [u.id for u in kept] == ["good"]


def test_error_lists_every_bad_line(corpus):
    root, good = corpus
    manifest = write_lines(
        root / "m.jsonl",
        ["not json", good, _line(duration=-1)(root), _line(text="")(root), _line(audio_filepath="x.flac")(root)],
    )
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    assert [p.split(": ")[0] for p in err.value.problems] == [f"{manifest}:{i}" for i in (1, 3, 4, 5)]
    assert "4 of 5 lines invalid" in str(err.value)


def test_one_line_with_several_problems_reports_each(corpus):
    root, _ = corpus
    manifest = write_lines(root / "m.jsonl", [_line(duration=0, text="")(root)])
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    assert len(err.value.problems) == 2


def test_long_error_message_is_capped(corpus):
    root, good = corpus
    manifest = write_lines(root / "m.jsonl", [good] + ["{bad"] * 60)
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    assert len(err.value.problems) == 60
    assert "... and 10 more" in str(err.value)
    assert str(err.value).count("invalid JSON") == 50


def test_skip_logs_count_and_lines(corpus, caplog):
    root, good = corpus
    manifest = write_lines(root / "m.jsonl", [good, _line(duration=0)(root), "oops"])
    with caplog.at_level(logging.WARNING, logger="efin.data.manifest"):
        kept = load_manifest(manifest, on_invalid="skip")
    assert len(kept) == 1
    assert "2 of 3 lines invalid" in caplog.text
    assert f"{manifest}:2:" in caplog.text and f"{manifest}:3:" in caplog.text


def test_skip_with_nothing_left_raises(corpus):
    root, _ = corpus
    manifest = write_lines(root / "m.jsonl", [_line(duration=0)(root)])
    with pytest.raises(ManifestError, match="none valid"):
        load_manifest(manifest, on_invalid="skip")


def test_missing_manifest_names_path_and_the_prepare_script(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(err.value)
    assert "prepare_librispeech.py" in str(err.value)


def test_empty_manifest_raises(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no utterances"):
        load_manifest(tmp_path / "m.jsonl")


def test_unknown_on_invalid_is_rejected(corpus):
    root, good = corpus
    with pytest.raises(ValueError, match="on_invalid"):
        load_manifest(write_lines(root / "m.jsonl", [good]), on_invalid="ignore")


def test_json_error_column_of_an_unclosed_object(corpus):
    root, good = corpus
    line = json.dumps(good)[:-1]  # the closing brace is missing
    manifest = write_lines(root / "m.jsonl", [line])
    with pytest.raises(ManifestError, match=rf"m.jsonl:1: invalid JSON \(.* at column {len(line) + 1}\)"):
        load_manifest(manifest)


def test_decoding_is_cached_by_path_size_and_mtime(corpus, monkeypatch, tmp_path_factory):
    from efin.data import audio_probe

    root, good = corpus
    make_audio(root / "audio" / "b.flac", 2.0)
    manifest = write_lines(root / "m.jsonl", [good, {"audio_filepath": "audio/b.flac", "duration": 2.0, "text": "b"}])
    cache = tmp_path_factory.mktemp("cache")
    decoded = []
    real = audio_probe.probe_audio
    monkeypatch.setattr(audio_probe, "probe_audio", lambda p: (decoded.append(Path(p).name), real(p))[1])
    assert len(load_manifest(manifest, cache_dir=cache)) == 2
    assert sorted(decoded) == ["a.flac", "b.flac"]
    decoded.clear()
    assert len(load_manifest(manifest, cache_dir=cache)) == 2
    assert decoded == []  # a rerun decodes nothing
    make_audio(root / "audio" / "b.flac", 1.0)  # changed on disk: decoded again, and now wrong
    with pytest.raises(ManifestError, match="b.flac|declared duration 2.000 s"):
        load_manifest(manifest, cache_dir=cache)
    assert decoded == ["b.flac"]


def test_duration_tolerance_and_check_audio_off(corpus):
    root, good = corpus
    manifest = write_lines(root / "m.jsonl", [dict(good, duration=1.08)])  # within 0.1 s of the file
    assert load_manifest(manifest)[0].duration == 1.08
    manifest = write_lines(root / "m.jsonl", [dict(good, audio_filepath="missing.flac")])
    assert len(load_manifest(manifest, check_audio=False)) == 1


def test_supported_rates_include_common_ones():
    assert {8000, 16000, 44100, 48000} <= SUPPORTED_SAMPLE_RATES


def test_write_manifest_round_trip_relative_inside_absolute_outside(tmp_path, tmp_path_factory):
    inside = make_audio(tmp_path / "audio" / "in.flac", 1.0)
    outside = make_audio(tmp_path_factory.mktemp("other") / "out.flac", 1.0)
    utts = [
        Utterance("in", str(inside), 1.0, "inside", speaker="s1"),
        Utterance("out", str(outside), 0.5, "outside", offset=0.25),
    ]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, utts)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert lines[0]["audio_filepath"] == "audio/in.flac"
    assert lines[1]["audio_filepath"] == str(outside)
    assert "offset" not in lines[0] and "speaker" not in lines[1]
    assert load_manifest(manifest) == utts


def test_audio_failing_at_training_time_is_skipped_and_counted(corpus, caplog):
    """A file that changed on disk after validation: its batch shrinks, nothing crashes."""
    from efin.data.audio import LogMel
    from efin.data.dataset import SpeechDataset, collate

    root, good = corpus
    make_audio(root / "audio" / "b.flac", 1.0)
    manifest = write_lines(
        root / "m.jsonl", [good, {"audio_filepath": "audio/b.flac", "duration": 1.0, "text": "b", "id": "b"}]
    )
    dataset = SpeechDataset(load_manifest(manifest), LogMel(n_mels=8))
    (root / "audio" / "b.flac").write_bytes(b"gone bad" * 100)
    with caplog.at_level(logging.WARNING, logger="efin.data.dataset"):
        batch = collate([dataset[0], dataset[1]])
    assert batch["ids"] == ["good"] and batch["feats"].shape[0] == 1 and batch["audio_errors"] == 1
    assert dataset.audio_errors == 1 and "skipping utterance b" in caplog.text
    alone = collate([dataset[1]])  # a batch of only the failed one: its substitute trains instead
    assert alone["ids"] == ["good"] and alone["audio_errors"] == 1
