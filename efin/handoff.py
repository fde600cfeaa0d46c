"""Typed handoff of the SpeechLLM stages: one path from a projector/llm artifact to a model and back.

    handoff = SpeechLLMHandoff.from_artifact(load_artifact(path))   # checks the parts
    model = handoff.build()                                         # -> SpeechLLM (evaluation, export, decoders)
    payload = SpeechLLMHandoff.from_model(model, ...).payload()     # -> save_artifact (stage export)

:class:`SpeechLLMStart` is the training side: what a projector/llm stage starts from (an encoder,
projector or llm artifact, or nothing), the compatibility checks, and the build of the model it
trains (called from the stage's ``configure_model``).

An artifact never holds the pretrained LLM, only its build spec and the weights a rebuild cannot
reproduce (:mod:`efin.models.llm_state`). The feature frame rate comes from the featurizer
(:func:`~efin.data.audio.featurizer_from_config`) the artifact's ``features`` describe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from efin.artifacts import FIRST_PASS_KEYS, ArtifactError
from efin.data.audio import featurizer_from_config
from efin.decoding.ctc import lm_decoder
from efin.models.draft import draft_vocab
from efin.models.encoder import Encoder
from efin.models.llm import ADAPTERS
from efin.models.llm_state import (
    TRANSITIONS,
    LLMStateError,
    build_llm_from_spec,
    change_adapter,
    handoff_state,
    llm_identity,
    load_handoff_state,
)
from efin.models.projector import TRANSCRIPT_CTC_DECODINGS
from efin.models.protocols import TokenCTC, TranscriptInput
from efin.models.speech_llm import SpeechLLM
from efin.tokenizer import CharVocab

log = logging.getLogger(__name__)

#: Builder targets renamed since artifacts were first written: old artifacts still load.
LEGACY_TARGETS = {
    "efin.models.llm.build_draft_llm": "efin.models.draft.build_draft_llm",
    "efin.data.prompt.PromptBuilder": "efin.models.prompt.PromptBuilder",
}


def upgrade_targets(node: Any) -> Any:
    """``node`` (nested dicts/lists) with every legacy ``_target_`` renamed (see :data:`LEGACY_TARGETS`)."""
    if isinstance(node, dict):
        return {k: LEGACY_TARGETS.get(v, v) if k == "_target_" else upgrade_targets(v) for k, v in node.items()}
    if isinstance(node, list):
        return [upgrade_targets(v) for v in node]
    return node


def plain(node: Any) -> Any:
    """A plain, resolved container for an OmegaConf node; anything else as is."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def differences(a: dict, b: dict, ignore: frozenset = frozenset()) -> dict:
    """{key: (a value, b value)} for keys whose values differ (flat dicts)."""
    return {k: (a.get(k), b.get(k)) for k in sorted((set(a) | set(b)) - ignore) if a.get(k) != b.get(k)}


def check_features(encoder: nn.Module, features: dict) -> None:
    """Raise when the data's featurizer (``features``, its config) is not what ``encoder`` reads."""
    wanted, have = getattr(encoder, "features", "logmel"), features.get("kind", "logmel")
    if wanted != have:
        raise ArtifactError(f"the encoder reads {wanted} features, the data makes {have}: set data.features={wanted}")
    if features["n_mels"] != encoder.input_dim:
        raise ArtifactError(
            f"the encoder takes {encoder.input_dim} mel bins, the data makes {features['n_mels']}: "
            f"set data.n_mels={encoder.input_dim}"
        )


def frames_per_second(features: dict) -> float:
    """Feature frames per second of audio of the featurizer that ``features`` (its config) describes."""
    return featurizer_from_config(features).frames_per_second


@dataclass(frozen=True)
class Part:
    """A stored component: its builder ``config`` (a ``_target_`` node, or Encoder kwargs) and weights."""

    config: dict
    state_dict: dict

    def entry(self) -> dict:
        return {"config": dict(self.config), "state_dict": self.state_dict}


