"""Training-time augmentation: on the waveform (speed, noise) and on features (SpecAugment).

Both run inside DataLoader workers (called from ``SpeechDataset.__getitem__``). Without an
explicit ``generator`` they draw from the worker's global torch RNG, which PyTorch seeds per
worker from the main process' seed, so a seeded run (``seed_everything``) augments the same
way again for the same number of workers. Validation and test data are never augmented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchaudio

from efin.data.audio import SAMPLE_RATE


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def pink_noise(num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_samples,) pink (1/f power) noise with unit RMS, shaped from white noise in the FFT domain."""
    white = torch.randn(num_samples, generator=generator)
    spec = torch.fft.rfft(white)
    freqs = torch.arange(spec.shape[0], dtype=torch.float32)
    spec = spec / freqs.clamp_min(1.0).sqrt()  # amplitude ~ 1/sqrt(f) -> power ~ 1/f
    pink = torch.fft.irfft(spec, n=num_samples)
    return pink / pink.pow(2).mean().sqrt().clamp_min(1e-8)


class WaveAugment:
    """Speed perturbation and additive noise on a waveform.

    Args:
        speed_factors: playback-speed factors drawn uniformly per utterance (e.g. [0.9, 1.0,
            1.1], the Kaldi recipe); None disables. A factor f changes the duration by 1/f
            (the sampler batches by manifest durations, so batches may run ~10% over).
        noise_snr_db: [low, high] signal-to-noise ratio in dB, drawn uniformly; None disables.
            Lower is noisier.
        noise_prob: probability that an utterance gets noise at all (clean audio stays in the mix).
        noise_types: noise colours to draw from: "white" and/or "pink".
        sample_rate: Hz of the waveforms passed in.

    ``__call__(wave (T,), generator=None) -> (T',)`` float32, T' ~ T / factor.
    """

    def __init__(
        self,
        speed_factors: Sequence[float] | None = (0.9, 1.0, 1.1),
        noise_snr_db: Sequence[float] | None = (10.0, 30.0),
        noise_prob: float = 0.5,
        noise_types: Sequence[str] = ("white", "pink"),
        sample_rate: int = SAMPLE_RATE,
    ):
        self.speed_factors = [float(f) for f in speed_factors] if speed_factors else None
        if self.speed_factors and any(f <= 0 for f in self.speed_factors):
            raise ValueError(f"speed_factors must be positive, got {self.speed_factors}")
        if noise_snr_db is not None:
            if len(noise_snr_db) != 2 or noise_snr_db[0] > noise_snr_db[1]:
                raise ValueError(f"noise_snr_db must be [low, high] in dB, got {list(noise_snr_db)}")
            noise_snr_db = (float(noise_snr_db[0]), float(noise_snr_db[1]))
        self.noise_snr_db = noise_snr_db
        self.noise_prob = float(noise_prob)
        unknown = set(noise_types) - {"white", "pink"}
        if unknown or not noise_types:
            raise ValueError(f"noise_types must be a non-empty subset of ['white', 'pink'], got {list(noise_types)}")
        self.noise_types = list(noise_types)
        self.sample_rate = sample_rate
        # torchaudio.transforms.SpeedPerturbation draws its factor from the global RNG; we draw
        # it ourselves (seedable) and call the same underlying function.
        self._add_noise = torchaudio.transforms.AddNoise()

    @property
    def enabled(self) -> bool:
        return bool(self.speed_factors) or self.noise_snr_db is not None

    def __call__(self, wave: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.speed_factors:
            i = int(torch.randint(len(self.speed_factors), (), generator=generator))
            factor = self.speed_factors[i]
            if factor != 1.0:
                wave, _ = torchaudio.functional.speed(wave.unsqueeze(0), self.sample_rate, factor)
                wave = wave.squeeze(0)
        if self.noise_snr_db is not None and torch.rand((), generator=generator).item() < self.noise_prob:
            kind = self.noise_types[int(torch.randint(len(self.noise_types), (), generator=generator))]
            n = wave.shape[-1]
            noise = torch.randn(n, generator=generator) if kind == "white" else pink_noise(n, generator)
            snr = torch.tensor(_uniform(*self.noise_snr_db, generator))
            if wave.pow(2).sum() > 0:  # add_noise scales by signal energy; digital silence stays silent
                wave = self._add_noise(wave, noise, snr).clamp(-1.0, 1.0)
        return wave.contiguous()

    def __repr__(self) -> str:
        return (
            f"WaveAugment(speed_factors={self.speed_factors}, noise_snr_db={self.noise_snr_db}, "
            f"noise_prob={self.noise_prob}, noise_types={self.noise_types})"
        )


class FeatureAugment:
    """SpecAugment (Park et al. 2019) on log-mel features: frequency and time masks, and an
    optional frequency warp (VTLP-style, Jaitly & Hinton 2013) that imitates other vocal tracts.

    Args:
        warp_range: ``(low, high)``: each utterance's mel axis is stretched by a factor drawn
            uniformly from it (>1 moves formants up, as a shorter vocal tract does); None = off.
        freq_masks: number of frequency masks.
        freq_mask_width: maximum width of each frequency mask, in mel bins.
        time_masks: number of time masks.
        time_mask_width: maximum width of each time mask, in frames (10 ms each).
        time_mask_max_ratio: a time mask never covers more than this fraction of the utterance
            (protects short utterances).

    Masked cells get the utterance's mean (not zero): before normalisation, zero is a very
    loud value for log-mel. ``__call__(feats (T, F)) -> (T, F)``.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_mask_width: int = 27,
        time_masks: int = 2,
        time_mask_width: int = 40,
        time_mask_max_ratio: float = 0.2,
        warp_range: tuple[float, float] | None = None,
    ):
        if warp_range is not None and not 0 < float(warp_range[0]) <= float(warp_range[1]):
            raise ValueError(f"warp_range must be (low, high) with 0 < low <= high, got {warp_range}")
        self.warp_range = None if warp_range is None else (float(warp_range[0]), float(warp_range[1]))
        self.freq_masks = int(freq_masks)
        self.time_masks = int(time_masks)
        # Separate transforms rather than transforms.SpecAugment: its `p` caps the frequency
        # masks too (0.2 * 80 bins), while the ratio is meant for time only.
        self._freq = torchaudio.transforms.FrequencyMasking(freq_mask_width)
        self._time = torchaudio.transforms.TimeMasking(time_mask_width, p=time_mask_max_ratio)
        self.freq_mask_width = int(freq_mask_width)
        self.time_mask_width = int(time_mask_width)
        self.time_mask_max_ratio = float(time_mask_max_ratio)

    @property
    def enabled(self) -> bool:
        """Whether it changes features at all (masks or a warp)."""
        return self.freq_masks > 0 or self.time_masks > 0 or self.warp_range is not None

    def warp(self, feats: torch.Tensor, factor: float) -> torch.Tensor:
        """(T, F) -> (T, F): output bin i reads input position i / factor (linear interpolation,
        clamped at the top bin)."""
        bins = feats.shape[1]
        pos = (torch.arange(bins, dtype=torch.float32) / factor).clamp(max=bins - 1)
        low = pos.floor().long()
        high = (low + 1).clamp(max=bins - 1)
        frac = (pos - low).to(feats.dtype)
        return feats[:, low] * (1 - frac) + feats[:, high] * frac

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        if self.warp_range is not None:
            low, high = self.warp_range
            feats = self.warp(feats, low + (high - low) * float(torch.rand(())))
        spec = feats.transpose(0, 1)  # torchaudio masks (..., freq, time)
        fill = float(spec.mean())
        for _ in range(self.freq_masks):
            spec = self._freq(spec, fill)
        for _ in range(self.time_masks):
            spec = self._time(spec, fill)
        return spec.transpose(0, 1).contiguous()

    def __repr__(self) -> str:
        return (
            f"FeatureAugment(freq_masks={self.freq_masks}, freq_mask_width={self.freq_mask_width}, "
            f"time_masks={self.time_masks}, time_mask_width={self.time_mask_width}, "
            f"time_mask_max_ratio={self.time_mask_max_ratio}, warp_range={self.warp_range})"
        )
