"""Scoring transcripts and writing result files (no Lightning: evaluation and stages share it)."""

from __future__ import annotations

import json
from pathlib import Path

from efin.metrics import ErrorCounts


def score(records: list[dict]) -> tuple[ErrorCounts, list[dict]]:
    """Corpus counts plus the records annotated with per-utterance word/char edits."""
    counts = ErrorCounts()
    scored = []
    for r in records:
        w, c = counts.add(r["ref"], r["hyp"])
        scored.append({**r, "word_errors": w, "ref_words": len(r["ref"].split()), "char_errors": c})
    return counts, scored


def write_results(out_dir: str | Path, split: str, records: list[dict]) -> dict:
    """Write <out_dir>/<split>.hyps.jsonl (per utterance) and <split>.metrics.json; return metrics."""
    counts, scored = score(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{split}.hyps.jsonl", "w") as f:
        for r in scored:
            f.write(json.dumps(r) + "\n")
    metrics = {
        "split": split, "utterances": counts.utterances, "wer": counts.wer, "cer": counts.cer,
        "word_errors": counts.word_edits, "words": counts.words,
        "char_errors": counts.char_edits, "chars": counts.chars,
    }
    (out_dir / f"{split}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
