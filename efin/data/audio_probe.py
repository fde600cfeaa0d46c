"""Decoding every audio file of a manifest once, as validation does, and remembering the result.

:func:`probe_audio` decodes a whole file (a header alone passes truncated or garbled files);
:class:`AudioProbeCache` keeps each file's result keyed by path, size and modification time, so
re-validating an unchanged corpus decodes nothing. Used by :mod:`efin.data.manifest`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile

log = logging.getLogger(__name__)

# Threads decoding audio files (libsndfile releases the GIL).
DECODE_THREADS = min(8, os.cpu_count() or 1)


def probe_audio(path: str) -> dict:
    """Decode a whole audio file once: ``{"frames", "rate"}`` of what actually decodes, or
    ``{"error": reason}`` (missing, unreadable, corrupt: a truncated FLAC loses sync, garbled
    data fails mid-file). The header alone would pass such files."""
    if not os.path.isfile(path):
        return {"error": "not found"}
    try:
        with soundfile.SoundFile(path) as f:
            rate, frames = f.samplerate, 0
            for block in f.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):
                frames += block.shape[0]
    except Exception as err:  # libsndfile raises several types for corrupt files
        text = str(err).strip()
        return {"error": text.splitlines()[-1] if text else type(err).__name__}
    return {"frames": frames, "rate": rate}


class AudioProbeCache:
    """Decode results per audio file, keyed by path + size + mtime, so re-validating an unchanged
    corpus decodes nothing. Stored as one JSON file per manifest under ``cache_dir`` (written
    atomically; None: kept in memory only)."""

    def __init__(self, manifest: Path, cache_dir: str | os.PathLike | None):
        self.file = None
        self.entries: dict[str, list] = {}
        if cache_dir is not None:
            key = hashlib.sha1(str(manifest.resolve()).encode()).hexdigest()[:16]
            self.file = Path(cache_dir) / f"{manifest.stem}-{key}.json"
            try:
                self.entries = json.loads(self.file.read_text())
            except (OSError, ValueError):
                self.entries = {}
        self.changed = False

    @staticmethod
    def _stamp(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def probe_all(self, paths: Iterable[str]) -> dict[str, dict]:
        """``{path: probe_audio(path)}``, decoding (in parallel) only files not cached as they are."""
        results, todo = {}, []
        for path in dict.fromkeys(paths):
            stamp = self._stamp(path)
            cached = self.entries.get(path)
            if stamp is not None and cached is not None and tuple(cached[:2]) == stamp:
                results[path] = cached[2]
            else:
                todo.append((path, stamp))
        if todo:
            with ThreadPoolExecutor(DECODE_THREADS) as pool:
                for (path, stamp), probe in zip(todo, pool.map(probe_audio, [p for p, _ in todo])):
                    results[path] = probe
                    if stamp is not None:
                        self.entries[path] = [*stamp, probe]
                        self.changed = True
        return results

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.file.name}.", suffix=".tmp", dir=self.file.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.file)
        except OSError as err:  # a read-only cache costs a re-decode next time, nothing more
            log.warning("audio check cache not written (%s): %s", self.file, err)
