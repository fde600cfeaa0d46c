"""Benchmark: duration-bucketed batches vs fixed-size batches in random order.

Both plans get the same mean audio seconds per batch. Reported side by side:

1. padded-frame fraction over a whole epoch (from manifest durations, 100 frames/s): the share
   of encoder input that is padding;
2. training throughput, audio seconds per second of forward+backward+AdamW on a small
   Conformer encoder, on ``--compute-batches`` batches drawn from each plan's epoch (real
   audio, features precomputed) and timed *interleaved* (one step of each plan in turn,
   ``--rounds`` times) so that load from other processes on a shared machine hits both plans
   alike;
3. the real DataLoader (``--num-workers`` workers) feeding ``--steps`` training steps per plan
   (plans alternate every ``--chunk`` steps): the fraction of step time spent blocked on the
   next batch, and the end-to-end throughput.

Run (defaults: the synthetic corpus' training manifest, generated if missing)::

    python scripts/bench_data.py
    python scripts/bench_data.py --manifest /data/ls/train.jsonl --max-seconds 120 --steps 50

Writes ``scripts/bench_data.json`` (or ``--out``). Absolute timings depend on the machine and
its load; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from efin.data.audio import LogMel  # noqa: E402
from efin.data.dataset import SpeechDataset, collate  # noqa: E402
from efin.data.manifest import load_manifest  # noqa: E402
from efin.data.sampler import DurationBucketSampler  # noqa: E402

FRAMES_PER_SECOND = 100


def frames(seconds: float) -> int:
    return int(seconds * FRAMES_PER_SECOND) + 1  # LogMel: T // hop + 1


def padding_stats(batches: list[list[int]], durations: list[float]) -> dict:
    """Padded-frame fraction and batch-size statistics of a batch plan (no audio loaded)."""
    real = padded = 0
    seconds = []
    for b in batches:
        lens = [frames(durations[i]) for i in b]
        real += sum(lens)
        padded += len(b) * max(lens)
        seconds.append(sum(durations[i] for i in b))
    return {
        "batches": len(batches),
        "padded_frame_fraction": 1 - real / padded,
        "mean_batch_seconds": statistics.fmean(seconds),
        "max_batch_seconds": max(seconds),
        "mean_batch_size": statistics.fmean(len(b) for b in batches),
    }


def build_model(args) -> torch.nn.Module:
    try:
        from efin.models import encoder as enc
    except ImportError:
        enc = None
    kwargs = dict(input_dim=80, d_model=args.d_model, num_layers=args.num_layers, num_heads=4,
                  ffn_dim=4 * args.d_model, conv_kernel=15, dropout=0.0)
    if enc is not None and hasattr(enc, "build_encoder"):
        return enc.build_encoder(**kwargs)
    if enc is not None and hasattr(enc, "Encoder"):
        return enc.Encoder(**kwargs)
    raise SystemExit("efin.models.encoder.Encoder not found")


def make_step(model: torch.nn.Module, device: str):
    """One training step (forward, masked loss, backward, AdamW) on a collated batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(batch: dict) -> None:
        feats = batch["feats"].to(device, non_blocking=True)
        lens = batch["feat_lens"].to(device)
        hidden, out_lens = model(feats, lens)
        mask = (torch.arange(hidden.shape[1], device=device)[None] < out_lens[:, None]).unsqueeze(-1)
        loss = (hidden.pow(2) * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def batch_audio_seconds(batch: dict) -> float:
    return (batch["feat_lens"].sum().item() - len(batch["ids"])) / FRAMES_PER_SECOND


def interleaved_compute(batches: dict[str, list[dict]], step, rounds: int) -> dict[str, dict]:
    """Time model steps only, alternating plans batch by batch (first pass untimed: warm-up).

    Each batch's time is its median over ``rounds`` passes, so a burst of load from another
    process during one pass does not count. Process CPU time is recorded too: on a shared
    machine it measures the work itself, where wall time also measures the neighbours.
    """
    names = list(batches)
    for name in names:
        for batch in batches[name]:
            step(batch)
    times = {name: [[] for _ in batches[name]] for name in names}
    cpu = {name: [[] for _ in batches[name]] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for i in range(max(len(b) for b in batches.values())):
            for name in order:
                if i < len(batches[name]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    step(batches[name][i])
                    times[name][i].append(time.perf_counter() - t0)
                    cpu[name][i].append(time.process_time() - c0)
    out = {}
    for name in names:
        compute = sum(statistics.median(t) for t in times[name])
        cpu_s = sum(statistics.median(t) for t in cpu[name])
        audio = sum(batch_audio_seconds(b) for b in batches[name])
        frames = sum(b["feats"].shape[0] * b["feats"].shape[1] for b in batches[name])
        out[name] = {"batches": len(batches[name]), "rounds": rounds, "compute_s": compute, "audio_s": audio,
                     "input_frames": frames, "audio_s_per_compute_s": audio / compute,
                     "cpu_s": cpu_s, "audio_s_per_cpu_s": audio / cpu_s}
    return out


def loader_steps(loaders: dict[str, DataLoader], step, steps: int, chunk: int) -> dict[str, dict]:
    """Train from real DataLoaders, alternating plans every ``chunk`` steps until each has ``steps``.

    The first step of every chunk is untimed: the idle loader's workers have refilled their
    prefetch queue meanwhile, so that step would never wait. Alternating spreads background
    load from other processes over both plans.
    """
    iters = {name: iter(loader) for name, loader in loaders.items()}
    stats = {name: {"waits": [], "totals": [], "audio": 0.0} for name in loaders}

    def next_batch(name):
        try:
            return next(iters[name])
        except StopIteration:
            iters[name] = iter(loaders[name])
            return next(iters[name])

    for name in loaders:  # worker start-up, untimed
        step(next_batch(name))
    while any(len(st["totals"]) < steps for st in stats.values()):
        for name, st in stats.items():
            step(next_batch(name))  # untimed: see above
            for _ in range(min(chunk, steps - len(st["totals"]))):
                t0 = time.perf_counter()
                batch = next_batch(name)
                t1 = time.perf_counter()
                step(batch)
                t2 = time.perf_counter()
                st["waits"].append(t1 - t0)
                st["totals"].append(t2 - t0)
                st["audio"] += batch_audio_seconds(batch)
    out = {}
    for name, st in stats.items():
        wall = sum(st["totals"])
        out[name] = {"steps": steps, "wall_s": wall, "audio_s": st["audio"], "audio_s_per_wall_s": st["audio"] / wall,
                     "data_wait_fraction": sum(st["waits"]) / wall, "max_wait_s": max(st["waits"]),
                     "median_step_s": statistics.median(st["totals"])}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=str(REPO / "data/synthetic/train.jsonl"))
    p.add_argument("--max-seconds", type=float, default=32.0, help="bucketed batch bound (s)")
    p.add_argument("--num-buckets", type=int, default=10)
    p.add_argument("--compute-batches", type=int, default=8, help="batches per plan for the compute timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing passes (median per batch)")
    p.add_argument("--steps", type=int, default=12, help="timed DataLoader-fed steps per plan")
    p.add_argument("--chunk", type=int, default=4, help="DataLoader-fed steps per plan before switching")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=144)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the main process (0: torch default). 1 keeps CPU time a clean "
                        "measure of work on a shared machine (idle threads spin) and leaves cores to the workers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "scripts/bench_data.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    manifest = Path(args.manifest)
    if not manifest.exists():
        from efin.data.synthetic.corpus import ensure_synthetic_corpus

        print(f"{manifest} not found: generating the synthetic corpus under {manifest.parent}", flush=True)
        manifest = ensure_synthetic_corpus(manifest.parent)["train"]
    utts = load_manifest(manifest, check_audio=False)
    durs = [u.duration for u in utts]

    bucket = DurationBucketSampler(durs, args.max_seconds, num_buckets=args.num_buckets, seed=args.seed)
    bucket_batches = list(bucket)
    # Same mean batch seconds for the random plan: fixed batch size from the bucketed mean.
    batch_size = max(1, round(sum(durs) / len(bucket_batches) / statistics.fmean(durs)))
    gen = torch.Generator().manual_seed(args.seed)
    random_plan = BatchSampler(RandomSampler(range(len(durs)), generator=gen), batch_size, drop_last=False)
    random_batches = list(random_plan)

    # 1. padding over a whole epoch of each plan
    plans = {"bucketed": (bucket, bucket_batches), "random": (random_plan, random_batches)}
    results = {name: {"padding": padding_stats(batches, durs)} for name, (_, batches) in plans.items()}

    dataset = SpeechDataset(utts, LogMel())
    model = build_model(args).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    step = make_step(model, args.device)

    # 1b. the data pipeline alone: decode + log-mel per utterance, in this process (= one worker)
    probe = [dataset[i] for i in range(min(20, len(dataset)))]  # warm-up (resampler, mel filters)
    c0 = time.process_time()
    probe = [dataset[i] for i in range(len(dataset))[:: max(1, len(dataset) // 200)]]
    pipeline_cpu = time.process_time() - c0
    pipeline = {"utterances": len(probe), "audio_s": sum(p["duration"] for p in probe), "cpu_s": pipeline_cpu}
    pipeline["audio_s_per_cpu_s"] = pipeline["audio_s"] / pipeline_cpu

    # 2. model compute on the same number of batches from each plan, interleaved
    pick = np.random.default_rng(args.seed)
    sample = {
        name: [collate([dataset[i] for i in batches[k]])
               for k in pick.choice(len(batches), min(args.compute_batches, len(batches)), replace=False)]
        for name, (_, batches) in plans.items()
    }
    print(
        f"timing model steps on {args.compute_batches} batches per plan, {args.rounds} interleaved rounds", flush=True
    )
    for name, res in interleaved_compute(sample, step, args.rounds).items():
        results[name]["compute"] = res

    # 3. the real DataLoaders feeding training steps
    print(f"DataLoader-fed steps: {args.steps} per plan, alternating every {args.chunk}", flush=True)
    loaders = {
        name: DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.num_workers,
                         persistent_workers=args.num_workers > 0, pin_memory=args.device == "cuda")
        for name, (sampler, _) in plans.items()
    }
    for name, res in loader_steps(loaders, step, args.steps, args.chunk).items():
        results[name]["loader"] = res

    b, rnd = results["bucketed"], results["random"]
    ratios = {
        "compute_throughput_bucketed_over_random": b["compute"]["audio_s_per_compute_s"]
        / rnd["compute"]["audio_s_per_compute_s"],
        "cpu_throughput_bucketed_over_random": b["compute"]["audio_s_per_cpu_s"] / rnd["compute"]["audio_s_per_cpu_s"],
        "input_frames_random_over_bucketed": (rnd["compute"]["input_frames"] / rnd["compute"]["audio_s"])
        / (b["compute"]["input_frames"] / b["compute"]["audio_s"]),
        "loader_throughput_bucketed_over_random": b["loader"]["audio_s_per_wall_s"]
        / rnd["loader"]["audio_s_per_wall_s"],
        "padding_random_over_bucketed": rnd["padding"]["padded_frame_fraction"]
        / max(b["padding"]["padded_frame_fraction"], 1e-9),
    }
    targets = {
        "bucketed_padded_frames_le_10pct": b["padding"]["padded_frame_fraction"] <= 0.10,
        "bucketed_data_wait_le_10pct": b["loader"]["data_wait_fraction"] <= 0.10,
    }
    report = {
        "manifest": str(manifest),
        "utterances": len(utts),
        "hours": sum(durs) / 3600,
        "mean_duration_s": statistics.fmean(durs),
        "config": {**vars(args), "random_batch_size": batch_size, "model_params": n_params},
        "machine": {
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "torch": torch.__version__,
        },
        "results": results,
        "data_pipeline_one_worker": pipeline,
        "ratios": ratios,
        "targets": targets,
    }

    rows = [
        ("batches per epoch", "{:d}", lambda r: r["padding"]["batches"]),
        ("mean batch size", "{:.1f}", lambda r: r["padding"]["mean_batch_size"]),
        ("mean batch seconds", "{:.1f}", lambda r: r["padding"]["mean_batch_seconds"]),
        ("max batch seconds", "{:.1f}", lambda r: r["padding"]["max_batch_seconds"]),
        ("padded frames", "{:.1%}", lambda r: r["padding"]["padded_frame_fraction"]),
        ("model: audio s / s", "{:.1f}", lambda r: r["compute"]["audio_s_per_compute_s"]),
        ("model: audio s / CPU s", "{:.1f}", lambda r: r["compute"]["audio_s_per_cpu_s"]),
        ("loader: audio s / s", "{:.1f}", lambda r: r["loader"]["audio_s_per_wall_s"]),
        ("loader: median step s", "{:.3f}", lambda r: r["loader"]["median_step_s"]),
        ("loader: data wait", "{:.1%}", lambda r: r["loader"]["data_wait_fraction"]),
    ]
    print(f"\n{manifest}: {len(utts)} utterances, {report['hours']:.2f} h, mean {report['mean_duration_s']:.2f} s; "
          f"encoder {n_params / 1e6:.1f} M params on {args.device}, {args.num_workers} workers")
    print(f"{'':24s}{'bucketed':>12s}{'random':>12s}")
    for label, fmt, get in rows:
        print(f"{label:24s}{fmt.format(get(b)):>12s}{fmt.format(get(rnd)):>12s}")
    print(f"model throughput bucketed / random: {ratios['compute_throughput_bucketed_over_random']:.2f}x wall, "
          f"{ratios['cpu_throughput_bucketed_over_random']:.2f}x CPU time; DataLoader-fed: "
          f"{ratios['loader_throughput_bucketed_over_random']:.2f}x; padding random / bucketed: "
          f"{ratios['padding_random_over_bucketed']:.1f}x")
    print(f"data pipeline (decode + log-mel): {pipeline['audio_s_per_cpu_s']:.0f} audio s per CPU s per worker")
    print("targets: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in targets.items()))

    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
