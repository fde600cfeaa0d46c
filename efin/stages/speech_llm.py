"""Stages 2 and 3 (stage=projector, stage=llm): train a SpeechLLM with the LM and/or CTC loss.

One module serves both stages; the stage's config decides what trains: ``adapter`` (how the
LLM trains), ``train_encoder``, and the loss weights (``lm_weight`` x the LLM's cross-entropy +
``ctc_weight`` x a CTC projector's loss over the LLM's tokens; stage=projector defaults to CTC
only, so the LLM is not run while training). The projector always trains.

The starting point, its checks and the model build are :class:`efin.handoff.SpeechLLMStart`'s;
the model is built in :meth:`configure_model` (so a sharding strategy can wrap it later), once
the datamodule has loaded its manifests. This module keeps the steps, optimizer and logging.

A draft can be trained to agree with its target (``distill``, :mod:`efin.stages.distill`):
the target runs frozen on the same batches, its distribution joins the LM term, and
``train/agree`` / ``val/agree/dev`` report how often the two argmaxes match.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig

from efin.artifacts import ArtifactError
from efin.decoding.ctc import ctc_lm_from_sources
from efin.decoding.generate import ctc_transcribe, generate
from efin.handoff import SpeechLLMStart, plain, set_transcript_decoding
from efin.models.encoder_cache import EncoderCache, encoder_fingerprint
from efin.models.protocols import TokenCTC, TranscriptInput
from efin.models.speech_llm import SpeechLLM
from efin.stages.common import EvalTranscripts, adamw_warmup_cosine, parameter_counts, test_set_name, trained_state_keys
from efin.stages.distill import DistillOptions, DistillTarget, agreement, distill_loss

log = logging.getLogger(__name__)


def check_loss_weights(projector, lm_weight: float, ctc_weight: float) -> None:
    """A CTC loss, or training without the LM loss, needs a CTC projector."""
    if not isinstance(projector, TokenCTC) and (ctc_weight > 0 or lm_weight <= 0):
        raise ValueError(
            f"stage.module.ctc_weight={ctc_weight} / lm_weight={lm_weight} need a CTC projector (projector=ctc); "
            f"with projector={type(projector).__name__} set ctc_weight=0 and lm_weight=1"
        )


class SpeechLLMStage(pl.LightningModule):
    """Encoder -> projector -> LLM trained on the transcripts.

    Args:
        encoder, projector, llm, adapter: see :class:`efin.handoff.SpeechLLMStart`.
        train_encoder: unfreeze the encoder (trained at ``encoder_lr``).
        optimizer: :func:`efin.stages.common.adamw_warmup_cosine` arguments (``lr`` for the
            projector and trainable LLM weights, betas, weight decay, warm-up, final ratio).
        encoder_lr: peak learning rate of the encoder when ``train_encoder``.
        val_generate_max_utterances: dev utterances transcribed by greedy generation at each
            validation (val/wer/dev); None = all, 0 = none. The losses use the whole dev set.
        lm_weight: weight of the LLM's cross-entropy (0: the LLM is skipped in training steps).
        ctc_weight: weight of the CTC projector's loss (needs a CTC projector when > 0).
        distill: :class:`efin.stages.distill.DistillOptions` (``target`` null = off): train a
            draft to agree with a target (KL to its distribution mixed into the LM term) and log
            ``train/agree`` / ``val/agree/dev``.
        cache_encoder: ``auto`` | true | false: keep each training/dev utterance's encoder
            output in CPU memory and skip the encoder for utterances seen before
            (:class:`efin.models.encoder_cache.EncoderCache`). auto = on when the encoder is
            frozen and the training data has no augmentation; true refuses a trained encoder
            or augmented data (their outputs change every epoch).
        transcript_lm_sources: with ``projector=transcript`` and ``projector.ctc_decoding=lm``,
            the word LM the projector reads with in this stage (training, validation, test) is
            built from these texts (:func:`efin.data.lm_text.lm_sentences`, e.g. ``[wordnet]``)
            instead of the encoder artifact's. The artifact's LM holds the training transcripts,
            so on training audio its transcript is nearly right and the LLM would learn to copy;
            decoding afterwards reads with the artifact's LM as stored. None: the artifact's.
    """

    def __init__(
        self, encoder: DictConfig, projector: DictConfig, llm: DictConfig, optimizer: DictConfig,
        adapter: str = "frozen", train_encoder: bool = False, encoder_lr: float = 1e-5,
        val_generate_max_utterances: int | None = 100, lm_weight: float = 1.0, ctc_weight: float = 0.0,
        distill: DictConfig | dict | None = None, cache_encoder: str | bool = False,
        transcript_lm_sources: list[str] | None = None,
    ):
        super().__init__()
        encoder, projector, llm, optimizer = plain(encoder), plain(projector), plain(llm), plain(optimizer)
        self.save_hyperparameters(
            {
                "encoder": encoder,
                "projector": projector,
                "llm": llm,
                "optimizer": optimizer,
                "adapter": adapter,
                "train_encoder": train_encoder,
                "encoder_lr": encoder_lr,
                "val_generate_max_utterances": val_generate_max_utterances,
                "lm_weight": lm_weight,
                "ctc_weight": ctc_weight,
                "distill": plain(distill),
                "cache_encoder": cache_encoder,
                "transcript_lm_sources": plain(transcript_lm_sources),
            }
        )
        if cache_encoder not in ("auto", True, False):
            raise ValueError(f"cache_encoder must be auto, true or false, got {cache_encoder!r}")
        self.encoder_cache: EncoderCache | None = None  # decided in configure_model (needs the data)
        self._cache_logged = False
        if val_generate_max_utterances is not None and val_generate_max_utterances < 0:
            raise ValueError("val_generate_max_utterances must be >= 0 (0: no val/wer/dev) or null (all)")
        self.start = SpeechLLMStart(encoder, projector, llm, adapter)
        self.model: SpeechLLM | None = None
        # Checkpoints hold only the weights this stage changes (not the frozen LLM), so
        # loading is non-strict and on_load_checkpoint checks the expected keys itself.
        self.strict_loading = False
        self.transcripts = EvalTranscripts()
        self._generate_left = 0
        self.distill = DistillOptions(**(plain(distill) or {}))
        self.target: DistillTarget | None = None  # built in configure_model, next to the draft
        if self.distill.enabled and lm_weight <= 0:
            raise ValueError("stage.module.distill needs the LLM to run in training: set lm_weight > 0")

    def init_from_artifact(self, artifact: dict) -> None:
        """Start from an encoder, projector or llm artifact (checked here and when the model is built)."""
        self.start.take(artifact)
        log.info("Starting from a %r artifact", artifact["stage"])

    def _read_transcripts_with(self, sources: list[str]) -> None:
        """``transcript_lm_sources``: the transcript projector's word LM search for this stage."""
        projector = self.model.projector
        if not isinstance(projector, TranscriptInput) or projector.ctc_decoding != "lm":
            raise ValueError(
                f"stage.module.transcript_lm_sources={list(sources)}: only a transcript projector reading with the "
                "word LM uses it (projector=transcript projector.ctc_decoding=lm); set it to null"
            )
        first_pass = self.start.first_pass
        set_transcript_decoding(projector, {"ctc_lm": ctc_lm_from_sources(first_pass.get("ctc_lm"), list(sources))})

    def configure_model(self) -> None:
        if self.model is not None:
            return
        h, dm = self.hparams, self.trainer.datamodule
        # First, so a missing target (an error naming the command that makes it) costs no model build.
        target_artifact = self.distill.load() if self.distill.enabled else None
        fitting = self.trainer.state.fn == TrainerFn.FITTING
        texts = [u.text for u in dm.train_utterances] if fitting else None  # rank draft/CTC vocabularies
        self.model = self.start.build(dict(dm.featurizer.config), texts, dm.feature_stats if fitting else None)
        self.model.encoder.requires_grad_(h.train_encoder)
        if h.transcript_lm_sources:
            self._read_transcripts_with(h.transcript_lm_sources)
        check_loss_weights(self.model.projector, h.lm_weight, h.ctc_weight)
        if target_artifact is not None:
            self.target = DistillTarget.build(target_artifact, self.model, self.start.features, h.train_encoder)
        self._setup_encoder_cache(dm)
        m = self.model
        rate = m.projector.audio_tokens_per_second(dm.featurizer.frames_per_second / m.encoder.subsampling)
        counts = parameter_counts({"encoder": m.encoder, "projector": m.projector, "llm": m.llm})
        self.setup_summary = {"audio_tokens_per_second": rate, **counts}
        log.info(
            "SpeechLLM (llm=%s, adapter=%s, train_encoder=%s): %.1f audio tokens/s; trainable parameters: %s",
            h.llm.get("tag"), h.adapter, h.train_encoder, rate,
            ", ".join(f"{n} {counts[f'params/{n}/trainable']:,} of {counts[f'params/{n}/total']:,}"
                      for n in ("encoder", "projector", "llm")),
        )

    def _setup_encoder_cache(self, dm) -> None:
        """Decide ``cache_encoder`` (see the class doc): why not, when it cannot apply."""
        want = self.hparams.cache_encoder
        augmented = [name for name in ("wave_augment", "feature_augment")
                     if getattr(getattr(dm, name, None), "enabled", False)]
        why_not = ("the encoder trains (train_encoder=true)" if self.hparams.train_encoder
                   else f"the training data is augmented ({', '.join(augmented)})" if augmented else None)
        if want is True and why_not:
            raise ValueError(f"stage.module.cache_encoder=true, but {why_not}: its output changes every epoch")
        if want is False or why_not:
            if want == "auto" and why_not:
                log.info("Encoder output not cached: %s", why_not)
            return
        self.encoder_cache = EncoderCache(encoder_fingerprint(self.model.encoder, dict(dm.featurizer.config)))
        log.info("Caching the frozen encoder's output per utterance in CPU memory (stage.module.cache_encoder=%s)",
                 want)

    def _encode(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's encoder output from the cache (filling it), or None without a cache."""
        if self.encoder_cache is None:
            return None
        keys = [f"{split}/{i}" for i in batch["ids"]]  # train and dev ids may coincide
        return self.encoder_cache.encode(self.model.encoder, batch["feats"], batch["feat_lens"], keys)

    def on_train_epoch_end(self) -> None:
        cache = self.encoder_cache
        if cache is not None and not self._cache_logged and len(cache):
            self._cache_logged = True  # the first epoch filled it: later epochs only hit
            mib = cache.nbytes / 2**20
            log.info("Encoder cache: %d utterances, %.1f MiB of CPU memory (per rank)", len(cache), mib)

    def on_fit_start(self) -> None:
        if self.logger:
            self.logger.log_hyperparams(self.setup_summary)

    # ---- what trains ----------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Frozen parts stay in eval mode (no dropout) while the rest trains."""
        super().train(mode)
        if mode and self.model is not None:
            if not self.hparams.train_encoder:
                self.model.encoder.eval()
            if self.hparams.adapter == "frozen":
                self.model.llm.eval()
        return self

    def on_train_start(self) -> None:
        self.train(True)  # also after a mid-epoch resume, where on_train_epoch_start is not called

    def on_train_epoch_start(self) -> None:
        self.train(True)

    def configure_optimizers(self):
        h = self.hparams
        main = list(self.model.projector.parameters()) + [p for p in self.model.llm.parameters() if p.requires_grad]
        groups = [{"params": main, "lr": h.optimizer["lr"]}]
        if h.train_encoder:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": h.encoder_lr})
        return adamw_warmup_cosine(self, groups, **h.optimizer)

    def _checkpoint_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: encoder, projector and the LLM weights that change."""
        return trained_state_keys(self, self.model.llm, llm_prefix="model.llm.")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self._checkpoint_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ArtifactError(f"checkpoint lacks {len(missing)} weights this stage trains, e.g. {missing[:3]}")

    # ---- steps --------------------------------------------------------------------------
    def _log_losses(self, split: str, dataset: str, out, batch: dict) -> torch.Tensor:
        """Log and return the stage's objective: lm_weight x LM term + ctc_weight x CTC loss, where
        the LM term is the cross-entropy, or with distillation ``weight`` x distillation loss +
        (1 - ``weight``) x cross-entropy."""
        h, size = self.hparams, len(batch["texts"])
        suffix, sync = (f"/{dataset}" if dataset else ""), split != "train"
        kw = dict(batch_size=size, sync_dist=sync, add_dataloader_idx=False)
        lm = out.loss
        if self.target is not None and out.label_logits is not None:
            lm = self._distill(split, suffix, out, batch, kw)
        loss = h.lm_weight * lm
        if out.ctc_loss is not None and h.ctc_weight > 0:
            loss = loss + h.ctc_weight * out.ctc_loss
        self.log(f"{split}/loss{suffix}", loss, prog_bar=not sync, **kw)
        if out.num_tokens:
            self.log(f"{split}/lm_loss{suffix}", out.loss, **kw)
        if out.ctc_loss is not None:
            self.log(f"{split}/ctc_loss{suffix}", out.ctc_loss, **kw)
        return loss

    def _distill(self, split: str, suffix: str, out, batch: dict, kw: dict) -> torch.Tensor:
        """Run the target on the batch; log the agreement and the distillation loss; return the LM term."""
        self.target.follow(self.model.llm.get_input_embeddings().weight)
        teacher = self.target.label_logits(out, batch["feats"], batch["feat_lens"])
        agree = agreement(teacher, out.label_logits)
        if agree.numel():  # weighted by label positions, not utterances
            self.log(f"{split}/agree{suffix}", agree.float().mean(), prog_bar=split == "train",
                     **{**kw, "batch_size": agree.numel()})
        weight = self.distill.weight
        with torch.set_grad_enabled(torch.is_grad_enabled() and weight > 0):  # weight 0: measured only
            kd = distill_loss(self.distill, teacher, out.label_logits)
        self.log(f"{split}/distill_loss{suffix}", kd, **kw)
        return out.loss if weight == 0 else weight * kd + (1 - weight) * out.loss

    def training_step(self, batch, batch_idx):
        out = self.model(batch["feats"], batch["feat_lens"], batch["texts"], lm=self.hparams.lm_weight > 0,
                         encoded=self._encode(batch, "train"))
        size = len(batch["texts"])
        loss = self._log_losses("train", "", out, batch)
        # Over-long transcripts run with masked labels (same work on every DDP rank); count them.
        skipped = int((~out.keep).sum())
        self.log(
            "train/skipped",
            float(skipped),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=size,
        )
        return loss

    def _eval_step(self, batch, split: str, dataset: str, limit: int | None, num_beams: int | None) -> None:
        # Only dev is cached: it is seen at every validation, a test set once.
        encoded = self._encode(batch, "dev") if split == "val" and not self.trainer.sanity_checking else None
        out = self.model(batch["feats"], batch["feat_lens"], batch["texts"], encoded=encoded)
        self._log_losses(split, dataset, out, batch)
        if self.model.has_ctc_draft:  # what the LLM is handed, as text: val/wer/dev_ctc
            hyps = ctc_transcribe(self.model, batch["feats"], batch["feat_lens"], encoded=out.encoded)
            self.transcripts[f"{dataset}_ctc"].add(batch["ids"], batch["texts"], hyps)
        n = len(batch["texts"]) if limit is None else min(limit, len(batch["texts"]))
        if n == 0:
            return
        lens = batch["feat_lens"][:n]
        with torch.no_grad():
            self.model.llm.eval()
            hyps = generate(self.model, batch["feats"][:n, : int(lens.max())], lens, num_beams=num_beams)
        self.transcripts[dataset].add(batch["ids"][:n], batch["texts"][:n], hyps)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", "dev", self._generate_left, num_beams=1)  # greedy
        if self._generate_left is not None:
            self._generate_left = max(self._generate_left - len(batch["texts"]), 0)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(
            batch, "test", test_set_name(self, dataloader_idx), None, num_beams=None
        )  # llm.generation defaults

    def on_validation_epoch_start(self) -> None:
        self.transcripts.reset()
        limit = self.hparams.val_generate_max_utterances
        # Each rank sees its own shard of dev: split the budget between ranks.
        self._generate_left = None if limit is None else math.ceil(limit / self.trainer.world_size)

    def on_validation_epoch_end(self) -> None:
        self.transcripts.log(self, "val")

    def on_test_epoch_start(self) -> None:
        self.transcripts.reset()

    def on_test_epoch_end(self) -> None:
        self.transcripts.log(self, "test")

    # ---- handoff ------------------------------------------------------------------------
    def artifact_payload(self) -> dict:
        """This stage's artifact (:class:`efin.handoff.SpeechLLMHandoff`); the encoder stage's CTC
        head and word LM are carried on while the encoder stays frozen."""
        if self.hparams.train_encoder:
            log.info("The encoder was fine-tuned: the encoder stage's CTC head and word LM are not carried on")
        return self.start.handoff(self.model, carry_first_pass=not self.hparams.train_encoder).payload()
