"""Projectors: map encoder frames to the LLM's embedding space.

All take ``forward(x (B, T, D), lens (B,)) -> (y (B, N, H), lens (B,))``. Frames past each
item's length are zeroed first, so an utterance gives the same audio tokens alone or in a padded
batch (batched and single-utterance decoding agree).

* :class:`StackingMLPProjector`, :class:`ConvProjector`: k frames -> one audio token
  (N = ceil(T / k)), trained only through the LLM's loss.
* :class:`TokenCTCProjector`: classifies audio tokens into the LLM's own vocabulary with CTC and
  hands the LLM the posterior-weighted token embeddings of its non-blank positions (LegoSLM
  style), so it aligns to the frozen LLM without running the LLM at all.
* :class:`TranscriptProjector`: hands the LLM the encoder stage's character CTC transcript as
  text (its own token embeddings); nothing to align, the LLM learns to correct it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from efin.models.weights import same_weights
from efin.tokenizer import CharVocab


def _mask_padding(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero frames ``t >= lens[b]``; x (B, T, D)."""
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
    return x * valid.unsqueeze(-1).to(x.dtype)


def _stack_frames(x: torch.Tensor, lens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate k consecutive frames: x (B, T, D), lens (B,) -> (B, ceil(T/k), k*D), ceil(lens/k).
    Padding frames are zeroed first and the tail is zero-filled to a multiple of k."""
    b, t, d = x.shape
    x = F.pad(_mask_padding(x, lens), (0, 0, 0, (-t) % k))
    return x.reshape(b, -1, k * d), torch.div(lens + k - 1, k, rounding_mode="floor")


def _check_input(x: torch.Tensor, input_dim: int) -> None:
    if x.ndim != 3 or x.shape[-1] != input_dim:
        raise ValueError(f"projector expects (B, T, {input_dim}) encoder frames, got {tuple(x.shape)}")


class StackingMLPProjector(nn.Module):
    """Concatenate ``stack`` consecutive frames, then Linear -> GELU -> Linear.

    Args:
        input_dim: encoder width D (``encoder.output_dim``).
        output_dim: LLM embedding width H (``llm.config.hidden_size``).
        stack: frames per audio token k; the LLM sees ``encoder_frame_rate / k`` tokens per second.
        hidden_dim: width of the hidden layer.
    """

    def __init__(self, input_dim: int, output_dim: int, stack: int = 2, hidden_dim: int = 1024):
        super().__init__()
        if stack < 1:
            raise ValueError(f"stack must be >= 1, got {stack}")
        self.input_dim, self.output_dim, self.stack = input_dim, output_dim, stack
        self.net = nn.Sequential(
            nn.Linear(input_dim * stack, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim)
        )

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) encoder frames, lens (B,) valid frames -> (B, ceil(T/k), H), lens ceil(lens/k)."""
        _check_input(x, self.input_dim)
        x, lens = _stack_frames(x, lens, self.stack)
        return self.net(x), lens

    def audio_tokens_per_second(self, encoder_frame_rate: float) -> float:
        """Audio tokens per second of speech for an encoder emitting ``encoder_frame_rate`` frames/s."""
        return encoder_frame_rate / self.stack


class ConvProjector(nn.Module):
    """Strided Conv1d (stride k) -> GELU -> Linear.

    Args:
        input_dim: encoder width D.
        output_dim: LLM embedding width H.
        stride: frames per audio token k.
        kernel_size: frames each audio token sees (>= stride; larger overlaps neighbours).
        hidden_dim: conv channels.
    """

    def __init__(
        self, input_dim: int, output_dim: int, stride: int = 2, kernel_size: int | None = None, hidden_dim: int = 1024
    ):
        super().__init__()
        kernel_size = stride if kernel_size is None else kernel_size
        if stride < 1 or kernel_size < stride:
            raise ValueError(f"need stride >= 1 and kernel_size >= stride, got {stride=} {kernel_size=}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.stride, self.kernel_size = stride, kernel_size
        self.conv = nn.Conv1d(input_dim, hidden_dim, kernel_size, stride=stride)
        self.out = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), lens (B,) -> (B, ceil(T/k), H), lens ceil(lens/k)."""
        _check_input(x, self.input_dim)
        t = x.shape[1]
        k = self.stride
        n_out = -(-t // k)
        left = (self.kernel_size - k) // 2  # centre the receptive field on its k frames
        right = (n_out - 1) * k + self.kernel_size - t - left
        x = F.pad(_mask_padding(x, lens).transpose(1, 2), (left, right))
        y = self.out(F.gelu(self.conv(x)).transpose(1, 2))
        return y, torch.div(lens + k - 1, k, rounding_mode="floor")

    def audio_tokens_per_second(self, encoder_frame_rate: float) -> float:
        """Audio tokens per second of speech for an encoder emitting ``encoder_frame_rate`` frames/s."""
        return encoder_frame_rate / self.stride


class TokenCTCProjector(nn.Module):
    """Encoder frames -> posteriors over the LLM's tokens (CTC) -> soft token embeddings.

    k stacked frames go through Linear -> GELU -> a residual Conv1d over neighbouring audio tokens
    (each sees ``kernel_size`` of them, enough to span a word) -> Linear to the LLM width. Logits
    are scaled cosine similarities with ``[blank; token_embeddings]``: the LLM's own (frozen)
    input embeddings of ``vocab_size`` token ids, set from the training transcripts by
    :meth:`set_vocabulary`. Trained with :meth:`ctc_loss` against the transcript's LLM tokens.

    What the LLM sees: per audio token, ``softmax(logits / temperature) @ [blank; embeddings]``,
    kept only where the best class is not blank and differs from the previous position (the CTC
    collapse), so N is about the number of transcript tokens (2.7/s on the default corpus
    instead of 6.25/s) and, once aligned, each input is close to a real token embedding the LLM
    can read as text.

    Args:
        input_dim: encoder width D.
        output_dim: LLM embedding width H.
        vocab_size: token ids the CTC head scores (the blank is one more class).
        stack: frames per audio token k (25 Hz encoder / 4 = 6.25 CTC positions/s).
        hidden_dim: width of the hidden layers.
        kernel_size: audio tokens each convolution output sees (odd).
        temperature: softmax temperature of the soft embeddings (lower = closer to one token).
    """

    def __init__(
        self, input_dim: int, output_dim: int, vocab_size: int = 8192, stack: int = 4, hidden_dim: int = 768,
        kernel_size: int = 5, temperature: float = 1.0,
    ):
        super().__init__()
        if stack < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"need stack >= 1 and an odd kernel_size, got {stack=} {kernel_size=}")
        self.input_dim, self.output_dim, self.stack, self.temperature = input_dim, output_dim, stack, temperature
        self.inp = nn.Linear(input_dim * stack, hidden_dim)
        self.conv = nn.Conv1d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2)
        self.out = nn.Linear(hidden_dim, output_dim)
        self.blank = nn.Parameter(torch.randn(output_dim) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(2.3))  # cosine logits x e^2.3 = 10
        #: (S,) full-vocabulary id of each scored token (CTC class i + 1).
        self.register_buffer("vocab_ids", torch.zeros(vocab_size, dtype=torch.long))
        #: (S, H) the LLM's input embeddings of ``vocab_ids`` (frozen copy).
        self.register_buffer("token_embeddings", torch.zeros(vocab_size, output_dim))
        self.register_buffer("full_to_class", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module._index_vocabulary())

    def set_vocabulary(self, vocab_ids: torch.Tensor, input_embeddings: torch.Tensor) -> None:
        """Score ``vocab_ids`` (S,) with rows of the LLM's ``input_embeddings`` (V, H) weight."""
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).to(self.vocab_ids.device)
        if vocab_ids.shape != self.vocab_ids.shape:
            raise ValueError(f"expected {self.vocab_ids.numel()} vocab ids, got {vocab_ids.numel()}")
        if input_embeddings.shape[1] != self.output_dim:
            raise ValueError(f"embeddings are {input_embeddings.shape[1]} wide, projector output_dim={self.output_dim}")
        self.vocab_ids.copy_(vocab_ids)
        self.token_embeddings.copy_(input_embeddings.detach()[vocab_ids.to(input_embeddings.device)])
        self._index_vocabulary()

    def _index_vocabulary(self) -> None:
        ids = self.vocab_ids
        table = torch.zeros(int(ids.max()) + 1 if ids.numel() else 0, dtype=torch.long, device=ids.device)
        table[ids] = torch.arange(1, ids.numel() + 1, device=ids.device)
        self.full_to_class = table

    def _classes(self) -> torch.Tensor:
        """(1 + S, H): the blank vector, then the token embeddings (CTC class order)."""
        return torch.cat([self.blank[None], self.token_embeddings], 0)

    # ---- CTC over the LLM's tokens ------------------------------------------------------
    def token_logits(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), lens (B,) -> logits (B, ceil(T/k), 1 + S) with class 0 = blank, lens (B,)."""
        _check_input(x, self.input_dim)
        x, lens = _stack_frames(x, lens, self.stack)
        h = F.gelu(self.inp(x))
        h = _mask_padding(h, lens)  # the convolution must not see padding
        h = h + F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        logits = F.normalize(self.out(h), dim=-1) @ F.normalize(self._classes(), dim=-1).T
        return self.log_scale.exp() * logits, lens

    def ctc_loss(self, logits: torch.Tensor, lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss (nats per target token) of ``targets`` (full-vocabulary ids per item;
        ids outside the vocabulary are dropped) under ``logits`` from :meth:`token_logits`."""
        table = self.full_to_class
        classes = []
        for ids in targets:
            ids = torch.as_tensor([i for i in ids if i < table.numel()], dtype=torch.long, device=table.device)
            mapped = table[ids]
            classes.append(mapped[mapped > 0])
        target_lens = torch.tensor([len(c) for c in classes], device=logits.device)
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (N, B, C)
        return F.ctc_loss(
            log_probs, torch.cat(classes), lens, target_lens, blank=0, reduction="mean", zero_infinity=True
        )

    def greedy_tokens(self, logits: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
        """Collapsed best path: per item, the full-vocabulary token ids (no LLM involved)."""
        keep, best = self._collapse(logits, lens)
        return [self.vocab_ids[best[b][keep[b]] - 1].tolist() for b in range(best.shape[0])]

    def _collapse(self, logits: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best = logits.argmax(-1)  # (B, N)
        valid = torch.arange(best.shape[1], device=best.device)[None, :] < lens[:, None]
        changed = torch.ones_like(valid)
        changed[:, 1:] = best[:, 1:] != best[:, :-1]
        return (best != 0) & valid & changed, best

    # ---- what the LLM reads --------------------------------------------------------------
    def embed(self, logits: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft token embeddings of the collapsed non-blank positions: (B, N', H), lens (B,).
        An item with no token gets one (its most token-like position) so the LLM has input."""
        keep, _ = self._collapse(logits, lens)
        empty = keep.sum(1) == 0
        if empty.any():  # pick the position with the least blank probability
            blank = logits[..., 0] - logits[..., 1:].max(-1).values
            blank = blank.masked_fill(
                torch.arange(keep.shape[1], device=keep.device)[None] >= lens[:, None], float("inf")
            )
            first = F.one_hot(blank.argmin(1), keep.shape[1]).bool()
            keep = keep | (first & empty[:, None])
        soft = (logits / self.temperature).softmax(-1) @ self._classes()  # (B, N, H)
        counts = keep.sum(1)
        out = soft.new_zeros(soft.shape[0], int(counts.max()), soft.shape[2])
        slots = torch.arange(out.shape[1], device=keep.device)[None, :] < counts[:, None]
        out[slots] = soft[keep]
        return out, counts

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), lens (B,) -> soft token embeddings (B, N', H), lens (B,); see :meth:`embed`."""
        return self.embed(*self.token_logits(x, lens))

    def audio_tokens_per_second(self, encoder_frame_rate: float) -> float:
        """CTC positions per second (before blanks are dropped; the LLM sees fewer)."""
        return encoder_frame_rate / self.stack


TRANSCRIPT_CTC_DECODINGS = ("greedy", "lm")  # how a TranscriptProjector reads the CTC


class TranscriptProjector(nn.Module):
    """Hands the LLM the encoder stage's own character CTC transcript, as text.

    The encoder's CTC head (frozen, copied from the encoder artifact) gives a greedy transcript
    per utterance ("butteny his a branch of byoulagy"); it is tokenised with the LLM's tokenizer
    exactly as training transcripts are, and the LLM reads its own input embeddings of those
    tokens. No weights are trained here: the LLM (LoRA) learns to correct what the CTC wrote.
    Unlike :class:`TokenCTCProjector`, whose 8,192-way token CTC drops most rare tokens on a
    small corpus (README Results), the character CTC loses little of what was said (dev CER 13 %).

    Args:
        input_dim: encoder width D.
        output_dim: LLM embedding width H.
        symbols: the CTC vocabulary's symbols, class 0 = blank (the encoder artifact's
            ``ctc_head`` vocabulary; filled in by the stage that starts from it).
        ctc_decoding: how the transcript is read off the CTC: ``greedy`` (best path) or ``lm``
            (lexicon beam search with the encoder stage's word LM, the best CTC decoding: real
            words, fewer of them wrong; :meth:`set_lm_decoder` gives it the search).

    Call :meth:`attach` with the LLM's tokenizer and input embeddings before :meth:`forward`
    (:func:`efin.handoff.assemble` does, and with ``lm`` attaches the word LM search too).
    """

    CTC_DECODINGS = TRANSCRIPT_CTC_DECODINGS

    def __init__(self, input_dim: int, output_dim: int, symbols: list[str] | None = None,
                 ctc_decoding: str = "greedy"):
        super().__init__()
        if ctc_decoding not in self.CTC_DECODINGS:
            raise ValueError(f"projector.ctc_decoding={ctc_decoding!r}: expected one of {self.CTC_DECODINGS}")
        self.input_dim, self.output_dim = input_dim, output_dim
        self.ctc_decoding = ctc_decoding
        self._lm_decoder = None  # (log-probs (B, T, V), lens (B,)) -> B texts; set_lm_decoder
        self.vocab = CharVocab(symbols)
        self.symbols = self.vocab.symbols
        self.head = nn.Linear(input_dim, self.vocab.size).requires_grad_(False)
        self._tokenizer = None
        self._embeddings: list[nn.Module] = []  # a list, so the LLM's table is not registered (nor saved) here
        self._last_read: tuple | None = None  # (x, lens, ctc_decoding, token ids) of the last token_ids call
        self._reads_from: TranscriptProjector | None = None  # read_from: another projector reads for this one

    def set_ctc_head(self, ctc_head: dict) -> None:
        """Take the encoder stage's CTC head (``{"vocab": state, "state_dict": ...}``, as artifacts store it)."""
        if ctc_head["vocab"].get("kind") != "char" or ctc_head["vocab"]["symbols"] != self.symbols:
            raise ValueError(
                f"projector=transcript needs the encoder's character CTC with symbols {self.symbols}; the artifact's "
                f"CTC vocabulary is {ctc_head['vocab'].get('kind')!r} {ctc_head['vocab'].get('symbols')}"
            )
        self.head.load_state_dict(ctc_head["state_dict"], strict=True)

    def attach(self, tokenizer, input_embeddings: nn.Module) -> None:
        """The LLM's tokenizer and input embedding table (not stored with the projector)."""
        self._tokenizer, self._embeddings = tokenizer, [input_embeddings]

    def set_lm_decoder(self, decoder) -> None:
        """The lexicon beam search ``ctc_decoding=lm`` reads with: a callable (CTC log-probabilities
        (B, T, V), lens (B,)) -> B texts (:class:`efin.decoding.ctc.CTCLexiconBeamSearch`)."""
        self._lm_decoder = decoder
        self._last_read = None

    def read_from(self, other: TranscriptProjector) -> bool:
        """Read whatever ``other`` reads (a speculative target's projector, for its draft's): its
        decoding mode and its last read, so the draft is handed the target's transcript without a
        second word-LM search. Only with the same CTC head (the same text from the same encoder
        output) and, the caller's check, the same tokenizer; returns whether it took effect."""
        same = other.symbols == self.symbols and same_weights(self.head, other.head)
        if same:
            self._reads_from, self.ctc_decoding, self._last_read = other, other.ctc_decoding, None
        return same

    def transcripts(self, x: torch.Tensor, lens: torch.Tensor) -> list[str]:
        """x (B, T, D), lens (B,) -> per item the CTC's transcript: greedy (repeats merged, blanks
        dropped), or with ``ctc_decoding=lm`` the word LM beam search's best."""
        _check_input(x, self.input_dim)
        if self.ctc_decoding == "lm":
            if self._lm_decoder is None:
                raise RuntimeError("projector.ctc_decoding=lm: TranscriptProjector.set_lm_decoder(...) was not called")
            return self._lm_decoder(self.head(x).float().log_softmax(-1), lens)
        best = self.head(x).argmax(-1).cpu()
        return [self.vocab.decode(torch.unique_consecutive(row[: int(n)]).tolist()) for row, n in zip(best, lens)]

    def token_ids(self, x: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
        """Per item, the LLM token ids of :meth:`transcripts` (at least one: an empty transcript reads as " ").

        Called again with the very same tensors (the prompt, then the transcript drafter of
        speculative decoding), it returns the ids it read before instead of searching again."""
        if self._reads_from is not None:
            return self._reads_from.token_ids(x, lens)
        if self._tokenizer is None:
            raise RuntimeError("TranscriptProjector.attach(tokenizer, input_embeddings) was not called")
        last = self._last_read
        if last is not None and last[0] is x and last[1] is lens and last[2] == self.ctc_decoding:
            return last[3]
        texts = self.transcripts(x, lens)
        ids = [self._tokenizer(text or " ", add_special_tokens=False)["input_ids"] for text in texts]
        # kept only without autograd, so no graph outlives its batch
        self._last_read = None if x.requires_grad else (x, lens, self.ctc_decoding, ids)
        return ids

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), lens (B,) -> the LLM's embeddings of the transcripts' tokens (B, N, H), zero-padded; N (B,)."""
        ids = self.token_ids(x, lens)
        counts = torch.tensor([len(i) for i in ids], device=x.device)
        table = self._embeddings[0]
        padded = torch.zeros(len(ids), int(counts.max()), dtype=torch.long, device=table.weight.device)
        for b, row in enumerate(ids):
            padded[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < counts.to(padded.device)[:, None]
        return table(padded) * valid[..., None], counts

    def audio_tokens_per_second(self, encoder_frame_rate: float) -> float:
        """CTC frames per second, the most the transcript could hold (it holds about the text's tokens/s)."""
        return encoder_frame_rate
