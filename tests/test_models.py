"""The model contract (ML-MMDR App. A levels; docs/datasets_models.md): logits, feature levels, the s3 pruning mask, normalization, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bdexp.errors import ConfigError
from bdexp.models import LEVELS, MODELS, FeatureModel, ModelOptions, build_for, build_model, image_stats

ALL_MODELS = ("convnet", "vgg11", "vgg16", "resnet18", "preact18", "resnet32", "resnet56")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

# Documented feature sizes (C·H·W) at 32 px and width 1.0 (docs/datasets_models.md).
DIMS_32PX = {
    "convnet": (64 * 16 * 16, 128 * 8 * 8, 128 * 4 * 4, 128),
    "vgg11": (256 * 8 * 8, 512 * 4 * 4, 512 * 2 * 2, 512),
    "vgg16": (256 * 8 * 8, 512 * 4 * 4, 512 * 2 * 2, 512),
    "resnet18": (128 * 16 * 16, 256 * 8 * 8, 512 * 4 * 4, 512),
    "preact18": (128 * 16 * 16, 256 * 8 * 8, 512 * 4 * 4, 512),
    "resnet32": (16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8, 64),
    "resnet56": (16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8, 64),
}


def make(name: str, channels: int = 3, num_classes: int = 10, size: int = 32, mean: float = 0.5, std: float = 0.25,
         width: float | None = None) -> FeatureModel:
    """A model in eval mode; big models default to width 0.25 so the tests stay fast on CPU."""
    if width is None:
        width = 1.0 if name == "convnet" else 0.25
    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": name, "width": width})
    return build_model(cfg, channels, num_classes, size, [mean] * channels, [std] * channels).eval()


def images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1))


def test_all_models_registered() -> None:
    assert set(ALL_MODELS) <= set(MODELS.names())


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_logits_and_features(name: str, size: int, channels: int) -> None:
    model = make(name, channels, num_classes=7, size=size)
    x = images(2, channels, size)
    with torch.no_grad():
        logits, feats = model(x, features=True)
        plain = model(x)
    assert logits.shape == (2, 7)
    assert set(feats) == set(LEVELS)
    for level in LEVELS:
        assert feats[level].dim() == 2 and feats[level].shape[0] == 2, level
    assert feats["s3"].shape[1] % model.s3_channels == 0
    assert feats["penult"].shape[1] == model.fc.in_features
    torch.testing.assert_close(plain, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_documented_feature_dims_at_32px(name: str) -> None:
    model = make(name, 3, size=32, width=1.0)
    with torch.no_grad():
        _, feats = model(images(1, 3, 32), features=True)
    assert tuple(feats[level].shape[1] for level in LEVELS) == DIMS_32PX[name]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("size", [8, 28])
def test_small_and_odd_sizes(name: str, size: int) -> None:
    model = make(name, 1, size=size)
    with torch.no_grad():
        logits, feats = model(images(2, 1, size), features=True)
    assert logits.shape == (2, 10)
    assert all(torch.isfinite(f).all() for f in feats.values())


def _trained_bn(model: FeatureModel, x: torch.Tensor) -> FeatureModel:
    """`model` in eval mode with BN statistics and affine terms away from (0, 1): a BN after the
    mask would then map a zeroed channel to ReLU(β − γμ/σ) ≠ 0, so the test sees the difference."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.1 + torch.rand(m.bias.shape, generator=g)  # β > 0: ReLU(BN(0)) > 0
    model.train()
    with torch.no_grad():
        model(x)  # running statistics from real activations
    return model.eval()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_full_mask_zeroes_penult_and_leaves_fc_bias(name: str) -> None:
    """Neuron pruning (ML-MMDR §6.2, Fig. 10) of every s3 channel leaves nothing for the classifier:
    penult is exactly zero and every logit equals the fc bias."""
    model = make(name, 3, size=16)
    x = images(4, 3, 16)
    _trained_bn(model, x)
    assert model.s3_channel_mask.shape == (model.s3_channels,)
    assert torch.equal(model.s3_channel_mask, torch.ones(model.s3_channels))
    with torch.no_grad():
        before, feats_before = model(x, features=True)
        model.s3_channel_mask.zero_()
        after, feats_after = model(x, features=True)
    assert feats_before["penult"].abs().sum() > 0
    assert torch.count_nonzero(feats_after["s3"]) == 0
    assert torch.count_nonzero(feats_after["penult"]) == 0
    torch.testing.assert_close(after, model.fc.bias.expand_as(after), rtol=0, atol=0)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_masked_channel_is_zero_downstream(name: str) -> None:
    """One pruned channel: zero in s3 and in penult (the head only pools), other channels untouched."""
    model = make(name, 3, size=16)
    x = images(4, 3, 16)
    _trained_bn(model, x)
    c = model.s3_channels
    with torch.no_grad():
        _, full = model(x, features=True)
        model.s3_channel_mask[1] = 0
        _, pruned = model(x, features=True)
    s3_full, s3_pruned = full["s3"].view(4, c, -1), pruned["s3"].view(4, c, -1)
    assert s3_full[:, 1].abs().sum() > 0
    assert torch.count_nonzero(s3_pruned[:, 1]) == 0
    keep = [i for i in range(c) if i != 1]
    torch.testing.assert_close(s3_pruned[:, keep], s3_full[:, keep], rtol=0, atol=0)
    assert full["penult"].shape[1] == c  # penult is the pooled s3, channel for channel
    assert torch.count_nonzero(pruned["penult"][:, 1]) == 0
    torch.testing.assert_close(pruned["penult"][:, keep], full["penult"][:, keep], rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_penult_is_pooled_s3(name: str) -> None:
    """Nothing between the mask and the pooling changes values: penult = max-pool(s) + mean of s3.
    The s3 channels the pruning ranks are the ones the classifier consumes."""
    model = make(name, 3, size=32)
    x = images(3, 3, 32)
    _trained_bn(model, x)
    with torch.no_grad():
        _, feats = model(x, features=True)
        s3 = feats["s3"].view(3, model.s3_channels, -1)
        if name.startswith("vgg"):  # VGG's final max-pool sits in the head (2×2 -> 1×1 at 32 px)
            expected = s3.amax(2)
        else:
            expected = s3.mean(2)
    torch.testing.assert_close(feats["penult"], expected, rtol=1e-5, atol=1e-6)
    assert bool((feats["s3"] >= 0).all())  # post-activation


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_normalization_is_applied(name: str) -> None:
    plain = make(name, 3, size=16, mean=0.0, std=1.0)
    shifted = make(name, 3, size=16, mean=0.5, std=0.5)
    weights = {k: v for k, v in plain.state_dict().items() if k not in ("mean", "std")}
    shifted.load_state_dict(weights, strict=False)
    x = images(2, 3, 16)
    torch.testing.assert_close(shifted.normalize(x), (x - 0.5) / 0.5)
    with torch.no_grad():
        assert not torch.allclose(plain(x), shifted(x))
    # The statistics travel with the checkpoint.
    assert torch.equal(shifted.state_dict()["mean"], torch.full((3,), 0.5))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradient_step(name: str) -> None:
    model = make(name, 3, size=16).train()
    x, y = images(2, 3, 16), torch.tensor([0, 1])
    logits, feats = model(x, features=True)
    loss = F.cross_entropy(logits, y) + feats["s2"].pow(2).mean()  # features carry gradients too
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads if g is not None)


