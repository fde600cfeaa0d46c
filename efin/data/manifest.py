"""JSONL manifests: one utterance per line, validated before any training step runs.

A manifest line looks like::

    {"audio_filepath": "audio/train/utt1.flac", "duration": 3.21, "text": "Hello there.",
     "id": "utt1", "offset": 0.0, "speaker": "spk1"}

``audio_filepath``, ``duration`` (seconds) and ``text`` are required; ``id`` defaults to
``<audio file stem>-<line number>``, ``offset`` (seconds into the file) to 0 and ``speaker``
to None. Relative audio paths resolve against the manifest's own directory, so a corpus
directory can be moved or mounted elsewhere without rewriting its manifests.

Validation reports *every* bad line at once, each as ``path:LINE: what is wrong — what to do``,
because a cluster job that dies on the first bad line of a 300k-line manifest, then on the
second after a resubmit, wastes far more time than one complete report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from efin.data.audio_probe import AudioProbeCache
from efin.text import normalize

log = logging.getLogger(__name__)

# Sample rates we accept on disk (the loader resamples to the model rate). Anything else is
# more likely a mislabelled or broken file than a real recording.
SUPPORTED_SAMPLE_RATES = frozenset({8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000})
REQUIRED_KEYS = ("audio_filepath", "duration", "text")
# Allowed difference between the declared duration and the decoded audio (s), either way:
# durations are often rounded or computed by another decoder; 0.1 s is well under one word.
DURATION_TOLERANCE = 0.1
# How many problems an error message / warning lists before summarising the rest.
MAX_REPORTED = 50

_PREPARE_HINT = (
    "create it with `python scripts/prepare_librispeech.py --src DIR --out {path}`, "
    "generate the built-in synthetic corpus with `python -m efin.data.synthetic --root DIR`, "
    "or point the data config at an existing manifest"
)


@dataclass(frozen=True)
class Utterance:
    """One manifest entry. ``audio_filepath`` is absolute once loaded; times are in seconds."""

    id: str
    audio_filepath: str
    duration: float
    text: str
    offset: float = 0.0
    speaker: str | None = None


class ManifestError(ValueError):
    """A manifest is missing or has invalid lines; ``problems`` holds every line's report."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _summarise(problems: list[str], limit: int = MAX_REPORTED) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    if len(problems) > limit:
        shown += f"\n  ... and {len(problems) - limit} more"
    return shown


