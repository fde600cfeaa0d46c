"""Zero-shot reference: the bundled Whisper tiny.en, whole (its encoder and its own decoder),
transcribing efin manifests with greedy decoding, scored like every efin decoding.

Not an efin model: it shows what an off-the-shelf pretrained recogniser (trained on 680 k hours)
does on the same test sets, next to what efin trains. Its transcripts go through efin's text
normaliser, which drops digits: Whisper writing "3" for "three" counts as an error.

    python scripts/whisper_reference.py --manifests data/synthetic/test_voices.jsonl data/synthetic/test.jsonl \
        --limit 300 --out scripts/whisper_reference.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from efin.data.audio import WhisperLogMel, load_audio
from efin.data.manifest import load_manifest
from efin.metrics import ErrorCounts
from efin.models.whisper_ct2 import greedy_transcript, load_bundled_whisper
from efin.text import normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifests", nargs="+", required=True)
    parser.add_argument("--limit", type=int, default=None, help="first N utterances of each manifest")
    parser.add_argument("--cache-dir", default="data/cache/whisper", help="where the converted checkpoint goes")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model, tokenizer = load_bundled_whisper(args.cache_dir)
    featurizer = WhisperLogMel()
    results = {}
    for manifest in args.manifests:
        utts = load_manifest(manifest, check_audio=False)[: args.limit]
        counts, audio_s, t0 = ErrorCounts(), 0.0, time.perf_counter()
        for u in utts:
            wave = load_audio(u.audio_filepath, u.offset, u.duration)
            counts.add(normalize(u.text), normalize(greedy_transcript(model, tokenizer, featurizer(wave))))
            audio_s += u.duration
        seconds = time.perf_counter() - t0
        results[manifest] = {"utterances": len(utts), "wer": counts.wer, "cer": counts.cer, "rtf": seconds / audio_s}
        print(f"{manifest}: {len(utts)} utterances, WER {100 * counts.wer:.1f} %, CER {100 * counts.cer:.1f} %, "
              f"RTF {seconds / audio_s:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