@dataclass(frozen=True)
class LLMPart:
    """The LLM as stored: ``spec`` (resolved ``llm`` group node: model builder, lora, prompt,
    generation, tag), the ``adapter`` it was trained with, and the weights a rebuild cannot
    reproduce (:func:`efin.models.llm_state.handoff_state`)."""

    spec: dict
    adapter: str
    weights: dict

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise ArtifactError(f"the artifact's LLM adapter {self.adapter!r} is not one of {ADAPTERS}")

    @property
    def tag(self) -> str | None:
        return self.spec.get("tag")

    def build(self, cache_dir: str | None = None):
        """``(llm, tokenizer)``: rebuilt from the spec with its adapter, stored weights loaded
        (expected keys checked). ``cache_dir`` replaces the spec's LLM cache location."""
        model_spec = (
            self.spec["model"] if cache_dir is None else _replace_key(self.spec["model"], "cache_dir", cache_dir)
        )
        llm, tokenizer = build_llm_from_spec(model_spec, self.adapter, self.spec.get("lora"))
        try:
            load_handoff_state(llm, self.adapter, self.weights)
        except LLMStateError as e:
            raise ArtifactError(f"the artifact's LLM weights do not fit its LLM spec: {e}") from e
        return llm, tokenizer


def _replace_key(node, key: str, value):
    if isinstance(node, dict):
        return {k: value if k == key else _replace_key(v, key, value) for k, v in node.items()}
    return node


def build_encoder(part: Part) -> nn.Module:
    """An encoder rebuilt from a stored part (strict loading): a ``_target_`` node (e.g. a
    pretrained Whisper's shape), or the Conformer :class:`Encoder`'s kwargs."""
    encoder = instantiate(part.config) if "_target_" in part.config else Encoder(**part.config)
    encoder.load_state_dict(part.state_dict, strict=True)
    return encoder


def build_projector(part: Part):
    """A projector rebuilt from a stored part (its ``_target_`` node, strict loading)."""
    projector = instantiate(part.config)
    projector.load_state_dict(part.state_dict, strict=True)
    return projector


def set_transcript_decoding(
    projector: TranscriptInput, first_pass: dict | None, ctc_decoding: str | None = None
) -> None:
    """How a transcript projector reads the encoder's CTC (``ctc_decoding``: ``greedy`` | ``lm``;
    None keeps its own); ``lm`` searches with the word LM of ``first_pass`` (the encoder stage's)."""
    if ctc_decoding is not None:
        if ctc_decoding not in TRANSCRIPT_CTC_DECODINGS:
            raise ValueError(f"decode.transcript_decoding={ctc_decoding!r}: expected one of "
                             f"{TRANSCRIPT_CTC_DECODINGS} or null")
        projector.ctc_decoding = ctc_decoding
    if projector.ctc_decoding != "lm":
        return
    ctc_lm = (first_pass or {}).get("ctc_lm")
    if ctc_lm is None:
        raise ArtifactError(
            "the transcript projector reads the CTC with the encoder stage's word LM (ctc_decoding=lm), and the "
            "artifact carries none: train the encoder stage with stage.module.lm, give one with "
            "decode.lm_sources=[...], or read greedily (decode.transcript_decoding=greedy)"
        )
    projector.set_lm_decoder(lm_decoder(CharVocab(projector.symbols), ctc_lm))


def assemble(encoder, projector, llm, tokenizer, prompt: dict, generation: dict, features: dict,
             first_pass: dict | None = None) -> SpeechLLM:
    """The one place a :class:`SpeechLLM` is put together from built parts and stored settings
    (``first_pass``: the encoder stage's CTC head and word LM, which a transcript projector may read with)."""
    if isinstance(projector, TranscriptInput):  # it reads text through the LLM's own tokenizer and table
        projector.attach(tokenizer, llm.get_input_embeddings())
        set_transcript_decoding(projector, first_pass)
    return SpeechLLM(
        encoder, projector, llm, tokenizer, prompt=instantiate(prompt, tokenizer=tokenizer),
        frames_per_second=frames_per_second(features), **generation,
    )


