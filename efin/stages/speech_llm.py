"""Stages 2 and 3 (stage=projector, stage=llm): train a SpeechLLM with the LM loss.

One module serves both stages; the stage's config decides what trains:

  * ``adapter``: how the LLM trains here (stage=projector passes ``frozen``; stage=llm passes
    ``${llm.adapter}``: ``lora`` by default, ``frozen``, or ``full`` for drafts);
  * ``train_encoder``: the pretrained encoder is frozen unless true (then at ``encoder_lr``);
  * the projector always trains (at ``lr``);
  * the loss: ``lm_weight`` x the LLM's cross-entropy + ``ctc_weight`` x the CTC loss of a
    :class:`~efin.models.projector.TokenCTCProjector` over the LLM's tokens. stage=projector
    defaults to CTC only (``lm_weight`` 0: the LLM is not run while training, the projector
    aligns onto its frozen token embeddings); stage=llm uses both.

The LLM, the projector (its width follows the LLM) and a draft's vocabulary (ranked on the
training transcripts) are built in :meth:`setup`, once the datamodule has loaded its manifests.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from efin.artifacts import FIRST_PASS_KEYS, ArtifactError
from efin.models.encoder import Encoder
from efin.models.llm import SubsetHeadLM, draft_vocab
from efin.models.llm_state import (
    LLMStateError,
    TRANSITIONS,
    build_llm_from_spec,
    change_adapter,
    handoff_state,
    llm_identity,
    load_handoff_state,
)
from efin.models.speech_llm import SpeechLLM
from efin.stages.common import EvalTranscripts, adamw_warmup_cosine, test_set_name

log = logging.getLogger(__name__)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _differences(a: dict, b: dict, ignore: frozenset = frozenset()) -> dict:
    """{key: (a value, b value)} for keys whose values differ (flat dicts)."""
    return {k: (a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - ignore) if a.get(k) != b.get(k)}


class SpeechLLMStage(pl.LightningModule):
    """Encoder -> projector -> LLM trained with next-token cross-entropy on the transcripts.

    Args:
        encoder: encoder builder node (``conf/encoder``); must match the artifact's encoder.
        projector: projector builder node (``conf/projector``); widths are set here.
        llm: the ``llm`` group node (``model`` builder, ``lora``, ``prompt``, ``generation``, ``tag``).
        adapter: ``frozen`` | ``lora`` | ``full``: how the LLM trains in this stage.
        train_encoder: unfreeze the encoder (trained at ``encoder_lr``).
        lr: peak AdamW learning rate of the projector and of trainable LLM weights.
        encoder_lr: peak learning rate of the encoder when ``train_encoder``.
        weight_decay, warmup_steps, min_lr_ratio: see :func:`efin.stages.common.adamw_warmup_cosine`.
        val_generate_max_utterances: dev utterances transcribed by greedy generation at each
            validation (val/wer/dev, val/cer/dev); None = all, 0 = none. The losses (and a CTC
            projector's val/wer/dev_ctc) use the whole dev set.
        lm_weight: weight of the LLM's cross-entropy in the training loss (0: the LLM is skipped
            in training steps; needs a CTC projector).
        ctc_weight: weight of the CTC projector's loss (needs a CTC projector when > 0).
    """

    def __init__(
        self,
        encoder: DictConfig,
        projector: DictConfig,
        llm: DictConfig,
        adapter: str = "frozen",
        train_encoder: bool = False,
        lr: float = 1e-3,
        encoder_lr: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
        val_generate_max_utterances: int | None = 100,
        lm_weight: float = 1.0,
        ctc_weight: float = 0.0,
    ):
        super().__init__()
        encoder, projector, llm = _plain(encoder), _plain(projector), _plain(llm)
        self.save_hyperparameters({
            "encoder": encoder, "projector": projector, "llm": llm, "adapter": adapter,
            "train_encoder": train_encoder, "lr": lr, "encoder_lr": encoder_lr, "weight_decay": weight_decay,
            "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
            "val_generate_max_utterances": val_generate_max_utterances,
            "lm_weight": lm_weight, "ctc_weight": ctc_weight,
        })
        if val_generate_max_utterances is not None and val_generate_max_utterances < 0:
            raise ValueError("val_generate_max_utterances must be >= 0 (0: no val/wer/dev) or null (all)")
        # Kept out of the module tree until setup() puts it inside the SpeechLLM: registered
        # twice, its weights would be saved twice.
        self.__dict__["_encoder"] = instantiate(encoder)
        self.model: SpeechLLM | None = None
        self.features: dict | None = None
        # The encoder stage's CTC head and word LM, carried on for n-best rescoring (inference.py).
        self.carried: dict = {}
        self.previous: dict | None = None  # projector + LLM parts of a projector/llm artifact
        self.projector_config: dict | None = None
        # Checkpoints hold only the weights this stage changes (not the frozen LLM), so
        # loading is non-strict and on_load_checkpoint checks the expected keys itself.
        self.strict_loading = False
        self.transcripts = EvalTranscripts()
        self._generate_left = 0

    @property
    def encoder(self) -> Encoder:
        return self.model.encoder if self.model is not None else self.__dict__["_encoder"]

    # ---- starting point -----------------------------------------------------------------
    def init_from_artifact(self, artifact: dict) -> None:
        """Take the encoder (and, from a projector/llm artifact, the projector and LLM weights)."""
        kind = artifact["stage"]
        self._check_encoder(artifact["encoder"]["config"])
        self.encoder.load_state_dict(artifact["encoder"]["state_dict"], strict=True)
        self.features = dict(artifact["features"])
        self.carried = {k: artifact[k] for k in FIRST_PASS_KEYS if artifact.get(k) is not None}
        if kind == "projector" and self._other_llm(artifact["llm"]) and "token_embeddings" in artifact["projector"]["state_dict"]:
            # A CTC projector aligned to another LLM with the same token embeddings (a draft cut
            # from the target): take the projector only; _build_projector checks the embeddings.
            self.previous = {"projector": artifact["projector"], "llm": None}
        elif kind in ("projector", "llm"):
            self._check_llm(artifact["llm"])
            self.previous = {"projector": artifact["projector"], "llm": artifact["llm"]}
        log.info("Starting from a %r artifact", kind)

    def _check_encoder(self, config: dict) -> None:
        diff = _differences(config, self.encoder.config, ignore=frozenset({"dropout"}))
        if diff:
            detail = ", ".join(f"{k}: artifact {a} vs config {b}" for k, (a, b) in diff.items())
            raise ArtifactError(
                f"init_from artifact from a different encoder than this run's `encoder` config ({detail}). "
                f"Pass the encoder option the artifact was trained with (e.g. encoder=tiny), or another init_from."
            )

    def _other_llm(self, stored: dict) -> bool:
        return llm_identity(stored["spec"]["model"]) != llm_identity(self.hparams.llm["model"])

    def _check_llm(self, stored: dict) -> None:
        spec, tag = stored["spec"], stored["spec"].get("tag")
        if self._other_llm(stored):
            raise ArtifactError(
                f"init_from artifact was trained with a different LLM (llm={tag}) than this run "
                f"(llm={self.hparams.llm.get('tag')}). Pass llm={tag}, or an artifact of this LLM."
            )
        previous, adapter = stored["adapter"], self.hparams.adapter
        if (previous, adapter) not in TRANSITIONS:
            raise ArtifactError(
                f"cannot train a {previous!r} LLM from the artifact with adapter {adapter!r}; "
                f"allowed (previous, new): {sorted(TRANSITIONS)}"
            )
        if previous == adapter == "lora" and spec.get("lora") != self.hparams.llm.get("lora"):
            raise ArtifactError(
                f"the artifact's LoRA settings {spec.get('lora')} differ from llm.lora "
                f"{self.hparams.llm.get('lora')}; continuing LoRA training needs the same settings"
            )

    # ---- model construction -------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        h = self.hparams
        dm = self.trainer.datamodule
        features = dict(dm.featurizer.config)
        if self.features is None:
            log.warning("No init_from artifact: the encoder starts untrained (EFIN expects stage=encoder first).")
            if stage == "fit":
                self.encoder.set_feature_stats(*dm.feature_stats())
            self.features = features
        elif features != self.features:
            raise ArtifactError(f"the data's features {features} differ from the artifact's {self.features}")

        texts = [u.text for u in dm.train_utterances] if stage == "fit" else None  # rank draft/CTC vocabularies
        llm, tokenizer = self._build_llm(texts)
        projector = self._build_projector(llm, tokenizer, texts)
        self.encoder.requires_grad_(h.train_encoder)
        prompt = instantiate(h.llm["prompt"], tokenizer=tokenizer)
        self.model = SpeechLLM(
            self.encoder, projector, llm, tokenizer, prompt=prompt,
            frames_per_second=self.frames_per_second, **h.llm["generation"],
        )
        self._log_setup()

    @property
    def frames_per_second(self) -> float:
        return 1000.0 / self.features["hop_ms"]

    def _build_llm(self, texts: list[str] | None):
        h = self.hparams
        model_spec, lora = h.llm["model"], h.llm.get("lora")
        if self.previous is None or self.previous["llm"] is None:
            return build_llm_from_spec(model_spec, h.adapter, lora, texts=texts)
        stored = self.previous["llm"]
        previous = stored["adapter"]
        llm, tokenizer = build_llm_from_spec(model_spec, previous, stored["spec"].get("lora"))
        try:
            load_handoff_state(llm, previous, stored["weights"])
        except LLMStateError as e:
            raise ArtifactError(f"init_from artifact's LLM weights: {e}") from e
        lora_config = instantiate(lora) if h.adapter == "lora" and previous != "lora" else None
        return change_adapter(llm, previous, h.adapter, lora_config), tokenizer

    def _build_projector(self, llm, tokenizer, texts):
        h = self.hparams
        embeddings = llm.get_input_embeddings().weight
        config = {**h.projector, "input_dim": self.encoder.output_dim, "output_dim": embeddings.shape[1]}
        if self.previous is not None:
            stored = self.previous["projector"]["config"]
            diff = _differences(stored, config)
            if diff:
                widths = {k: v for k, v in diff.items() if k in ("input_dim", "output_dim")}
                what = "width mismatch" if widths else "a different projector"
                detail = ", ".join(f"{k}: artifact {a} vs this run {b}" for k, (a, b) in diff.items())
                raise ArtifactError(f"init_from artifact holds {what} ({detail}); pass the projector/llm/encoder options it was trained with.")
        projector = instantiate(config)
        if self.previous is not None:
            projector.load_state_dict(self.previous["projector"]["state_dict"], strict=True)
            if self.previous["llm"] is None and not torch.equal(
                projector.token_embeddings, embeddings.detach()[projector.vocab_ids].to(projector.token_embeddings)
            ):
                raise ArtifactError(
                    "init_from holds a CTC projector aligned to another LLM whose token embeddings differ from "
                    f"llm={h.llm.get('tag')}'s; only an LLM with the same embeddings (a draft cut from it) can reuse it"
                )
        elif hasattr(projector, "set_vocabulary"):  # a CTC projector scores the transcripts' tokens
            vocab_ids = draft_vocab(tokenizer, projector.vocab_ids.numel(), texts)
            projector.set_vocabulary(vocab_ids, embeddings)
        has_ctc = hasattr(projector, "token_logits")
        if not has_ctc and (h.ctc_weight > 0 or h.lm_weight <= 0):
            raise ValueError(
                f"stage.module.ctc_weight={h.ctc_weight} / lm_weight={h.lm_weight} need a CTC projector "
                f"(projector=ctc); with projector={config['_target_'].rsplit('.', 1)[-1]} set ctc_weight=0 and lm_weight=1"
            )
        self.projector_config = config
        return projector

    def _log_setup(self) -> None:
        m = self.model
        rate = m.projector.audio_tokens_per_second(self.frames_per_second / self.encoder.subsampling)
        counts = {}
        for name, part in (("encoder", m.encoder), ("projector", m.projector), ("llm", m.llm)):
            params = list(part.parameters())
            counts[f"params/{name}/trainable"] = sum(p.numel() for p in params if p.requires_grad)
            counts[f"params/{name}/total"] = sum(p.numel() for p in params)
        self.setup_summary = {"audio_tokens_per_second": rate, **counts}
        log.info(
            "SpeechLLM (llm=%s, adapter=%s, train_encoder=%s): %.1f audio tokens/s; trainable parameters: %s",
            self.hparams.llm.get("tag"), self.hparams.adapter, self.hparams.train_encoder, rate,
            ", ".join(f"{n} {counts[f'params/{n}/trainable']:,} of {counts[f'params/{n}/total']:,}"
                      for n in ("encoder", "projector", "llm")),
        )

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
        groups = [{"params": main, "lr": h.lr}]
        if h.train_encoder:
            groups.append({"params": list(self.model.encoder.parameters()), "lr": h.encoder_lr})
        return adamw_warmup_cosine(self, groups, h.lr, h.weight_decay, h.warmup_steps, h.min_lr_ratio)

    def _checkpoint_keys(self) -> set[str]:
        """State-dict keys a checkpoint must hold: encoder, projector and the LLM weights that change."""
        keys = {k for k in self.state_dict() if not k.startswith("model.llm.")}
        keys |= {n for n, p in self.named_parameters() if p.requires_grad}
        if isinstance(self.model.llm, SubsetHeadLM):  # a draft's vocabulary comes from the training texts
            head = self.model.llm.get_output_embeddings().weight
            keys.add("model.llm.vocab_ids")
            keys |= {n for n, p in self.named_parameters() if p is head}
        return keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        missing = sorted(self._checkpoint_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise ArtifactError(f"checkpoint lacks {len(missing)} weights this stage trains, e.g. {missing[:3]}")

    # ---- steps --------------------------------------------------------------------------
    def _loss(self, out) -> torch.Tensor:
        """The stage's objective: lm_weight x LM loss + ctc_weight x CTC loss."""
        h = self.hparams
        loss = h.lm_weight * out.loss
        if out.ctc_loss is not None and h.ctc_weight > 0:
            loss = loss + h.ctc_weight * out.ctc_loss
        return loss

    def _log_losses(self, split: str, dataset: str, out, size: int) -> torch.Tensor:
        suffix = f"/{dataset}" if dataset else ""
        loss = self._loss(out)
        sync = split != "train"
        self.log(f"{split}/loss{suffix}", loss, prog_bar=not sync, batch_size=size, sync_dist=sync, add_dataloader_idx=False)
        if out.num_tokens:
            self.log(f"{split}/lm_loss{suffix}", out.loss, batch_size=size, sync_dist=sync, add_dataloader_idx=False)
        if out.ctc_loss is not None:
            self.log(f"{split}/ctc_loss{suffix}", out.ctc_loss, batch_size=size, sync_dist=sync, add_dataloader_idx=False)
        return loss

    def training_step(self, batch, batch_idx):
        out = self.model(batch["feats"], batch["feat_lens"], batch["texts"], lm=self.hparams.lm_weight > 0)
        size = len(batch["texts"])
        loss = self._log_losses("train", "", out, size)
        # Over-long transcripts run with masked labels (same work on every DDP rank); count them.
        skipped = int((~out.keep).sum())
        self.log("train/skipped", float(skipped), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True, batch_size=size)
        return loss

    def _eval_step(self, batch, split: str, dataset: str, limit: int | None, num_beams: int | None) -> None:
        out = self.model(batch["feats"], batch["feat_lens"], batch["texts"])
        self._log_losses(split, dataset, out, len(batch["texts"]))
        if self.model.has_ctc:  # what the projector alone hears, as text: val/wer/dev_ctc
            hyps = self.model.ctc_transcribe(batch["feats"], batch["feat_lens"])
            self.transcripts[f"{dataset}_ctc"].add(batch["ids"], batch["texts"], hyps)
        n = len(batch["texts"]) if limit is None else min(limit, len(batch["texts"]))
        if n == 0:
            return
        lens = batch["feat_lens"][:n]
        with torch.no_grad():
            self.model.llm.eval()
            hyps = self.model.generate(batch["feats"][:n, : int(lens.max())], lens, num_beams=num_beams)
        self.transcripts[dataset].add(batch["ids"][:n], batch["texts"][:n], hyps)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", "dev", self._generate_left, num_beams=1)  # greedy
        if self._generate_left is not None:
            self._generate_left = max(self._generate_left - len(batch["texts"]), 0)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        dataset = test_set_name(self, dataloader_idx)
        self._eval_step(batch, "test", dataset, None, num_beams=None)  # llm.generation defaults

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
    def llm_spec(self) -> dict:
        """The resolved ``llm`` node as trained here: this stage's adapter, no runtime texts."""
        spec = OmegaConf.to_container(OmegaConf.create(self.hparams.llm), resolve=True)
        spec["adapter"] = spec["model"]["adapter"] = self.hparams.adapter
        spec["model"]["lora"] = spec.get("lora")
        if "texts" in spec["model"]:
            spec["model"]["texts"] = None
        return spec

    def artifact_payload(self) -> dict:
        """Encoder, projector, the LLM's build spec plus the LLM weights this stage changed,
        prompt and generation settings, features, and the encoder stage's CTC head and word LM
        (carried on while the encoder stays frozen: a fine-tuned encoder no longer fits them)."""
        m = self.model
        spec = self.llm_spec()

        def cpu_state(module):
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

        payload = {
            "encoder": {"config": dict(m.encoder.config), "state_dict": cpu_state(m.encoder)},
            "projector": {"config": dict(self.projector_config), "state_dict": cpu_state(m.projector)},
            "llm": {"spec": spec, "adapter": self.hparams.adapter, "weights": handoff_state(m.llm, self.hparams.adapter)},
            "prompt": spec["prompt"],
            "generation": spec["generation"],
            "features": dict(self.features),
        }
        if self.hparams.train_encoder:
            log.info("The encoder was fine-tuned: the encoder stage's CTC head and word LM are not carried on")
        else:
            payload.update(self.carried)
        return payload
