"""The frozen-encoder output cache: exact re-padding, fingerprint, and when the stage uses it."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from efin.models.encoder import Encoder
from efin.models.encoder_cache import EncoderCache, encoder_fingerprint
from efin.train import train
from tests.conftest import TRANSCRIPTS_LM, compose_config

TINY_ENCODER = dict(
    d_model=32, num_layers=1, num_heads=2, ffn_dim=64, conv_kernel=7, dropout=0.0, subsampling_channels=8
)


def test_a_cached_batch_equals_the_encoder_on_the_same_batch():
    torch.manual_seed(0)
    enc = Encoder(**TINY_ENCODER).eval()
    feats, lens = torch.randn(3, 200, 80), torch.tensor([200, 150, 97])
    cache = EncoderCache(encoder_fingerprint(enc, {"n_mels": 80}))
    first = cache.encode(enc, feats, lens, ["a", "b", "c"])
    again = cache.encode(enc, torch.full_like(feats, float("nan")), lens, ["a", "b", "c"])  # feats not read
    assert cache.hits == 3 and cache.misses == 3 and len(cache) == 3
    assert torch.equal(first[1], again[1])
    for i, n in enumerate(first[1].tolist()):
        assert torch.equal(first[0][i, :n], again[0][i, :n])
        assert not again[0][i, n:].any()  # re-padded with zeros (the projectors mask past lens)


def test_fingerprint_follows_weights_and_features():
    enc = Encoder(**TINY_ENCODER)
    a = encoder_fingerprint(enc, {"n_mels": 80})
    assert a == encoder_fingerprint(enc, {"n_mels": 80}) != encoder_fingerprint(enc, {"n_mels": 64})
    with torch.no_grad():
        enc.cmvn.mean += 1
    cache = EncoderCache(a)
    cache.entries["x"] = torch.zeros(1, 1)
    cache.check(encoder_fingerprint(enc, {"n_mels": 80}))
    assert len(cache) == 0


TINY = ["data=tiny", "encoder=tiny", "projector=tiny", "llm=tiny", "~logger", "~callbacks.progress_bar",
        "~callbacks.lr_monitor", "test_after_fit=false"]
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


class Recorder(Callback):
    """Per run: training losses per epoch, the projector's weights at each epoch end, the module."""

    runs: dict[str, dict] = {}

    def __init__(self, key: str):
        self.record = Recorder.runs.setdefault(key, {"losses": {}, "weights": {}})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.record["losses"].setdefault(trainer.current_epoch, []).append(outputs["loss"].detach().clone())

    def on_train_epoch_end(self, trainer, module):
        self.record["weights"][trainer.current_epoch] = {
            k: v.detach().clone() for k, v in module.model.projector.state_dict().items()}
        self.record["module"] = module


@pytest.fixture(scope="module")
def encoder_root(tmp_path_factory, shared_data_dir):
    root = tmp_path_factory.mktemp("encoder_cache")
    train(compose_config(["stage=encoder", *TINY, *SHORT, TRANSCRIPTS_LM], root, shared_data_dir))
    return root


def _projector(root, data_dir, key: str, overrides: list[str]) -> dict:
    cfg = compose_config(["stage=projector", *TINY, *overrides], root, data_dir, run=key)
    Recorder.runs.pop(key, None)
    with open_dict(cfg):
        cfg.callbacks.recorder = {"_target_": f"{__name__}.Recorder", "key": key}
    train(cfg)
    return Recorder.runs[key]


@pytest.mark.parametrize(("extra", "expected"), [
    ([], True),
    (["stage.module.train_encoder=true"], False),
    (["data.feature_augment={_target_:efin.data.augment.FeatureAugment,freq_masks:2}"], False),
])
def test_auto_caches_only_a_frozen_encoder_on_unaugmented_data(encoder_root, shared_data_dir, extra, expected):
    run = _projector(encoder_root, shared_data_dir, f"auto{len(extra)}{expected}",
                     [*SHORT, "stage.module.cache_encoder=auto", *extra])
    cache = run["module"].encoder_cache
    assert (cache is not None) == expected
    if expected:
        assert len(cache) > 0


def test_true_refuses_a_trained_encoder(encoder_root, shared_data_dir):
    with pytest.raises(ValueError, match="train_encoder=true"):
        _projector(encoder_root, shared_data_dir, "refuse", [*SHORT, "stage.module.cache_encoder=true",
                                                             "stage.module.train_encoder=true"])


def test_first_epoch_is_bit_identical_and_the_second_only_hits(encoder_root, shared_data_dir):
    two = ["trainer.max_epochs=2", "+trainer.limit_val_batches=1"]
    plain = _projector(encoder_root, shared_data_dir, "plain", [*two, "stage.module.cache_encoder=false"])
    cached = _projector(encoder_root, shared_data_dir, "cached", [*two, "stage.module.cache_encoder=true"])
    assert plain["module"].encoder_cache is None
    # Epoch 0 fills the cache from the very batches an uncached run encodes: identical steps.
    assert all(torch.equal(a, b) for a, b in zip(plain["losses"][0], cached["losses"][0], strict=True))
    for k, v in plain["weights"][0].items():
        assert torch.equal(v, cached["weights"][0][k]), k
    cache = cached["module"].encoder_cache
    train_keys = [k for k in cache.entries if k.startswith("train/")]
    n_train = len(cached["module"].trainer.datamodule.train_utterances)
    assert len(train_keys) == n_train and cache.misses == len(cache)  # epoch 1: hits only
    # Epoch 1 reshuffles the batches; the encoder masks padding, so a cached (epoch-0) output
    # equals a re-run in a new batch up to float rounding.
    for a, b in zip(plain["losses"][1], cached["losses"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
