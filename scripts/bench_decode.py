"""Benchmark: per-token decoding cost of draft LLMs against their target, side by side.

For the target LLM and each draft configuration it reports the analytic forward cost per
token (multiply-accumulates, :func:`efin.flops.model_flops_per_token`, at the benchmark's
mean context length) and the measured wall time of one KV-cached decoding step at batch 1,
after a prefill of ``--prompt-len`` positions (a speech-LLM prompt: instruction + audio tokens).
Models are timed *interleaved* (one decode run of each in turn, ``--rounds`` times) so that
load from other processes hits all alike; the median is reported, with ratios to the target.

The weights are the pretrained LLM's (a draft is its first layers plus a frequency-ranked
head subset, :func:`efin.models.draft.build_draft_llm`); trained weights do not change the cost.

Run::

    python scripts/bench_decode.py                         # SmolLM2 target, drafts of 1-3 layers
    python scripts/bench_decode.py --threads 1 --drafts 2:8192 2:null 4:8192

Writes ``scripts/bench_decode.json`` (or ``--out``). Absolute timings depend on the machine;
compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from efin.data.manifest import load_manifest  # noqa: E402
from efin.decoding.llm_search import extend, prefill  # noqa: E402
from efin.flops import model_flops_per_token  # noqa: E402
from efin.models.draft import build_draft_llm  # noqa: E402
from efin.models.llm import DEFAULT_LLM, build_llm  # noqa: E402


def parse_draft(spec: str) -> tuple[int, int | None]:
    """``"LAYERS:HEAD_ROWS"`` (HEAD_ROWS ``null`` = full vocabulary) -> (layers, rows)."""
    layers, _, rows = spec.partition(":")
    return int(layers), None if rows in ("", "null", "none") else int(rows)


@torch.inference_mode()
def decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Prefill ``prompt`` (1, P, H), then ``new_tokens`` greedy cached steps; ms per step."""
    mask = torch.ones(prompt.shape[:2], dtype=torch.long)
    positions = torch.arange(prompt.shape[1])[None]
    logits, state = prefill(model, prompt, mask, positions)
    token = logits.argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = extend(model, state, token, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
    return 1000 * (time.perf_counter() - start) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", default=DEFAULT_LLM, help="target LLM: name or path (default: embedded SmolLM2)")
    parser.add_argument("--cache-dir", default=str(REPO / "data/cache/llm"), help="LLM cache directory")
    parser.add_argument("--drafts", nargs="+", default=["1:8192", "2:8192", "3:8192", "2:null"],
                        help="draft configs LAYERS:HEAD_ROWS (null = full head)")
    parser.add_argument("--manifest", default=str(REPO / "data/synthetic/train.jsonl"),
                        help="transcripts that rank a draft head's vocabulary (skipped if missing)")
    parser.add_argument("--prompt-len", type=int, default=60, help="prefill positions (instruction + audio tokens)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoding steps timed per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--out", default=str(REPO / "scripts/bench_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    texts = [u.text for u in load_manifest(args.manifest, check_audio=False)] if Path(args.manifest).exists() else None
    target = build_llm(args.llm, cache_dir=args.cache_dir, adapter="frozen")
    models = {"target": target[0].eval()}
    for spec in args.drafts:
        layers, rows = parse_draft(spec)
        draft, _ = build_draft_llm(target, num_layers=layers, head_rows=rows, texts=texts, adapter="frozen")
        models[f"draft {layers} layers, head {rows or 'full'}"] = draft.eval()

    hidden = target[0].get_input_embeddings().weight.shape[1]
    prompt = torch.randn(1, args.prompt_len, hidden) * target[0].get_input_embeddings().weight.std()
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        decode_ms_per_token(model, prompt, 4)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(decode_ms_per_token(model, prompt, args.new_tokens))

    context = args.prompt_len + args.new_tokens // 2
    macs = {name: model_flops_per_token(model, context_len=context) for name, model in models.items()}
    ms = {name: statistics.median(t) for name, t in times.items()}
    rows = [
        {
            "model": name,
            "macs_per_token": macs[name],
            "macs_ratio": macs[name] / macs["target"],
            "ms_per_token": ms[name],
            "time_ratio": ms[name] / ms["target"],
        }
        for name in models
    ]
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':32s} {'MACs/token':>12s} {'ratio':>6s} {'ms/token':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['model']:32s} {r['macs_per_token'] / 1e6:10.1f} M {r['macs_ratio']:6.3f} "
              f"{r['ms_per_token']:9.2f} {r['time_ratio']:6.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
