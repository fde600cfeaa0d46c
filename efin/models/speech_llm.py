"""SpeechLLM: encoder -> projector -> LLM, trained with an LM loss on the transcript tokens.

Model code only: embedding speech, the prompt/embedding merge, the losses. Decoders (greedy,
beam, rescoring, speculative) live in :mod:`efin.decoding` and take built models.

The module receives built components (encoder, projector, LLM, tokenizer, prompt builder);
which of them train is decided by whoever built them (``efin.models.llm.apply_adapter``,
``requires_grad_`` on the encoder) - not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from efin.models.prompt import IGNORE_INDEX, LLMInputs, PromptBuilder
from efin.models.protocols import SubsetVocabularyLM, TokenCTC, TranscriptInput


@dataclass
class SpeechLLMOutput:
    """loss: scalar, mean cross-entropy (nats) per label token (0, still differentiable, when
    there are none or the LLM was skipped); num_tokens: label tokens in the loss; keep: (B,)
    bool, False for items whose transcript exceeded the prompt's ``max_text_tokens`` (not trained
    on); ctc_loss: the projector's CTC loss over the LLM's tokens (nats per token), None for
    projectors without one."""

    loss: torch.Tensor
    num_tokens: int
    keep: torch.Tensor
    ctc_loss: torch.Tensor | None = None
    #: (B, T', D) encoder output and (B,) lengths, for a second model on the same audio (distillation).
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None
    #: per item, transcript token ids + end token (:meth:`PromptBuilder.encode_transcripts`).
    targets: list[list[int]] | None = None
    #: :class:`LabelLogits` at every label position; None when the LLM was skipped.
    label_logits: LabelLogits | None = None


@dataclass
class LabelLogits:
    """Teacher-forced next-token logits at the label positions of a batch.

    logits: (N, S) float32, the head's scores for the token at each of the N label positions
        (transcript tokens and end tokens, row-major over the batch); S is the head's
        vocabulary: the full vocabulary V, or a draft's subset (``vocab_ids``).
    labels: (N,) long, the full-vocabulary id that follows at each position.
    vocab_ids: (S,) long full-vocabulary ids of the logit columns; None when S = V.

    Two models given the same ``targets``/``keep`` (and tokenizer) yield the same N positions
    in the same order, whatever their prompts, so their rows can be compared one to one.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    vocab_ids: torch.Tensor | None = None

    def full_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Column indices (any shape) -> full-vocabulary token ids."""
        return columns if self.vocab_ids is None else self.vocab_ids[columns]


class SpeechLLM(nn.Module):
    """Speech recogniser: audio features -> transcript text through an LLM.

    Args:
        encoder: ``forward(feats (B,T,F), feat_lens (B,)) -> (hidden (B,T',D), lens (B,))``, ``.output_dim``.
        projector: ``forward(x (B,T',D), lens) -> (B,N,H), lens``; ``.input_dim`` / ``.output_dim``.
        llm: a causal LM (Hugging Face, peft-wrapped, or a ``SubsetHeadLM`` draft).
        tokenizer: the LLM's tokenizer.
        prompt: a :class:`PromptBuilder`; default one built from ``tokenizer`` + ``instruction``.
        instruction: user-turn text when ``prompt`` is None.
        frames_per_second: feature frames per second of audio (100 for 10 ms hops).
        tokens_per_second, extra_tokens: default generation limit per utterance,
            ``ceil(tokens_per_second * seconds + extra_tokens)`` tokens (end token included).
        tokens_per_ctc_token: with a CTC projector, the limit is also at most
            ``ceil(tokens_per_ctc_token * N + extra_tokens)`` for the N tokens the CTC head heard:
            output bounded by what the audio holds (None = the duration limit only).
        trim_loops: a hypothesis that reaches its limit loses a trailing repetition loop
            (:func:`efin.decoding.loops.trim_loop`).
        num_beams: default beam size of :func:`efin.decoding.generate.decode` (1 = greedy).
        length_penalty: beam ranking ``log_prob / length ** length_penalty``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        tokenizer,
        prompt: PromptBuilder | None = None,
        instruction: str = "Transcribe the audio.",
        frames_per_second: float = 100.0,
        tokens_per_second: float = 8.0,
        extra_tokens: int = 10,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        tokens_per_ctc_token: float | None = 2.0,
        trim_loops: bool = True,
    ):
        super().__init__()
        hidden = llm.get_input_embeddings().weight.shape[1]
        enc_dim = getattr(encoder, "output_dim", None)
        if enc_dim is not None and getattr(projector, "input_dim", enc_dim) != enc_dim:
            raise ValueError(
                f"projector input_dim={projector.input_dim} but the encoder outputs {enc_dim} features; "
                f"build the projector with input_dim=encoder.output_dim"
            )
        if getattr(projector, "output_dim", hidden) != hidden:
            raise ValueError(
                f"projector output_dim={projector.output_dim} but the LLM's embeddings are {hidden} wide; "
                f"build the projector with output_dim=llm.config.hidden_size"
            )
        self.encoder, self.projector, self.llm = encoder, projector, llm
        self.tokenizer = tokenizer
        self.prompt = prompt if prompt is not None else PromptBuilder(tokenizer, instruction=instruction)
        self.frames_per_second = frames_per_second
        self.tokens_per_second, self.extra_tokens = tokens_per_second, extra_tokens
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.tokens_per_ctc_token, self.trim_loops = tokens_per_ctc_token, trim_loops

    # ------------------------------------------------------------------------------------------

    @property
    def has_ctc(self) -> bool:
        """Whether the projector classifies audio into the LLM's tokens (:class:`TokenCTCProjector`)."""
        return isinstance(self.projector, TokenCTC)

    @property
    def has_ctc_draft(self) -> bool:
        """Whether the projector hands the LLM a CTC's text: its own token CTC, or the encoder
        CTC's transcript (:class:`TranscriptProjector`). That text is a free draft for speculative
        decoding and bounds the output length (``tokens_per_ctc_token``)."""
        return self.has_ctc or isinstance(self.projector, TranscriptInput)

    def embed_speech(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F), feat_lens (B,) -> speech embeddings (B, N, H) in the LLM's dtype, lens (B,)."""
        return self.project(*self.encoder(feats, feat_lens))

    def project(self, hidden: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, T', D), lens (B,) -> speech embeddings (B, N, H) in the LLM's dtype, lens (B,)."""
        speech, lens = self.projector(hidden, lens)
        return speech.to(self.llm.get_input_embeddings().weight.dtype), lens

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, texts: list[str], lm: bool = True,
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SpeechLLMOutput:
        """Mean next-token cross-entropy on the (normalised) transcripts and end tokens, and the
        projector's CTC loss on the transcript tokens when it has one.

        ``lm`` False skips the LLM (loss 0): a CTC projector then aligns without LLM compute.
        Over-long transcripts still run (cut, labels masked) so every DDP rank does the same
        work; ``keep`` reports them. ``encoded``: this batch's encoder output (hidden (B, T', D),
        lens (B,)) when already known (:class:`efin.models.encoder_cache.EncoderCache`); the
        encoder is then not run.
        """
        targets, keep = self.prompt.encode_transcripts(texts)
        hidden, lens = encoded if encoded is not None else self.encoder(feats, feat_lens)
        ctc = None
        if self.has_ctc:
            logits, logit_lens = self.projector.token_logits(hidden, lens)
            ctc = self.projector.ctc_loss(logits, logit_lens, [t[:-1] for t in targets])  # no end token
            if not lm:
                return SpeechLLMOutput(ctc.new_zeros(()), 0, keep, ctc, (hidden, lens), targets)
        elif not lm:
            raise ValueError("lm=False leaves nothing to train: this projector has no CTC loss")
        scored = self.teacher_forced(
            hidden, lens, targets, keep, ctc_logits=(logits, logit_lens) if self.has_ctc else None
        )
        loss, n = self.cross_entropy(scored)
        return SpeechLLMOutput(loss, n, keep, ctc, (hidden, lens), targets, scored)

    def teacher_forced(
        self, hidden: torch.Tensor, lens: torch.Tensor, targets: list[list[int]], keep: torch.Tensor,
        ctc_logits: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LabelLogits:
        """Logits at the label positions of ``targets`` given the encoder output.

        Args:
            hidden: (B, T', D) encoder output; lens: (B,) valid frames.
            targets, keep: from :meth:`PromptBuilder.encode_transcripts` (possibly another
                model's: same tokenizer, same ids).
            ctc_logits: a CTC projector's ``token_logits`` when already computed.
        """
        if self.has_ctc:
            logits, logit_lens = ctc_logits if ctc_logits is not None else self.projector.token_logits(hidden, lens)
            speech, speech_lens = self.projector.embed(logits, logit_lens)
        else:
            speech, speech_lens = self.projector(hidden, lens)
        speech = speech.to(self.llm.get_input_embeddings().weight.dtype)
        return self.label_logits(
            self.prompt.training_inputs(self.llm.get_input_embeddings(), speech, speech_lens, targets, keep)
        )

    def label_logits(self, inputs: LLMInputs) -> LabelLogits:
        """The head runs on label positions only: for a big vocabulary it is the costly part,
        and the prompt and audio positions need no scores."""
        decoder = self.llm.get_decoder()
        hidden = decoder(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        ).last_hidden_state
        labels = inputs.labels[:, 1:]
        selected = labels != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][selected]).float()
        vocab_ids = self.llm.vocab_ids if isinstance(self.llm, SubsetVocabularyLM) else None
        return LabelLogits(logits, labels[selected], vocab_ids)

    def cross_entropy(self, scored: LabelLogits) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy (nats) over the label positions the head can score, and their count
        (a draft's head skips tokens outside its subset)."""
        labels = scored.labels
        if isinstance(self.llm, SubsetVocabularyLM):
            labels = self.llm.subset_labels(labels)
        n = int((labels != IGNORE_INDEX).sum())
        loss = F.cross_entropy(scored.logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / max(n, 1)
        return loss, n

    def lm_loss(self, inputs: LLMInputs) -> tuple[torch.Tensor, int]:
        """Cross-entropy over label positions only (see :meth:`label_logits`, :meth:`cross_entropy`)."""
        return self.cross_entropy(self.label_logits(inputs))

    # ------------------------------------------------------------------------------------------

    def max_new_tokens_for(self, feat_lens: torch.Tensor, speech_lens: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) generation limit: ``ceil(tokens_per_second * seconds + extra_tokens)`` from the
        audio length, and with a CTC or transcript projector and ``speech_lens`` (B,) (its token
        counts, from :meth:`embed_speech`) at most ``ceil(tokens_per_ctc_token * N + extra_tokens)``."""
        seconds = feat_lens.double().cpu() / self.frames_per_second
        limit = torch.ceil(self.tokens_per_second * seconds + self.extra_tokens)
        if speech_lens is not None and self.has_ctc_draft and self.tokens_per_ctc_token is not None:
            heard = torch.ceil(self.tokens_per_ctc_token * speech_lens.double().cpu() + self.extra_tokens)
            limit = torch.minimum(limit, heard)
        return limit.long()

    def generation_inputs(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> LLMInputs:
        """Left-padded prompts with speech, ready for ``efin.decoding.llm_search`` (or speculative decoding)."""
        speech, lens = self.embed_speech(feats, feat_lens)
        return self.prompt.generation_inputs(self.llm.get_input_embeddings(), speech, lens)