@pytest.mark.parametrize("name", ["vgg11", "resnet32", "preact18"])
def test_channels_last_and_bf16_autocast(name: str) -> None:
    model = make(name, 3, size=16).to(memory_format=torch.channels_last)
    x = images(2, 3, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = make(name, 3, size=16)(images(2, 3, 16))
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, feats = model(x, features=True)
    assert logits.shape == (2, 10) and torch.isfinite(logits.float()).all()
    assert set(feats) == set(LEVELS)


def test_unknown_key_raises_config_error() -> None:
    cfg = OmegaConf.create({"name": "vgg11", "width": 0.25, "depth": 3})
    with pytest.raises(ConfigError, match="depth") as info:
        build_model(cfg, 3, 10, 32, [0.5] * 3, [0.5] * 3)
    assert "width" in str(info.value)


@pytest.mark.parametrize(
    "cfg, channels, size, mean",
    [
        ({"name": "alexnet"}, 3, 32, [0.5] * 3),  # unknown model
        ({"width": 1.0}, 3, 32, [0.5] * 3),  # no name
        ({"name": "convnet", "width": 0}, 3, 32, [0.5] * 3),  # bad width
        ({"name": "convnet"}, 3, 4, [0.5] * 3),  # image too small
        ({"name": "convnet"}, 3, 32, [0.5] * 2),  # stats do not match channels
    ],
)
def test_invalid_configs_raise_config_error(cfg: dict, channels: int, size: int, mean: list[float]) -> None:
    with pytest.raises(ConfigError):
        build_model(cfg, channels, 10, size, mean, [0.5] * len(mean))


def test_scalar_stats_broadcast_to_channels() -> None:
    model = build_model({"name": "convnet"}, 3, 2, 16, [0.5], [0.25])
    assert torch.equal(model.mean, torch.full((3,), 0.5))
    assert model(images(2, 3, 16)).shape == (2, 2)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_yaml_keys_match_factory(name: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert cfg.name == name
    assert MODELS.options(name) is ModelOptions
    assert {k: v for k, v in cfg.items() if k != "name"} == ModelOptions.defaults() == {"width": 1.0}


def test_build_for_normalizes_with_the_training_images_stats() -> None:
    x = torch.randint(0, 256, (20, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    model = build_for({"name": "convnet", "width": 0.25}, x, num_classes=4)
    xf = x.float() / 255
    torch.testing.assert_close(model.mean, xf.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.std, xf.std(dim=(0, 2, 3)))
    for a, b in zip(image_stats(xf), image_stats(x)):  # float images in [0, 1]: the same stats
        assert a == pytest.approx(b)
    assert model(xf[:2]).shape == (2, 4)