@dataclass(frozen=True)
class SpeechLLMHandoff:
    """A projector or llm stage artifact, typed.

    Attributes:
        stage: ``projector`` | ``llm``; None for a trained model not saved yet (``save_artifact`` names it).
        encoder, projector: stored components; llm: :class:`LLMPart`.
        prompt: the prompt builder node (``_target_``, built with ``tokenizer=``).
        generation: SpeechLLM decoding defaults (tokens_per_second, extra_tokens, num_beams, length_penalty).
        features: the featurizer's config (:func:`~efin.data.audio.featurizer_from_config`).
        first_pass: the encoder stage's ``ctc_head`` and ``ctc_lm``, carried on while the
            encoder stays frozen (n-best rescoring); empty when not carried.
    """

    stage: str | None
    encoder: Part
    projector: Part
    llm: LLMPart
    prompt: dict
    generation: dict
    features: dict
    first_pass: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in (None, "projector", "llm"):
            raise ArtifactError(f"a SpeechLLM handoff comes from a projector or llm artifact, not {self.stage!r}")

    @classmethod
    def from_artifact(cls, artifact: dict) -> SpeechLLMHandoff:
        """Read a loaded artifact dict (:func:`efin.artifacts.load_artifact`), checking its LLM entry."""
        stored = artifact["llm"]
        missing = [k for k in ("spec", "adapter", "weights") if k not in stored]
        if missing:
            raise ArtifactError(f"the artifact's llm entry lacks {missing}; re-export it with this efin version")
        return cls(
            stage=artifact["stage"],
            encoder=Part(artifact["encoder"]["config"], artifact["encoder"]["state_dict"]),
            projector=Part(upgrade_targets(artifact["projector"]["config"]), artifact["projector"]["state_dict"]),
            llm=LLMPart(upgrade_targets(stored["spec"]), stored["adapter"], stored["weights"]),
            prompt=upgrade_targets(artifact["prompt"]),
            generation=dict(artifact["generation"]),
            features=dict(artifact["features"]),
            first_pass={k: artifact[k] for k in FIRST_PASS_KEYS if artifact.get(k) is not None},
        )

    @classmethod
    def from_model(
        cls, model: SpeechLLM, *, llm_spec: dict, adapter: str, projector_config: dict,
        features: dict, first_pass: dict | None = None,
    ) -> SpeechLLMHandoff:
        """Describe a trained model for export: CPU copies of its weights, the LLM weights
        ``adapter`` changed, prompt and generation from ``llm_spec``."""

        def cpu_state(module):
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

        return cls(
            stage=None,
            encoder=Part(dict(model.encoder.config), cpu_state(model.encoder)),
            projector=Part(dict(projector_config), cpu_state(model.projector)),
            llm=LLMPart(llm_spec, adapter, handoff_state(model.llm, adapter)),
            prompt=llm_spec["prompt"],
            generation=llm_spec["generation"],
            features=dict(features),
            first_pass=dict(first_pass or {}),
        )

    def payload(self) -> dict:
        """The artifact payload for :func:`efin.artifacts.save_artifact` (stage = ``self.stage``)."""
        return {
            "encoder": self.encoder.entry(),
            "projector": self.projector.entry(),
            "llm": {"spec": self.llm.spec, "adapter": self.llm.adapter, "weights": self.llm.weights},
            "prompt": self.prompt,
            "generation": self.generation,
            "features": dict(self.features),
            **self.first_pass,
        }

    @property
    def frames_per_second(self) -> float:
        return frames_per_second(self.features)

    def build(self, cache_dir: str | None = None) -> SpeechLLM:
        """The SpeechLLM: encoder and projector from their configs and weights, the LLM from its
        spec with the stored adapter and weights. ``cache_dir``: this machine's LLM cache."""
        llm, tokenizer = self.llm.build(cache_dir)
        return assemble(build_encoder(self.encoder), build_projector(self.projector), llm, tokenizer,
                        self.prompt, self.generation, self.features, self.first_pass)


