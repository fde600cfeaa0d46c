"""How long references are against the tokens a CTC projector heard (the output-length bound).

    python scripts/ctc_length_ratio.py outputs/c6/projector_smollm2/artifact data/synthetic/dev.jsonl

Prints the ratio reference tokens (end token included) / CTC tokens heard, and how many
references a limit of ceil(f x N + extra_tokens) would cut, for a few factors f.
"""

from __future__ import annotations

import math
import sys

import torch

from efin.evaluate import manifest_loader
from efin.inference import load_recognizer


def main(artifact: str, manifest: str) -> None:
    torch.set_grad_enabled(False)
    recognizer, featurizer = load_recognizer(artifact)
    model = recognizer.model
    pairs = []  # (reference tokens, CTC tokens heard)
    for batch in manifest_loader(manifest, featurizer, 120):
        _, heard = model.embed_speech(batch["feats"], batch["feat_lens"])
        refs, _ = model.prompt.encode_transcripts(batch["texts"])
        pairs += [(len(r), n) for r, n in zip(refs, heard.tolist())]
    ratio = torch.tensor([r / n for r, n in pairs])
    print(f"{len(pairs)} utterances; reference / CTC tokens: mean {ratio.mean():.3f}, median "
          f"{ratio.quantile(0.5):.3f}, p99 {ratio.quantile(0.99):.3f}, max {ratio.max():.3f}")
    for f in (1.0, 1.25, 1.5, 2.0):
        cut = sum(r > math.ceil(f * n + model.extra_tokens) for r, n in pairs)
        print(f"factor {f}: {cut} references longer than ceil({f} x N + {model.extra_tokens})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
