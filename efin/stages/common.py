"""Helpers shared by the stage modules: optimizer wiring, error-rate accumulation and logging."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch import nn

from efin.models.protocols import SubsetVocabularyLM
from efin.results import score, write_results
from efin.text import normalize


def adamw_warmup_cosine(
    module: LightningModule, params, lr: float, weight_decay: float, warmup_steps: int, min_lr_ratio: float,
    betas: tuple[float, float] = (0.9, 0.98), max_warmup_fraction: float = 0.25,
) -> dict:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio`` over the whole run.

    The stage files' ``optimizer`` node holds every argument after ``params`` (conf/stage/*.yaml);
    the warm-up is capped at ``max_warmup_fraction`` of the run.

    ``params``: tensors, or param-group dicts ``{"params": [...], "lr": peak}`` (``lr`` defaults
    to ``lr``), e.g. an unfrozen encoder at a lower rate than the projector; every group follows
    the same schedule relative to its own peak. Frozen tensors are left out.
    The schedule length is the trainer's estimate of optimizer steps, so it follows
    max_epochs / max_steps / accumulate_grad_batches without another knob.
    """
    given = list(params)
    if not given or not isinstance(given[0], dict):
        given = [{"params": given}]
    # No weight decay on biases and norm gains (1-D tensors): decaying them only hurts.
    groups = []
    for group in given:
        trainable = [p for p in group["params"] if p.requires_grad]
        extra = {k: v for k, v in group.items() if k != "params"}
        groups += [
            {**extra, "params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
            {**extra, "params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    warmup = min(warmup_steps, max(int(total * max_warmup_fraction), 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Transcripts:
    """Collects (id, reference, hypothesis) for one split and reports corpus WER/CER across ranks."""

    def __init__(self):
        self.records: list[dict] = []

    def add(self, ids: list[str], refs: list[str], hyps: list[str]) -> None:
        for utt_id, ref, hyp in zip(ids, refs, hyps, strict=True):
            self.records.append({"id": utt_id, "ref": normalize(ref), "hyp": normalize(hyp)})

    def gather(self) -> list[dict]:
        """All ranks' records (every rank gets the full list)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.records)
            return [r for part in parts for r in part]
        return list(self.records)

    def reset(self) -> None:
        self.records = []


class EvalTranscripts:
    """:class:`Transcripts` per scored dataset of one evaluation loop ("dev", each test set, and
    e.g. their LM-decoded twins "dev_lm"), logged together at the end of the loop."""

    def __init__(self):
        self.sets: dict[str, Transcripts] = {}

    def __getitem__(self, dataset: str) -> Transcripts:
        return self.sets.setdefault(dataset, Transcripts())

    def reset(self) -> None:
        self.sets = {}

    def log(self, module: LightningModule, split: str) -> None:
        """:func:`log_error_rates` for every dataset (sorted: every DDP rank gathers in one order)."""
        for dataset in sorted(self.sets):
            log_error_rates(module, self.sets[dataset], split, dataset)
        self.reset()


def test_set_name(module: LightningModule, dataloader_idx: int) -> str:
    """Name of the test set behind ``dataloader_idx`` (the datamodule's ``test_names``)."""
    names = getattr(module.trainer.datamodule, "test_names", None) or ["test"]
    return names[dataloader_idx]


def log_error_rates(module: LightningModule, transcripts: Transcripts, split: str, dataset: str) -> None:
    """Log ``split/wer/dataset`` and ``split/cer/dataset`` over all ranks' transcripts and, on
    test, write the per-utterance results into ``<run dir>/decode/``."""
    records = transcripts.gather()
    transcripts.reset()
    if not records:
        return
    counts, _ = score(records)
    module.log(f"{split}/wer/{dataset}", counts.wer, prog_bar=True, rank_zero_only=True)
    module.log(f"{split}/cer/{dataset}", counts.cer, prog_bar=True, rank_zero_only=True)
    if split == "test" and module.trainer.is_global_zero:
        write_results(Path(module.trainer.default_root_dir) / "decode", dataset, records)


def parameter_counts(parts: dict[str, nn.Module]) -> dict[str, int]:
    """``params/<part>/trainable`` and ``params/<part>/total`` for each named part."""
    counts = {}
    for name, part in parts.items():
        params = list(part.parameters())
        counts[f"params/{name}/trainable"] = sum(p.numel() for p in params if p.requires_grad)
        counts[f"params/{name}/total"] = sum(p.numel() for p in params)
    return counts


def trained_state_keys(module: nn.Module, llm: nn.Module, llm_prefix: str) -> set[str]:
    """State-dict keys a checkpoint of ``module`` must hold: everything outside the LLM (at
    ``llm_prefix``; its frozen weights are rebuilt from their source), the parameters that train,
    plus a draft's head and its vocabulary ids (both come from the training texts)."""
    keys = {k for k in module.state_dict() if not k.startswith(llm_prefix)}
    keys |= {n for n, p in module.named_parameters() if p.requires_grad}
    if isinstance(llm, SubsetVocabularyLM):
        head = llm.get_output_embeddings().weight
        keys.add(llm_prefix + "vocab_ids")
        keys |= {n for n, p in module.named_parameters() if p is head}
    return keys