class SpeechLLMStart:
    """Where a projector/llm stage starts and the model it trains.

    Args:
        encoder: encoder builder node; must match the artifact's encoder.
        projector: projector builder node (widths are set from the encoder and the LLM).
        llm: the ``llm`` group node (``model`` builder, ``lora``, ``prompt``, ``generation``, ``tag``).
        adapter: ``frozen`` | ``lora`` | ``full``: how the LLM trains in this stage.

    :meth:`take` records the starting artifact and checks what it can at once; :meth:`build`
    builds the model (and checks the rest); :meth:`handoff` describes the trained model for export.
    """

    def __init__(self, encoder: dict, projector: dict, llm: dict, adapter: str):
        self.encoder_node, self.projector_node, self.llm_node = plain(encoder), plain(projector), plain(llm)
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        self.adapter = adapter
        self.artifact: dict | None = None  # the init_from artifact (any stage)
        self.previous: SpeechLLMHandoff | None = None  # its projector + LLM, from a projector/llm artifact
        self.reuse_llm = False  # False: take the previous projector only (a draft from its target's projector)
        # Known once built:
        self.features: dict | None = None
        self.projector_config: dict | None = None

    @property
    def first_pass(self) -> dict:
        """The encoder stage's CTC head and word LM of the starting artifact, carried on (n-best rescoring)."""
        if self.artifact is None:
            return {}
        return {k: self.artifact[k] for k in FIRST_PASS_KEYS if self.artifact.get(k) is not None}

    def _other_llm(self, stored: LLMPart) -> bool:
        return llm_identity(stored.spec["model"]) != llm_identity(self.llm_node["model"])

    def take(self, artifact: dict) -> None:
        """Start from ``artifact`` (encoder, projector or llm stage); checks the LLM and adapter now."""
        self.artifact = artifact
        if artifact["stage"] not in ("projector", "llm"):
            return
        previous = SpeechLLMHandoff.from_artifact(artifact)
        other = self._other_llm(previous.llm)
        if artifact["stage"] == "projector" and other and "token_embeddings" in previous.projector.state_dict:
            # A CTC projector aligned to another LLM with the same token embeddings (a draft cut
            # from the target): take the projector only; build() checks the embeddings.
            self.previous, self.reuse_llm = previous, False
            return
        if other:
            raise ArtifactError(
                f"init_from artifact was trained with a different LLM (llm={previous.llm.tag}) than this run "
                f"(llm={self.llm_node.get('tag')}). Pass llm={previous.llm.tag}, or an artifact of this LLM."
            )
        if (previous.llm.adapter, self.adapter) not in TRANSITIONS:
            raise ArtifactError(
                f"cannot train a {previous.llm.adapter!r} LLM from the artifact with adapter {self.adapter!r}; "
                f"allowed (previous, new): {sorted(TRANSITIONS)}"
            )
        if previous.llm.adapter == self.adapter == "lora" and previous.llm.spec.get("lora") != self.llm_node.get(
            "lora"
        ):
            raise ArtifactError(
                f"the artifact's LoRA settings {previous.llm.spec.get('lora')} differ from llm.lora "
                f"{self.llm_node.get('lora')}; continuing LoRA training needs the same settings"
            )
        self.previous, self.reuse_llm = previous, True

    # ---- build ------------------------------------------------------------------------------
    def build(
        self, features: dict, texts: Iterable[str] | None = None,
        feature_stats: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> SpeechLLM:
        """The model this stage trains.

        Args:
            features: the data's featurizer config; must equal the artifact's.
            texts: training transcripts (fit only): rank a fresh CTC projector's or draft's vocabulary.
            feature_stats: ``() -> (mean (F,), std (F,))`` for a fresh encoder's CMVN (fit only).
        """
        encoder = self._build_encoder(features, feature_stats)
        llm, tokenizer = self._build_llm(texts)
        projector = self._build_projector(encoder, llm, tokenizer, texts)
        return assemble(encoder, projector, llm, tokenizer, self.llm_node["prompt"], self.llm_node["generation"],
                        self.features, self.first_pass)

    def _build_encoder(self, features: dict, feature_stats) -> nn.Module:
        encoder = instantiate(self.encoder_node)
        if self.artifact is None:
            log.warning("No init_from artifact: the encoder starts untrained (EFIN expects stage=encoder first).")
            check_features(encoder, features)
            if feature_stats is not None:
                encoder.set_feature_stats(*feature_stats())
            self.features = dict(features)
            return encoder
        diff = differences(self.artifact["encoder"]["config"], encoder.config, ignore=frozenset({"dropout"}))
        if diff:
            detail = ", ".join(f"{k}: artifact {a} vs config {b}" for k, (a, b) in diff.items())
            raise ArtifactError(
                f"init_from artifact from a different encoder than this run's `encoder` config ({detail}). "
                f"Pass the encoder option the artifact was trained with (e.g. encoder=tiny), or another init_from."
            )
        encoder.load_state_dict(self.artifact["encoder"]["state_dict"], strict=True)
        self.features = dict(self.artifact["features"])
        if dict(features) != self.features:
            raise ArtifactError(f"the data's features {dict(features)} differ from the artifact's {self.features}")
        return encoder

    def _build_llm(self, texts: Iterable[str] | None):
        model_spec, lora = self.llm_node["model"], self.llm_node.get("lora")
        if self.previous is None or not self.reuse_llm:
            return build_llm_from_spec(model_spec, self.adapter, lora, texts=texts)
        stored = self.previous.llm
        llm, tokenizer = build_llm_from_spec(model_spec, stored.adapter, stored.spec.get("lora"))
        try:
            load_handoff_state(llm, stored.adapter, stored.weights)
        except LLMStateError as e:
            raise ArtifactError(f"init_from artifact's LLM weights: {e}") from e
        lora_config = instantiate(lora) if self.adapter == "lora" and stored.adapter != "lora" else None
        return change_adapter(llm, stored.adapter, self.adapter, lora_config), tokenizer

    def _build_projector(self, encoder: Encoder, llm, tokenizer, texts):
        embeddings = llm.get_input_embeddings().weight
        config = {**self.projector_node, "input_dim": encoder.output_dim, "output_dim": embeddings.shape[1]}
        if self.previous is not None:
            if config.get("symbols", ()) is None:  # filled in from the encoder's CTC head when first built
                config["symbols"] = self.previous.projector.config.get("symbols")
            # how a transcript projector reads the CTC is a setting, not weights: a run may continue reading another way
            diff = differences(self.previous.projector.config, config, ignore=frozenset({"ctc_decoding"}))
            if diff:
                widths = {k: v for k, v in diff.items() if k in ("input_dim", "output_dim")}
                what = "width mismatch" if widths else "a different projector"
                detail = ", ".join(f"{k}: artifact {a} vs this run {b}" for k, (a, b) in diff.items())
                raise ArtifactError(
                    f"init_from artifact holds {what} ({detail}); "
                    "pass the projector/llm/encoder options it was trained with."
                )
        projector = instantiate(config)
        if self.previous is not None:
            projector.load_state_dict(self.previous.projector.state_dict, strict=True)
            if not self.reuse_llm and not torch.equal(
                projector.token_embeddings, embeddings.detach()[projector.vocab_ids].to(projector.token_embeddings)
            ):
                raise ArtifactError(
                    "init_from holds a CTC projector aligned to another LLM whose token embeddings differ from "
                    f"llm={self.llm_node.get('tag')}'s; only an LLM with the same embeddings (a draft cut from it) "
                    "can reuse it"
                )
        elif isinstance(projector, TokenCTC):  # a CTC projector scores the transcripts' tokens
            vocab_ids = draft_vocab(tokenizer, projector.vocab_ids.numel(), texts)
            projector.set_vocabulary(vocab_ids, embeddings)
        elif isinstance(projector, TranscriptInput):  # it reads the encoder stage's CTC transcript
            if "ctc_head" not in self.first_pass:
                raise ArtifactError(
                    "projector=transcript reads the encoder stage's CTC head, and init_from carries none: start "
                    "from an encoder artifact (stage.init_from=outputs/<name>/encoder/artifact)"
                )
            projector.set_ctc_head(self.first_pass["ctc_head"])
            config["symbols"] = projector.symbols
        self.projector_config = config
        return projector

    # ---- export -----------------------------------------------------------------------------
    def llm_spec(self) -> dict:
        """The resolved ``llm`` node as trained here: this stage's adapter, no runtime texts."""
        spec = plain(OmegaConf.create(self.llm_node))
        spec["adapter"] = spec["model"]["adapter"] = self.adapter
        spec["model"]["lora"] = spec.get("lora")
        if "texts" in spec["model"]:
            spec["model"]["texts"] = None
        return spec

    def handoff(self, model: SpeechLLM, carry_first_pass: bool) -> SpeechLLMHandoff:
        """Describe the trained ``model`` for export; ``carry_first_pass`` false when the encoder
        was fine-tuned (the encoder stage's CTC head and word LM no longer fit it)."""
        return SpeechLLMHandoff.from_model(
            model, llm_spec=self.llm_spec(), adapter=self.adapter,
            projector_config=self.projector_config, features=self.features,
            first_pass=self.first_pass if carry_first_pass else None,
        )