def _is_number(value) -> bool:
    # bool is an int subclass; `"duration": true` is a bug, not one second.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_line(
    raw: str,
    manifest_dir: str,
    line_no: int,
    check_audio: bool,
    max_duration: float | None,
    probes: dict,
) -> tuple[Utterance | None, list[str]]:
    """Parse and validate one line; returns (utterance or None, list of problems)."""
    try:
        entry = json.loads(raw.rstrip("\r\n"))  # with the newline, an unclosed object errs at "line 2 column 1"
    except json.JSONDecodeError as err:
        return None, [f"invalid JSON ({err.msg} at column {err.colno}) — fix or delete the line"]
    if not isinstance(entry, dict):
        return None, [f"expected a JSON object, got {type(entry).__name__} — write one object per line"]
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        return None, [
            f"missing key(s) {', '.join(repr(k) for k in missing)} — every line needs {', '.join(REQUIRED_KEYS)}"
        ]

    problems: list[str] = []
    audio = entry["audio_filepath"]
    if not isinstance(audio, str) or not audio.strip():
        problems.append("audio_filepath must be a non-empty string — give the path of the audio file")
        audio_path = None
    else:
        audio_path = os.path.abspath(os.path.join(manifest_dir, os.path.expanduser(audio)))

    duration = entry["duration"]
    if not _is_number(duration) or duration <= 0:
        problems.append(
            f"duration must be a positive number of seconds, got {duration!r} — "
            "recompute it from the audio file (frames / sample rate)"
        )
        duration = None
    elif max_duration is not None and duration > max_duration:
        problems.append(
            f"duration {duration:.2f} s exceeds max_duration {max_duration:g} s — split the "
            "utterance, drop it, or raise max_duration"
        )

    offset = entry.get("offset", 0.0)
    if offset is None:
        offset = 0.0
    if not _is_number(offset) or offset < 0:
        problems.append(f"offset must be a number of seconds >= 0, got {offset!r} — fix or remove it")
        offset = None

    text = entry["text"]
    if not isinstance(text, str):
        problems.append(f"transcript must be a string, got {type(text).__name__} — quote the text")
    elif not normalize(text):
        problems.append(
            f"transcript {text!r} is empty after normalisation (letters a-z and apostrophes are "
            "kept) — provide the transcript or drop the utterance"
        )

    utt_id = entry.get("id")
    if utt_id is not None and (not isinstance(utt_id, (str, int)) or isinstance(utt_id, bool)):
        problems.append(f"id must be a string, got {utt_id!r} — use a unique string id")
        utt_id = None
    elif utt_id is not None and not str(utt_id).strip():
        problems.append("id is empty — use a unique non-empty id or leave the key out")
        utt_id = None

    speaker = entry.get("speaker")
    if speaker is not None and (not isinstance(speaker, (str, int)) or isinstance(speaker, bool)):
        problems.append(f"speaker must be a string or null, got {speaker!r} — fix or remove it")
        speaker = None

    if check_audio and audio_path is not None:
        problems += _check_audio(audio_path, manifest_dir, duration, offset, "offset" in entry, probes[audio_path])

    if problems:
        return None, problems
    if utt_id is None:
        utt_id = f"{Path(audio_path).stem}-{line_no}"
    return (
        Utterance(
            id=str(utt_id),
            audio_filepath=audio_path,
            duration=float(duration),
            text=text,
            offset=float(offset),
            speaker=None if speaker is None else str(speaker),
        ),
        [],
    )


def _audio_paths(lines: Iterable[str], manifest_dir: str) -> list[str]:
    """Absolute audio paths of the lines that parse (for decoding ahead of validation)."""
    paths = []
    for raw in lines:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        audio = entry.get("audio_filepath") if isinstance(entry, dict) else None
        if isinstance(audio, str) and audio.strip():
            paths.append(os.path.abspath(os.path.join(manifest_dir, os.path.expanduser(audio))))
    return paths


def decode_check(manifest: str | os.PathLike, cache_dir: str | os.PathLike | None) -> None:
    """Decode every audio file of ``manifest`` into the cache of :func:`load_manifest` (no
    reporting): run once per node before the ranks validate, so they decode nothing."""
    manifest = Path(manifest)
    if not manifest.is_file() or cache_dir is None:
        return
    with open(manifest, encoding="utf-8") as f:
        lines = f.readlines()
    cache = AudioProbeCache(manifest, cache_dir)
    cache.probe_all(_audio_paths(lines, str(manifest.resolve().parent)))
    cache.save()


def _check_audio(
    audio_path: str, manifest_dir: str, duration: float | None, offset: float | None, segment: bool, probe: dict
) -> list[str]:
    """Checks on the decoded file: decodes to the end, supported rate, declared duration.

    A line without ``offset`` describes the whole file: its duration must match the decoded
    audio within :data:`DURATION_TOLERANCE` either way (shorter would silently cut the audio
    off). A line with ``offset`` is a segment: it must fit inside the file.
    """
    if probe.get("error") == "not found":
        return [
            f"audio file not found: {audio_path} — fix the path (relative paths resolve against "
            f"the manifest's directory {manifest_dir})"
        ]
    if "error" in probe:
        return [
            f"cannot decode audio {audio_path} ({probe['error']}) — the file is corrupt, truncated or not "
            "audio; re-encode it as FLAC or WAV, or drop the utterance"
        ]
    rate, frames = probe["rate"], probe["frames"]
    if frames == 0 or rate <= 0:
        return [f"audio file {audio_path} holds no samples — re-create it or drop the utterance"]
    problems = []
    if rate not in SUPPORTED_SAMPLE_RATES:
        problems.append(
            f"unsupported sample rate {rate} Hz in {audio_path} — resample it to one of "
            f"{', '.join(str(r) for r in sorted(SUPPORTED_SAMPLE_RATES))} Hz (16000 preferred)"
        )
    if duration is not None and offset is not None:
        total = frames / rate
        if segment and total - offset < duration - DURATION_TOLERANCE:
            problems.append(
                f"duration {duration:.3f} s (offset {offset:g} s) does not fit the audio file, "
                f"which decodes to {total:.3f} s — recompute duration from the file"
            )
        elif not segment and abs(total - duration) > DURATION_TOLERANCE:
            problems.append(
                f"declared duration {duration:.3f} s but the audio decodes to {total:.3f} s — recompute "
                "duration from the file (frames / sample rate), or give an offset for a segment"
            )
    return problems


