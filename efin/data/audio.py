"""Audio loading and log-mel features.

Audio is decoded with soundfile (torchaudio 2.11's ``load`` needs torchcodec + FFmpeg), mixed
to mono and resampled to :data:`SAMPLE_RATE`. Features are 80-bin log-mel at 100 frames/s; the
encoder applies global mean/variance normalisation itself (statistics from
:func:`feature_stats`), so features here stay un-normalised and augmentation can run on them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import soundfile
import torch
import torchaudio
from torch import nn

SAMPLE_RATE = 16000  # Hz, the rate every model in efin sees

# Added before the log so silence (exact zeros, padding) maps to a finite value (~ -13.8).
LOG_EPS = 1e-6


class AudioError(RuntimeError):
    """An audio file could not be decoded; the message names the file and the reason."""


@functools.lru_cache(maxsize=16)
def _resampler(orig_freq: int, new_freq: int) -> torchaudio.transforms.Resample:
    # Building the sinc kernel costs more than applying it to a few seconds of audio; a corpus
    # has one or two source rates, so cache the transform per (orig, new) pair.
    return torchaudio.transforms.Resample(orig_freq, new_freq)


def load_audio(
    path: str | os.PathLike,
    offset: float = 0.0,
    duration: float | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> torch.Tensor:
    """Decode a segment of an audio file.

    Args:
        path: any format libsndfile reads (FLAC, WAV, OGG, ...).
        offset: seconds from the start of the file.
        duration: seconds to read; None reads to the end of the file.
        sample_rate: Hz of the returned waveform (resampled when the file differs).

    Returns:
        (T,) float32 waveform in [-1, 1], mono (channels averaged), ``sample_rate`` Hz.

    Raises:
        AudioError: the file is missing or undecodable, or the segment is empty.
    """
    try:
        with soundfile.SoundFile(str(path)) as f:
            file_rate = f.samplerate
            start = int(round(offset * file_rate))
            if start > f.frames:
                raise ValueError(f"offset {offset:.3f} s is past the end of the file ({f.frames / file_rate:.3f} s)")
            f.seek(start)
            frames = -1 if duration is None else int(round(duration * file_rate))
            data = f.read(frames, dtype="float32", always_2d=True)  # (T, C)
    except (OSError, RuntimeError, ValueError, soundfile.LibsndfileError) as err:
        raise AudioError(f"cannot read audio {path} (offset={offset}, duration={duration}): {err}") from err
    if data.shape[0] == 0:
        raise AudioError(f"cannot read audio {path}: segment offset={offset} duration={duration} is empty")
    wave = torch.from_numpy(data).mean(dim=1)  # mono mix: averaging keeps the [-1, 1] range
    if file_rate != sample_rate:
        wave = _resampler(file_rate, sample_rate)(wave)
    return wave.contiguous()


class LogMel(nn.Module):
    """Log-mel filterbank features.

    Args:
        n_mels: mel bins (feature dimension F).
        sample_rate: Hz of the input waveform.
        win_ms: analysis window in ms (25 ms = 400 samples at 16 kHz; also the FFT size).
        hop_ms: frame shift in ms (10 ms -> 100 frames/s).

    ``forward(wave)``: (T,) or (..., T) waveform -> (frames, n_mels) or (..., frames, n_mels)
    natural-log mel power, ``frames = T // hop + 1`` (centred frames), 100 frames/s by default.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, win_ms: float = 25, hop_ms: float = 10):
        super().__init__()
        win = int(round(sample_rate * win_ms / 1000))
        self.hop_length = int(round(sample_rate * hop_ms / 1000))
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        # Constructor arguments: stored in stage artifacts so inference rebuilds the same features.
        self.config = dict(n_mels=n_mels, sample_rate=sample_rate, win_ms=win_ms, hop_ms=hop_ms)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=win, win_length=win, hop_length=self.hop_length, n_mels=n_mels, power=2.0
        )

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a waveform of ``num_samples`` samples."""
        return num_samples // self.hop_length + 1

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = self.mel(wave)  # (..., n_mels, frames)
        return torch.log(spec + LOG_EPS).transpose(-1, -2).contiguous()


class WhisperLogMel(nn.Module):
    """Whisper's log-mel features (what OpenAI's Whisper encoders were trained on).

    25 ms Hann window, 10 ms hop, Slaney mel filters up to 8 kHz, ``log10`` clamped to 8 below
    the utterance's maximum, then ``(x + 4) / 4``: the same numbers as ``transformers``'
    ``WhisperFeatureExtractor`` without its padding to 30 s (so the maximum is the utterance's).

    Args:
        n_mels: mel bins (80; 128 for large-v3 checkpoints).
        sample_rate: Hz of the input waveform (Whisper: 16 kHz).

    ``forward(wave)``: (T,) waveform -> (T // 160, n_mels) features at 100 frames/s.
    """

    n_fft = 400
    hop_length = 160

    def __init__(self, n_mels: int = 80, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        # Stored in artifacts; ``kind`` tells featurizer_from_config which class to rebuild.
        self.config = dict(kind="whisper", n_mels=n_mels, sample_rate=sample_rate)
        self.n_mels, self.sample_rate = n_mels, sample_rate
        filters = torchaudio.functional.melscale_fbanks(
            self.n_fft // 2 + 1, 0.0, 8000.0, n_mels, sample_rate, norm="slaney", mel_scale="slaney"
        )  # (freq bins, n_mels)
        self.register_buffer("filters", filters.T.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a waveform of ``num_samples`` samples."""
        return num_samples // self.hop_length

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        stft = torch.stft(wave, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2  # (freq, frames): the last centred frame dropped, as Whisper does
        log_mel = (self.filters @ power).clamp_min(1e-10).log10()  # (n_mels, frames)
        log_mel = torch.maximum(log_mel, log_mel.max() - 8.0)
        return ((log_mel + 4.0) / 4.0).T.contiguous()


FEATURIZERS = {"logmel": LogMel, "whisper": WhisperLogMel}


def featurizer_from_config(config: dict) -> LogMel | WhisperLogMel:
    """The featurizer a stored ``features`` config describes (``kind`` absent: :class:`LogMel`)."""
    config = dict(config)
    kind = config.pop("kind", "logmel")
    if kind not in FEATURIZERS:
        raise ValueError(f"unknown feature kind {kind!r}; one of {sorted(FEATURIZERS)}")
    return FEATURIZERS[kind](**config)


def feature_stats(feature_iter: Iterable[torch.Tensor], std_floor: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin mean and standard deviation over all frames of all feature matrices.

    Args:
        feature_iter: (T, F) feature matrices (e.g. log-mel of training utterances).
        std_floor: lower bound on the std, so a constant bin (e.g. above a band limit) does
            not divide by ~0 in the encoder's normalisation.

    Returns:
        mean (F,), std (F,), float32. Accumulated in float64: sums over ~10^7 frames lose
        digits in float32.
    """
    total = None
    total_sq = None
    count = 0
    for feats in feature_iter:
        x = feats.detach().reshape(-1, feats.shape[-1]).to(torch.float64)
        if total is None:
            total = torch.zeros(x.shape[1], dtype=torch.float64)
            total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += x.shape[0]
    if count == 0:
        raise ValueError("feature_stats: no frames given")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt().clamp_min(std_floor)
    return mean.float(), std.float()

