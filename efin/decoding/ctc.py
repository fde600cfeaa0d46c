"""CTC decoding: greedy (best path), and lexicon beam search with a word n-gram LM."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from efin.data.lm_text import lm_sentences
from efin.decoding.ngram import kneser_ney_arpa
from efin.models.protocols import CharacterVocabulary
from efin.text import normalize
from efin.tokenizer import CTCVocab, vocab_from_state

log = logging.getLogger(__name__)


def load_ctc_head(state: dict, encoder_dim: int, device: str = "cpu") -> tuple[CTCVocab, torch.nn.Linear]:
    """The encoder stage's CTC head as artifacts store it (``first_pass["ctc_head"]``: its
    vocabulary's state and the linear layer's weights) -> (vocabulary, head on ``device``);
    the head maps encoder frames (B, T, encoder_dim) to logits (B, T, vocab.size)."""
    vocab = vocab_from_state(state["vocab"])
    head = torch.nn.Linear(encoder_dim, vocab.size)
    head.load_state_dict(state["state_dict"], strict=True)
    return vocab, head.to(device)


def ctc_greedy(log_probs: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks (id 0). (B, T', V) -> B id lists."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for row, n in zip(best, lens.tolist()):
        ids = torch.unique_consecutive(row[:n]).tolist()
        out.append([i for i in ids if i != 0])
    return out


class CTCLexiconBeamSearch:
    """CTC beam search constrained to a word lexicon, with a word n-gram LM (shallow fusion).

    Wraps ``torchaudio.models.decoder.ctc_decoder`` (flashlight-text's C++ decoder with KenLM).
    Hypotheses are scored ``log P_ctc + lm_weight * log P_lm + word_score * words``; every output
    word comes from ``words``.

    Args:
        symbols: the CTC vocabulary's symbols by id; id 0 is blank, ``" "`` the word separator
            (a character vocabulary, :class:`efin.tokenizer.CharVocab`).
        words: lexicon, e.g. every word of the training transcripts.
        arpa: word LM as ARPA text (:func:`efin.decoding.ngram.kneser_ney_arpa`); None = lexicon only.
        beam_size: hypotheses kept per frame.
        lm_weight: weight of the LM log-probability (natural log units).
        word_score: bonus per emitted word (counters the LM's preference for short outputs).
        nbest: hypotheses :meth:`nbest` returns per utterance (for second-pass rescoring).
    """

    SEPARATOR = "|"  # flashlight's word-boundary token; our vocabulary's space maps to it

    def __init__(
        self,
        symbols: list[str],
        words: list[str],
        arpa: str | None = None,
        beam_size: int = 50,
        lm_weight: float = 1.0,
        word_score: float = 0.0,
        nbest: int = 1,
    ):
        from torchaudio.models.decoder import ctc_decoder

        if " " not in symbols:
            raise ValueError("lexicon beam search needs a character vocabulary with a space symbol")
        tokens = [self.SEPARATOR if s == " " else s for s in symbols]
        letters = set(symbols[1:]) - {" "}
        words = sorted({w for w in words if w and set(w) <= letters})
        if not words:
            raise ValueError("the lexicon has no word spelled with the vocabulary's characters")
        self.words = words  # the lexicon used: every word it can output
        # flashlight reads the lexicon and LM from files; they are only needed while it loads them.
        with tempfile.TemporaryDirectory(prefix="efin-ctc-lm-") as tmp:
            lexicon = Path(tmp) / "lexicon.txt"
            lexicon.write_text("".join(f"{w}\t{' '.join(w)} {self.SEPARATOR}\n" for w in words))
            lm = None
            if arpa is not None:
                lm = Path(tmp) / "lm.arpa"
                lm.write_text(arpa)
            self.decoder = ctc_decoder(
                lexicon=str(lexicon),
                tokens=tokens,
                lm=None if lm is None else str(lm),
                beam_size=beam_size,
                lm_weight=lm_weight,
                word_score=word_score,
                nbest=nbest,
                blank_token=symbols[0],
                sil_token=self.SEPARATOR,
            )

    def __call__(self, log_probs: torch.Tensor, lens: torch.Tensor) -> list[str]:
        """(B, T', V) CTC log-probabilities, (B,) valid frames -> B transcripts (words joined by spaces)."""
        return [hyps[0][0] if hyps else "" for hyps in self.nbest(log_probs, lens)]

    def nbest(self, log_probs: torch.Tensor, lens: torch.Tensor) -> list[list[tuple[str, float]]]:
        """Per utterance, up to ``nbest`` distinct (transcript, score) pairs, best first; the
        score is ``log P_ctc + lm_weight * log P_lm + word_score * words`` (natural log)."""
        results = self.decoder(log_probs.detach().float().cpu().contiguous(), lens.cpu().to(torch.int32))
        out = []
        for hyps in results:
            distinct: dict[str, float] = {}
            for h in hyps:  # different alignments of the same words are separate hypotheses
                distinct.setdefault(" ".join(w for w in h.words if w), float(h.score))
            out.append(list(distinct.items()))
        return out


def build_ctc_lm(
    texts: list[str], order: int = 3, beam_size: int = 50, lm_weight: float = 1.0, word_score: float = 0.0,
    sources: list[str] | None = None, min_count: int = 1,
) -> dict:
    """Word LM + lexicon from sentences (the training transcripts, or the text of
    :func:`efin.data.lm_text.lm_sentences`), with its decoding settings: ``{"arpa": ARPA text,
    "words": sorted lexicon, "order", "min_count" (n-grams of order >= 2 seen fewer times are
    pruned, :func:`~efin.decoding.ngram.kneser_ney_arpa`), "sources": what the text was,
    "decode": {beam_size, lm_weight, word_score}}``."""
    texts = [normalize(t) for t in texts]
    return {
        "arpa": kneser_ney_arpa(texts, order, min_count),
        "words": sorted({w for t in texts for w in t.split()}),
        "order": order,
        "min_count": min_count,
        "sources": list(sources or ["transcripts"]),
        "decode": {"beam_size": beam_size, "lm_weight": lm_weight, "word_score": word_score},
    }


def ctc_lm_from_sources(stored: dict | None, sources: list[str], min_count: int | None = None) -> dict:
    """A word LM (a ``ctc_lm`` entry) built for this decoding from ``sources``
    (:func:`efin.data.lm_text.lm_sentences`) instead of the stored one, with the stored one's order,
    pruning (``min_count`` None) and decode settings (if any)."""
    stored = stored or {"order": 3, "decode": {}}
    min_count = stored.get("min_count", 1) if min_count is None else min_count
    ctc_lm = build_ctc_lm(lm_sentences(sources), order=stored["order"], sources=list(sources), min_count=min_count,
                          **stored["decode"])
    log.info("word LM rebuilt from %s: %d words in its lexicon", ", ".join(sources), len(ctc_lm["words"]))
    return ctc_lm


def lm_decoder(vocab, ctc_lm: dict, **overrides) -> CTCLexiconBeamSearch:
    """Lexicon beam search with a stored ``ctc_lm`` entry; ``overrides`` replace its decode settings."""
    if not isinstance(vocab, CharacterVocabulary):
        raise ValueError("LM decoding needs the character CTC vocabulary (stage.module.vocab=char)")
    settings = {**ctc_lm["decode"], **{k: v for k, v in overrides.items() if v is not None}}
    return CTCLexiconBeamSearch(vocab.symbols, ctc_lm["words"], ctc_lm["arpa"], **settings)