def load_manifest(
    path: str | os.PathLike,
    on_invalid: str = "error",
    check_audio: bool = True,
    max_duration: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[Utterance]:
    """Read and validate a JSONL manifest.

    Args:
        path: the manifest file.
        on_invalid: "error" raises :class:`ManifestError` listing every bad line; "skip" logs a
            warning with the count and the lines, and returns the valid utterances.
        check_audio: decode every audio file once (in parallel) to check that it exists, decodes
            to the end, has a supported sample rate and matches ``duration`` (see
            :func:`_check_audio`).
        max_duration: seconds; longer utterances count as invalid (they would blow up a batch).
        cache_dir: where decode results are cached by path + size + mtime, so re-validating
            costs one ``stat`` per file; None: no cache (every call decodes).

    Returns:
        utterances in file order, with absolute ``audio_filepath``.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} — " + _PREPARE_HINT.format(path=path))
    manifest_dir = str(path.resolve().parent)

    utterances: list[Utterance] = []
    problems: list[str] = []
    first_line_of_id: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    probes: dict = {}
    if check_audio:
        cache = AudioProbeCache(path, cache_dir)
        probes = cache.probe_all(_audio_paths(lines, manifest_dir))
        cache.save()
    n_lines = 0
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) carry no utterance
        n_lines += 1
        utt, line_problems = _check_line(raw, manifest_dir, line_no, check_audio, max_duration, probes)
        if utt is not None:
            first = first_line_of_id.setdefault(utt.id, line_no)
            if first != line_no:
                line_problems = [f"duplicate id {utt.id!r} (first used on line {first}) — ids must be unique"]
                utt = None
        problems += [f"{path}:{line_no}: {p}" for p in line_problems]
        if utt is not None:
            utterances.append(utt)

    if n_lines == 0:
        raise ManifestError(f"manifest {path} has no utterances — " + _PREPARE_HINT.format(path=path))
    if problems:
        n_bad = n_lines - len(utterances)
        header = f"{path}: {n_bad} of {n_lines} lines invalid"
        if on_invalid == "error" or not utterances:
            hint = "" if utterances else " (none valid)"
            raise ManifestError(
                f"{header}{hint} ({len(problems)} problems):\n{_summarise(problems)}\n"
                "Fix the lines, or load with on_invalid='skip' to drop them.",
                problems,
            )
        log.warning("%s; skipping them:\n%s", header, _summarise(problems))
        for p in problems[MAX_REPORTED:]:
            log.debug("%s", p)
    return utterances


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance], relative: bool = True) -> None:
    """Write utterances as JSONL (atomically: a temp file renamed into place).

    With ``relative=True``, audio files inside the manifest's directory are written relative
    to it, so the directory stays valid when moved; other paths are written absolute.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for u in utterances:
            audio = os.path.abspath(u.audio_filepath)
            if relative:
                rel = os.path.relpath(audio, base)
                if not rel.startswith(".." + os.sep) and rel != "..":
                    audio = rel
            entry = {"id": u.id, "audio_filepath": audio, "duration": u.duration, "text": u.text}
            if u.offset:
                entry["offset"] = u.offset
            if u.speaker is not None:
                entry["speaker"] = u.speaker
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
