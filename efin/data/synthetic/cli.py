"""Command line of the synthetic corpus: ``python -m efin.data.synthetic --root DIR [options]``
generates it ahead of training and prints each split's size."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from efin.data.synthetic.corpus import (
    DEFAULT_ACCENTS,
    DEFAULT_TEST_VARIANTS,
    DEFAULT_TEST_VOICES,
    DEFAULT_VARIANTS,
    TEXT_SOURCES,
    ensure_synthetic_corpus,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description="Generate the built-in synthetic speech corpus.")
    parser.add_argument("--root", required=True, help="corpus directory")
    parser.add_argument("--num-train", type=int, default=12000)
    parser.add_argument("--num-dev", type=int, default=300)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--num-test-voices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sample-rate", type=int, default=16000, help="Hz of the written audio")
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-words", type=int, default=14)
    parser.add_argument("--vocab-size", type=int, default=0, help="most frequent words allowed (0: any)")
    parser.add_argument("--text-source", choices=TEXT_SOURCES, default="natural",
                        help="markov: Markov-chain pseudo-English; natural: real English sentences")  # fmt: skip
    parser.add_argument("--accents", nargs="+", default=list(DEFAULT_ACCENTS), help="eSpeak language voices")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="eSpeak voice variants")
    parser.add_argument("--test-voices", nargs="+", default=list(DEFAULT_TEST_VOICES),
                        help="held out for test: 'accent' or 'accent+variant'")  # fmt: skip
    parser.add_argument("--test-variants", nargs="+", default=list(DEFAULT_TEST_VARIANTS),
                        help="unseen variants that speak test_voices with the training accents")  # fmt: skip
    parser.add_argument("--num-workers", type=int, default=1, help="rendering processes (output is identical)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    paths = ensure_synthetic_corpus(
        args.root,
        num_train=args.num_train,
        num_dev=args.num_dev,
        num_test=args.num_test,
        num_test_voices=args.num_test_voices,
        seed=args.seed,
        sample_rate=args.sample_rate,
        min_words=args.min_words,
        max_words=args.max_words,
        vocab_size=args.vocab_size or None,
        text_source=args.text_source,
        accents=args.accents,
        variants=args.variants,
        test_voices=args.test_voices,
        test_variants=args.test_variants,
        num_workers=args.num_workers,
    )
    stats = json.loads((Path(args.root) / "corpus.json").read_text())["stats"]
    for split, path in paths.items():
        s = stats["splits"][split]
        print(f"{split:11s} {path}  {s['utterances']} utts  {s['hours']:.2f} h  {len(s['voices'])} voices")
    print(
        f"distinct words: {stats['distinct_words']}  total: {stats['hours']:.2f} h  ({time.perf_counter() - t0:.1f} s)"
    )
    return paths
