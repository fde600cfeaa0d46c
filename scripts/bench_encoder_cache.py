"""Benchmark: stage-projector training steps with and without the frozen-encoder cache.

The same batches (materialised once: features precomputed) run through the stage's training
step (encoder -> projector -> loss -> backward -> AdamW on the projector) three times from the
same initial weights:

1. ``uncached``: the encoder runs on every batch (what every epoch costs without the cache);
2. ``fill``: the first epoch with the cache (encoder runs, outputs are copied to the CPU);
3. ``cached``: a later epoch with the cache (no encoder; rows re-padded from the cache).

Steps are timed *interleaved* (uncached and cached step of the same batch in turn, ``--rounds``
times, median per batch) so load from other processes hits both alike. Also reported: the
feature extraction per batch (log-mel in the DataLoader workers, which the cache does not
skip), the cache's memory, and whether ``cached`` losses equal ``uncached`` ones (same batch
composition as when filled: they must be bit-identical).

Configurations: ``tiny`` (data/encoder/projector/llm = tiny) and, when the synthetic corpus
exists under ``paths.data_dir``, ``default`` (data=synthetic, encoder=small, projector=ctc,
llm=smollm2, 64 s batches; encoder randomly initialised, which costs the same time).

Run::

    python scripts/bench_encoder_cache.py                 # ~2 min on 2 CPU cores
    python scripts/bench_encoder_cache.py --batches 20 --rounds 3 --configs default

Writes ``scripts/bench_encoder_cache.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from efin.handoff import SpeechLLMStart  # noqa: E402
from efin.models.encoder_cache import EncoderCache, encoder_fingerprint  # noqa: E402

CONFIGS = {
    "tiny": ["stage=projector", "data=tiny", "encoder=tiny", "projector=tiny", "llm=tiny"],
    "default": ["stage=projector"],  # data=synthetic, encoder=small, projector=ctc, llm=smollm2
}


def compose_cfg(overrides: list[str], data_dir: str | None):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        if data_dir:
            cfg.paths.data_dir = data_dir
        # Read the corpus only: no decode check (it writes a cache), loading in this process.
        cfg.data.check_audio, cfg.data.audio_check_cache, cfg.data.num_workers = False, None, 0
        del cfg.hydra
    return cfg


def materialise(dm, n: int) -> tuple[list[dict], float]:
    """The first ``n`` training batches of epoch 0, and the mean seconds spent loading one
    (audio decode + log-mel + collate: the work the cache leaves to the loader workers)."""
    batches, spent = [], []
    it = iter(dm.train_dataloader())
    for _ in range(n):
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        spent.append(time.perf_counter() - t)
        batches.append(batch)
    return batches, statistics.fmean(spent)


def bench(name: str, args) -> dict | None:
    cfg = compose_cfg(CONFIGS[name], args.data_dir)
    dm = instantiate(cfg.data, _recursive_=True)
    if name == "tiny":
        dm.prepare_data()  # the tiny corpus is generated in seconds when missing
    elif not Path(cfg.data.train).exists():
        print(f"[{name}] skipped: no corpus at {cfg.data.train}")
        return None
    dm.setup("fit")
    batches, load_s = materialise(dm, args.batches)
    texts = [u.text for u in dm.train_utterances]
    start = SpeechLLMStart(cfg.encoder, cfg.projector, cfg.llm, "frozen")
    model = start.build(dict(dm.featurizer.config), texts)  # no CMVN statistics: same cost, faster start
    model.encoder.requires_grad_(False).eval()
    model.llm.eval()
    module = cfg.stage.module
    lm_w, ctc_w = float(module.lm_weight), float(module.ctc_weight)
    initial = copy.deepcopy(model.projector.state_dict())
    params = [p for p in model.projector.parameters() if p.requires_grad]

    def run_step(batch, opt, encoded=None) -> float:
        out = model(batch["feats"], batch["feat_lens"], batch["texts"], lm=lm_w > 0, encoded=encoded)
        loss = lm_w * out.loss + (ctc_w * out.ctc_loss if out.ctc_loss is not None else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def fresh():
        model.projector.load_state_dict(initial)
        return torch.optim.AdamW(params, lr=1e-3)

    cache = EncoderCache(encoder_fingerprint(model.encoder, dict(dm.featurizer.config)))

    def keys(b):
        return [f"train/{i}" for i in b["ids"]]

    # Exactness and fill: one pass per path from the same weights.
    opt = fresh()
    losses_uncached = [run_step(b, opt) for b in batches]
    opt = fresh()
    fill = []
    for b in batches:
        t = time.perf_counter()
        run_step(b, opt, cache.encode(model.encoder, b["feats"], b["feat_lens"], keys(b)))
        fill.append(time.perf_counter() - t)
    opt = fresh()
    losses_cached = [
        run_step(b, opt, cache.encode(model.encoder, b["feats"], b["feat_lens"], keys(b))) for b in batches
    ]

    # Timing: interleaved per batch, median over rounds (weights keep training; cost does not depend on them).
    opt = fresh()
    times = {"uncached": [[] for _ in batches], "cached": [[] for _ in batches], "encoder": [[] for _ in batches]}
    for _ in range(args.rounds):
        for i, b in enumerate(batches):
            t = time.perf_counter()
            run_step(b, opt)
            times["uncached"][i].append(time.perf_counter() - t)
            t = time.perf_counter()
            run_step(b, opt, cache.encode(model.encoder, b["feats"], b["feat_lens"], keys(b)))
            times["cached"][i].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                model.encoder(b["feats"], b["feat_lens"])
            times["encoder"][i].append(time.perf_counter() - t)
    per = {k: sum(statistics.median(v) for v in vs) / len(batches) for k, vs in times.items()}
    seconds = sum(float(b["feat_lens"].sum()) for b in batches) / dm.featurizer.frames_per_second
    return {
        "config": name, "overrides": CONFIGS[name], "batches": len(batches),
        "utterances": sum(len(b["ids"]) for b in batches), "audio_seconds": round(seconds, 1),
        "step_ms_uncached": 1000 * per["uncached"], "step_ms_cached": 1000 * per["cached"],
        "step_ms_fill": 1000 * statistics.fmean(fill), "encoder_forward_ms": 1000 * per["encoder"],
        "speedup": per["uncached"] / per["cached"], "features_ms_per_batch": 1000 * load_s,
        "cache_utterances": len(cache), "cache_mib": cache.nbytes / 2**20,
        "cache_bytes_per_audio_second": cache.nbytes / seconds,
        "losses_identical": losses_cached == losses_uncached,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=6, help="training batches per configuration")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes (median per batch)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--data-dir", default=os.environ.get("EFIN_DATA_DIR"), help="paths.data_dir (default: conf)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    rows = [r for r in (bench(name, args) for name in args.configs) if r is not None]
    head = f"{'config':8} {'batches':>7} {'utts':>5} {'audio s':>8} {'uncached ms':>11} {'cached ms':>9} " \
           f"{'fill ms':>8} {'encoder ms':>10} {'speedup':>7} {'feats ms':>8} {'cache MiB':>9} {'exact':>5}"
    print(head)
    for r in rows:
        print(f"{r['config']:8} {r['batches']:7d} {r['utterances']:5d} {r['audio_seconds']:8.1f} "
              f"{r['step_ms_uncached']:11.1f} {r['step_ms_cached']:9.1f} {r['step_ms_fill']:8.1f} "
              f"{r['encoder_forward_ms']:10.1f} {r['speedup']:6.2f}x {r['features_ms_per_batch']:8.1f} "
              f"{r['cache_mib']:9.2f} {str(r['losses_identical']):>5}")
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "batches": args.batches, "rounds": args.rounds}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
