"""Stage 1 (stage=encoder): CTC pretraining of the speech encoder."""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from efin.data.lm_text import lm_sentences
from efin.decoding.ctc import build_ctc_lm, ctc_greedy, lm_decoder
from efin.handoff import check_features, plain
from efin.models.ctc import CTCModel
from efin.models.encoder import Encoder
from efin.models.protocols import CharacterVocabulary
from efin.stages.common import EvalTranscripts, adamw_warmup_cosine, test_set_name
from efin.tokenizer import build_vocab, vocab_from_state

log = logging.getLogger(__name__)


class CTCStage(pl.LightningModule):
    """Trains ``encoder`` plus a linear CTC head; logs loss, WER and CER per split.

    The CTC vocabulary and the feature statistics come from the training data, so the head is
    built in :meth:`setup`, once the datamodule has loaded its manifests.

    ``optimizer``: :func:`~efin.stages.common.adamw_warmup_cosine` arguments (lr, betas, weight
    decay, warm-up, final ratio; the stage file's ``optimizer`` node).

    ``lm`` (``{order, sources, beam_size, lm_weight, word_score}``, or None for none): a word
    n-gram LM trained on the text of ``sources`` (:func:`efin.data.lm_text.lm_sentences`; default
    the training transcripts), and its words as the lexicon, for a second decoding
    of dev and each test set by lexicon beam search next to greedy (``val/wer/dev_lm``, ``test/wer/<set>_lm``);
    stored in the artifact. Character vocabularies only.
    """

    def __init__(
        self,
        encoder: Encoder,
        vocab: str = "char",
        sentencepiece_size: int = 256,
        optimizer: dict | None = None,
        feature_stats_utterances: int = 500,
        lm: dict | None = None,
    ):
        super().__init__()
        # plain containers: checkpoints load with weights_only
        lm = None if lm is None else plain(lm)
        optimizer = (
            plain(optimizer)
            if optimizer is not None
            else {"lr": 2e-3, "weight_decay": 1e-3, "warmup_steps": 400, "min_lr_ratio": 0.02}
        )
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.model: CTCModel | None = None
        self.vocab = None
        self.transcripts = EvalTranscripts()
        self.ctc_lm: dict | None = None  # {"arpa", "words", "order", "decode"}, see build_ctc_lm
        self._lm_decoder = None

    # ---- model construction -------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        dm = self.trainer.datamodule
        texts = [u.text for u in dm.train_utterances] if stage == "fit" else []
        self.vocab = build_vocab(self.hparams.vocab, texts, self.hparams.sentencepiece_size)
        self.model = CTCModel(self.encoder, self.vocab.size)
        check_features(self.encoder, dm.featurizer.config)
        if stage == "fit":
            mean, std = dm.feature_stats(self.hparams.feature_stats_utterances)
            self.encoder.set_feature_stats(mean, std)
            if self.hparams.lm is not None and isinstance(self.vocab, CharacterVocabulary):
                lm = dict(self.hparams.lm)
                sources = lm.pop("sources", None) or ["transcripts"]
                self.ctc_lm = build_ctc_lm(lm_sentences(sources, transcripts=texts), sources=sources, **lm)
            elif self.hparams.lm is not None:
                log.warning("no LM decoding: it needs stage.module.vocab=char (set stage.module.lm=null to silence)")
        log.info("CTC vocabulary: %s, %d symbols; encoder %.2f M parameters",
                 self.hparams.vocab, self.vocab.size, sum(p.numel() for p in self.encoder.parameters()) / 1e6)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["efin_vocab"] = self.vocab.state()
        checkpoint["efin_ctc_lm"] = self.ctc_lm

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.vocab = vocab_from_state(checkpoint["efin_vocab"])
        self.ctc_lm = checkpoint.get("efin_ctc_lm")
        self._lm_decoder = None  # rebuilt from the restored LM on first use

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.parameters(), **self.hparams.optimizer)

    # ---- steps --------------------------------------------------------------------------
    def _forward(self, batch):
        log_probs, lens = self.model(batch["feats"], batch["feat_lens"])
        targets = [self.vocab.encode(t) for t in batch["texts"]]
        return log_probs, lens, self.model.loss(log_probs, lens, targets)

    def training_step(self, batch, batch_idx):
        _, _, loss = self._forward(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["texts"]))
        return loss

    def _eval_step(self, batch, split: str, dataset: str):
        log_probs, lens, loss = self._forward(batch)
        hyps = [self.vocab.decode(ids) for ids in ctc_greedy(log_probs, lens)]
        self.transcripts[dataset].add(batch["ids"], batch["texts"], hyps)
        if self.ctc_lm is not None:
            if self._lm_decoder is None:
                self._lm_decoder = lm_decoder(self.vocab, self.ctc_lm)
            self.transcripts[f"{dataset}_lm"].add(batch["ids"], batch["texts"], self._lm_decoder(log_probs, lens))
        self.log(f"{split}/loss/{dataset}", loss, batch_size=len(hyps), sync_dist=True, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", "dev")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "test", test_set_name(self, dataloader_idx))

    def on_validation_epoch_start(self) -> None:
        self.transcripts.reset()

    def on_validation_epoch_end(self) -> None:
        self.transcripts.log(self, "val")

    def on_test_epoch_start(self) -> None:
        self.transcripts.reset()

    def on_test_epoch_end(self) -> None:
        self.transcripts.log(self, "test")

    # ---- handoff ------------------------------------------------------------------------
    def artifact_payload(self) -> dict:
        """What the next stage needs: encoder and head weights, configs, vocabulary, feature setup."""
        return {
            "encoder": {"config": self.encoder.config, "state_dict": self.encoder.state_dict()},
            "ctc_head": {"vocab": self.vocab.state(), "state_dict": self.model.head.state_dict()},
            "features": dict(self.trainer.datamodule.featurizer.config),
            **({"ctc_lm": self.ctc_lm} if self.ctc_lm is not None else {}),
        }

