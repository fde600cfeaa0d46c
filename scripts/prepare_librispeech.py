#!/usr/bin/env python
"""Turn LibriSpeech-style directories into one efin JSONL manifest.

Expected layout (any depth below --src; LibriSpeech/ itself or train-clean-100/ both work)::

    SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt   lines "UTTID TRANSCRIPT"
    SPEAKER/CHAPTER/UTTID.flac

Each manifest line gets id=UTTID, speaker=SPEAKER, duration from the file header (soundfile),
and the transcript (lowercased unless --keep-case: LibriSpeech is all upper case, and efin's
normaliser lowercases anyway). Transcript lines without audio, audio without a transcript line,
unreadable files and over-long utterances are counted and reported, then left out.

    python scripts/prepare_librispeech.py --src LibriSpeech/train-clean-100 LibriSpeech/train-clean-360 \\
        --out data/librispeech/train_960.jsonl --max-duration 20
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from efin.data.manifest import Utterance, write_manifest  # noqa: E402

log = logging.getLogger("prepare_librispeech")
AUDIO_SUFFIXES = (".flac", ".wav")
_SHOW = 10  # examples listed per kind of problem


def _read_transcripts(trans: Path, problems: dict[str, list[str]]) -> dict[str, str]:
    texts = {}
    for line_no, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) < 2:
            problems["transcript line without text"].append(f"{trans}:{line_no}: {line.strip()!r}")
            continue
        texts[parts[0]] = parts[1].strip()
    return texts


def prepare(
    srcs: list[str | Path], out: str | Path, max_duration: float | None = None, keep_case: bool = False
) -> dict[str, int]:
    """Scan ``srcs`` and write the manifest ``out``; returns counts (written and per problem)."""
    problems: dict[str, list[str]] = defaultdict(list)
    utterances: list[Utterance] = []
    seen: set[str] = set()
    next_log = 10000
    for src in srcs:
        src = Path(src).expanduser().absolute()
        if not src.is_dir():
            raise SystemExit(f"--src {src} is not a directory")
        trans_files = sorted(src.rglob("*.trans.txt"))
        if not trans_files:
            problems["source without any *.trans.txt"].append(str(src))
        for trans in trans_files:
            chapter_dir = trans.parent
            texts = _read_transcripts(trans, problems)
            audio = {p.stem: p for p in sorted(chapter_dir.iterdir()) if p.suffix.lower() in AUDIO_SUFFIXES}
            for stem in sorted(set(audio) - set(texts)):
                problems["audio without transcript line"].append(f"{audio[stem]} (no line in {trans.name})")
            for utt_id, text in texts.items():
                path = audio.get(utt_id)
                if path is None:
                    problems["transcript line without audio"].append(
                        f"{trans}: {utt_id} (expected {chapter_dir / (utt_id + '.flac')})"
                    )
                    continue
                if utt_id in seen:
                    problems["duplicate utterance id"].append(f"{utt_id} again in {trans}")
                    continue
                try:
                    info = soundfile.info(str(path))
                except Exception as err:  # corrupt or not audio
                    problems["unreadable audio"].append(f"{path} ({err})")
                    continue
                duration = info.frames / info.samplerate
                if duration <= 0:
                    problems["empty audio"].append(str(path))
                    continue
                if max_duration is not None and duration > max_duration:
                    problems[f"longer than --max-duration {max_duration:g} s"].append(f"{path} ({duration:.1f} s)")
                    continue
                seen.add(utt_id)
                # LibriSpeech ids are SPEAKER-CHAPTER-UTT; fall back to the directory two levels up.
                speaker = utt_id.split("-")[0] if "-" in utt_id else chapter_dir.parent.name
                utterances.append(
                    Utterance(
                        id=utt_id,
                        audio_filepath=str(path),
                        duration=round(duration, 4),
                        text=text if keep_case else text.lower(),
                        speaker=speaker,
                    )
                )
            if len(utterances) >= next_log:
                log.info("%d utterances so far", len(utterances))
                next_log += 10000

    counts = {"written": len(utterances)} | {kind: len(items) for kind, items in problems.items()}
    for kind, items in problems.items():
        shown = "\n".join(f"  {item}" for item in items[:_SHOW])
        more = f"\n  ... and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
        log.warning("%d x %s (left out):\n%s%s", len(items), kind, shown, more)
    if not utterances:
        raise SystemExit(
            f"no utterances found under {', '.join(map(str, srcs))}: expected SPEAKER/CHAPTER/"
            "SPEAKER-CHAPTER.trans.txt files next to the audio"
        )
    write_manifest(out, utterances)
    hours = sum(u.duration for u in utterances) / 3600
    log.info(
        "wrote %s: %d utterances, %.1f h, %d speakers",
        out,
        len(utterances),
        hours,
        len({u.speaker for u in utterances}),
    )
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description="LibriSpeech-style directories -> efin JSONL manifest")
    parser.add_argument("--src", nargs="+", required=True, help="one or more source directories, merged")
    parser.add_argument("--out", required=True, help="manifest to write (.jsonl)")
    parser.add_argument("--max-duration", type=float, default=None, help="leave out longer utterances (s)")
    parser.add_argument("--keep-case", action="store_true", help="keep transcripts' case (default: lowercase)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return prepare(args.src, args.out, args.max_duration, args.keep_case)


if __name__ == "__main__":
    main()
