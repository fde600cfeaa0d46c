"""Audio decoding, log-mel features, feature statistics and augmentation on real files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from efin.data.audio import SAMPLE_RATE, AudioError, LogMel, feature_stats, load_audio
from efin.data.augment import FeatureAugment, WaveAugment


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_load_resamples_to_16k(tmp_path, rate):
    path = tmp_path / f"a{rate}.flac"
    soundfile.write(path, tone(2.0, rate, freq=300.0), rate)
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.shape[0] - 2 * SAMPLE_RATE) <= 2
    # the tone survives resampling: its spectrum peaks at 300 Hz
    spec = torch.fft.rfft(wave).abs()
    peak_hz = spec.argmax().item() * SAMPLE_RATE / wave.shape[0]
    assert abs(peak_hz - 300.0) < 2.0
    assert wave.abs().max() <= 1.0


def test_load_offset_duration_and_mono_mix(tmp_path):
    rate = 16000
    left = np.linspace(-0.5, 0.5, 3 * rate, dtype=np.float32)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "s.wav"
    soundfile.write(path, stereo, rate)
    wave = load_audio(path, offset=1.0, duration=0.5)
    assert wave.shape == (rate // 2,)
    expected = torch.from_numpy(left[rate : rate + rate // 2] / 2)  # mean of the two channels
    assert torch.allclose(wave, expected, atol=1e-4)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="bad.wav"):
        load_audio(bad)
    ok = tmp_path / "ok.wav"
    soundfile.write(ok, tone(1.0, 16000), 16000)
    with pytest.raises(AudioError, match="ok.wav"):
        load_audio(ok, offset=5.0)


def test_logmel_shape_and_frame_rate():
    mel = LogMel()
    assert mel.frames_per_second == 100
    rebuilt = LogMel(**mel.config)  # artifacts rebuild the featurizer from its config
    assert rebuilt.config == mel.config and rebuilt.hop_length == 160
    for seconds in (0.5, 1.0, 3.21):
        wave = torch.from_numpy(tone(seconds, SAMPLE_RATE))
        feats = mel(wave)
        assert feats.shape == (mel.num_frames(wave.shape[0]), 80)
        assert abs(feats.shape[0] - seconds * 100) <= 1
        assert torch.isfinite(feats).all()
    # silence maps to the log floor, not -inf
    assert torch.isfinite(mel(torch.zeros(1600))).all()
    # a 440 Hz tone puts its energy in a low mel bin
    energy = mel(torch.from_numpy(tone(1.0, SAMPLE_RATE, freq=440.0))).mean(0)
    assert energy.argmax().item() < 20


def test_feature_stats_matches_torch():
    torch.manual_seed(0)
    mats = [torch.randn(int(n), 5) * torch.arange(1, 6) + 3 for n in (50, 70, 9)]
    mean, std = feature_stats(iter(mats))
    allx = torch.cat(mats)
    assert mean.shape == (5,) and std.shape == (5,)
    assert torch.allclose(mean, allx.mean(0), atol=1e-4)
    assert torch.allclose(std, allx.std(0, unbiased=False), atol=1e-4)
    _, std_const = feature_stats([torch.ones(10, 3)])
    assert torch.all(std_const == 1e-3)  # floored
    with pytest.raises(ValueError):
        feature_stats([])


def test_wave_augment_speed_and_noise_are_seeded():
    wave = torch.from_numpy(tone(1.0, SAMPLE_RATE))
    aug = WaveAugment(speed_factors=[0.9, 1.1], noise_snr_db=[5, 5], noise_prob=1.0)
    a = aug(wave, torch.Generator().manual_seed(3))
    b = aug(wave, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    lengths = {aug(wave, torch.Generator().manual_seed(s)).shape[0] for s in range(12)}
    expected = [SAMPLE_RATE / 1.1, SAMPLE_RATE / 0.9]  # duration scales by 1 / factor
    assert len(lengths) == 2
    assert all(abs(n - e) <= 2 for n, e in zip(sorted(lengths), expected))
    # noise only at 5 dB SNR: residual power is signal power / 10^0.5
    noisy = WaveAugment(speed_factors=None, noise_snr_db=[5, 5], noise_prob=1.0, noise_types=["white"])(
        wave, torch.Generator().manual_seed(0)
    )
    snr = 10 * torch.log10(wave.pow(2).mean() / (noisy - wave).pow(2).mean())
    assert abs(snr.item() - 5.0) < 0.5
    off = WaveAugment(speed_factors=None, noise_snr_db=None)
    assert not off.enabled and torch.equal(off(wave), wave)


def test_feature_augment_masks_with_mean():
    torch.manual_seed(0)
    feats = torch.randn(400, 80)
    out = FeatureAugment(freq_masks=2, freq_mask_width=20, time_masks=2, time_mask_width=30)(feats)
    assert out.shape == feats.shape
    changed = out != feats
    assert changed.any()
    assert torch.allclose(out[changed], torch.full_like(out[changed], feats.mean().item()))
    # time masks stay within time_mask_max_ratio of a short utterance
    short = torch.randn(20, 80) + 5
    out = FeatureAugment(freq_masks=0, time_masks=1, time_mask_width=100, time_mask_max_ratio=0.2)(short)
    masked_frames = (out != short).all(dim=1).sum().item()
    assert masked_frames <= 4


def test_frequency_warp_moves_spectral_peaks_by_the_factor():
    feats = torch.zeros(4, 80)
    feats[:, 40] = 1.0  # a "formant" at bin 40
    augment = FeatureAugment(freq_masks=0, time_masks=0, warp_range=(0.9, 1.1))
    assert torch.equal(augment.warp(feats, 1.0), feats)
    assert int(augment.warp(feats, 1.1).argmax(1)[0]) == 44  # shorter vocal tract: formants move up
    assert int(augment.warp(feats, 0.9).argmax(1)[0]) == 36
    out = augment(torch.randn(30, 80))
    assert out.shape == (30, 80) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="warp_range"):
        FeatureAugment(warp_range=(1.1, 0.9))
