"""BppAttack (bdexp/attacks/bpp.py) and Adaptive-Blend / Adaptive-Patch (bdexp/attacks/adap.py):
hand-computed quantization and dithering, negative / payload / cover counts and labels, training-
vs test-time triggers, determinism, and the options each refuses."""
from __future__ import annotations


import pytest
import torch

from bdexp.attacks import ATTACKS
from bdexp.attacks.bpp import squeeze
from bdexp.errors import ConfigError
from tests.test_attacks import COMMON, K, attack_cfg, data, make

NEW = ["bpp", "adap_blend", "adap_patch"]


def labelled(n: int, hw: int = 16, c: int = 3, seed: int = 0):
    """n random images, labels 0..K-1 in turn (balanced)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, hw, hw, generator=g), torch.arange(n) % K


@pytest.mark.parametrize("name", NEW)
def test_yaml_lists_every_option_with_the_code_default(name):
    c = attack_cfg(name)
    assert c.name == name and COMMON <= set(c)
    own = {k: v for k, v in c.items() if k != "name"}
    assert own == ATTACKS.options(name).defaults()
    assert own["budget"] == "dataset"


# ============================================================================ bpp
def test_squeeze_hand_computed_2x2():
    """squeeze_num = 2 (levels 0 and 1), one channel, [[a, b], [c, d]] = [[3/16, 7/16], [3/16, 9/16]].
    Plain rounding: [[0, 0], [0, 1]] (only d >= 1/2).
    Floyd–Steinberg in raster order (error e = old − new; 7/16 right, 3/16 below-left, 5/16 below,
    1/16 below-right):
      a = 0.1875 -> 0, e = 0.1875:  b += 7/16 e = 0.08203125 -> b = 0.51953125
                                    c += 5/16 e = 0.05859375 -> c = 0.24609375
                                    d += 1/16 e = 0.01171875 -> d = 0.57421875
      b = 0.51953125 -> 1, e = -0.48046875:  c += 3/16 e = -0.090087890625 -> c = 0.156005859375
                                             d += 5/16 e = -0.150146484375 -> d = 0.424072265625
      c = 0.156005859375 -> 0, e = 0.156005859375:  d += 7/16 e = 0.068252563... -> d = 0.492325...
      d = 0.492325... -> 0
    so [[0, 1], [0, 0]]: d ends at 0 although its own value rounds to 1. Every weight enters."""
    x = torch.tensor([[3 / 16, 7 / 16], [3 / 16, 9 / 16]]).view(1, 1, 2, 2)
    assert torch.equal(squeeze(x, 2, dither=False), torch.tensor([[0.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2))
    assert torch.equal(squeeze(x, 2, dither=True), torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2))


def test_squeeze_hand_computed_row_of_three_levels():
    """squeeze_num = 3 (levels 0, 1/2, 1; level units v = 2x), a 1×3 row x = [0.3, 0.3, 0.3]:
    plain: v = 0.6 -> 1 level each -> [0.5, 0.5, 0.5].
    dithered: v0 = 0.6 -> 1, e = -0.4; v1 = 0.6 + 7/16·(-0.4) = 0.425 -> 0, e = 0.425;
    v2 = 0.6 + 7/16·0.425 = 0.7859375 -> 1  =>  [0.5, 0, 0.5] (nothing below a single row).
    Channels and images are independent: the second channel (x = 0.8, v = 1.6) gives
    1.6 -> 2 (e = -0.4), 1.6 - 0.175 = 1.425 -> 1 (e = 0.425), 1.6 + 0.1859375 -> 2  =>  [1, 0.5, 1]."""
    x = torch.tensor([[0.3, 0.3, 0.3], [0.8, 0.8, 0.8]]).view(1, 2, 1, 3).repeat(2, 1, 1, 1)
    plain = squeeze(x, 3, dither=False)
    assert torch.equal(plain[0, 0, 0], torch.tensor([0.5, 0.5, 0.5]))
    d = squeeze(x, 3, dither=True)
    assert torch.equal(d[:, 0, 0], torch.tensor([[0.5, 0.0, 0.5]] * 2))
    assert torch.equal(d[:, 1, 0], torch.tensor([[1.0, 0.5, 1.0]] * 2))


@pytest.mark.parametrize("levels", [2, 4, 8])
@pytest.mark.parametrize("dither", [True, False])
def test_squeeze_uses_exactly_squeeze_num_levels(levels, dither):
    x, y = data(n=32)
    attack = make("bpp", squeeze_num=levels, dither=dither)
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    values = torch.unique(out)
    expected = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    assert len(values) == levels and torch.allclose(values, expected)
    bd = attack.backdoor_test(x, y)  # the test-time trigger is the same squeeze
    assert torch.equal(bd.x, squeeze(x[bd.index], levels, dither))


def test_dither_keeps_the_mean():
    """Error diffusion keeps a flat region's mean (plain rounding does not). Its speed is a
    benchmark's business, not a test's."""
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.equal(squeeze(flat, 2, dither=False), torch.zeros_like(flat))
    assert abs(float(squeeze(flat, 2).mean()) - 0.3) < 0.02


def test_bpp_negatives_count_labels_and_hook():
    x, y = labelled(200)
    attack = make("bpp", poison_rate=0.1, neg_ratio=0.2)
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == 20 and int(out.cross.sum()) == round(0.2 * 200)
    assert not (out.cross & out.poison).any()
    # negatives keep their true labels and enter the set clean; the hook adds the residual per batch
    assert torch.equal(out.y[out.cross], y[out.cross]) and torch.equal(out.y_true, y)
    assert torch.equal(out.x[out.cross], x[out.cross])
    assert torch.equal(out.x[out.poison], squeeze(x[out.poison], 8))
    gen = torch.Generator().manual_seed(3)
    batch = attack.train_batch_hook(out.x, out.cross, gen)
    changed = (batch != out.x).flatten(1).any(1)
    assert torch.equal(changed, out.cross)
    # each negative is x_i + (Q(x_j) − x_j) on the 0..255 grid, clamped, for some training row j
    bank = (((squeeze(x, 8) * 255).round() - (x * 255).round()) / 255)
    candidates = (out.x[out.cross][:, None] + bank[None]).clamp(0, 1)  # (negatives, donors, C, H, W)
    match = (candidates - batch[out.cross][:, None]).flatten(2).abs().amax(2) < 1e-6
    assert match.any(1).all()
    again = attack.train_batch_hook(out.x, out.cross, gen)  # fresh donors every call
    assert not torch.equal(batch, again) and torch.equal(again[~out.cross], out.x[~out.cross])


def test_bpp_neg_ratio_zero_disables_and_too_many_refused():
    x, y = labelled(100)
    off = make("bpp", neg_ratio=0.0)
    out = off.poison_train(x, y)
    assert not out.cross.any() and int(out.poison.sum()) == 10
    assert off.train_batch_hook(x, torch.ones(100, dtype=torch.bool), None) is x
    with pytest.raises(ConfigError, match="neg_ratio"):
        make("bpp", neg_ratio=0.95).poison_train(x, y)  # 95 negatives, 90 unpoisoned rows


def test_bpp_negatives_with_append_and_determinism():
    x, y = labelled(100)
    out = make("bpp", inject="append", neg_ratio=0.1).poison_train(x, y)
    assert len(out.y) == 110 and int(out.cross.sum()) == 11 and not out.cross[100:].any()
    a, b = make("bpp", seed=4).poison_train(x, y), make("bpp", seed=4).poison_train(x, y)
    for field in ("x", "y", "poison", "cross"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    c = make("bpp", seed=5).poison_train(x, y)
    assert not torch.equal(a.poison, c.poison) and not torch.equal(a.cross, c.cross)


@pytest.mark.parametrize("over, key", [
    ({"squeeze_num": 1}, "squeeze_num"),
    ({"squeeze_num": 257}, "squeeze_num"),
    ({"neg_ratio": 1.5}, "neg_ratio"),
    ({"neg_ratio": -0.1}, "neg_ratio"),
    ({"dither": "yes"}, "dither"),
])
def test_bpp_config_errors(over, key):
    with pytest.raises(ConfigError, match=key):
        make("bpp", **over)


# ============================================================================ adap_blend / adap_patch
@pytest.mark.parametrize("name, cover_default", [("adap_blend", 0.003), ("adap_patch", 0.006)])
def test_adaptive_payload_and_cover_counts_disjoint_labels(name, cover_default):
    x, y = labelled(1000)
    attack = make(name)  # the defaults: poison_rate 0.003, cover_rate as the README
    assert attack.poison_rate == 0.003 and attack.cover_rate == cover_default
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == round(0.003 * 1000)
    assert int(out.cover.sum()) == round(cover_default * 1000)
    x, y = labelled(1000, seed=1)
    out = make(name, poison_rate=0.05, cover_rate=0.03).poison_train(x, y)
    pay, cov = out.poison, out.cover
    assert int(pay.sum()) == 50 and int(cov.sum()) == 30 and not (pay & cov).any()
    assert (out.y[pay] == 0).all() and (y[pay] != 0).all()  # all_to_one: non-target rows relabelled
    assert torch.equal(out.y[cov], y[cov]) and torch.equal(out.y_true, y)  # covers keep their labels
    clean = ~(pay | cov)
    assert torch.equal(out.x[clean], x[clean]) and torch.equal(out.y[clean], y[clean])
    assert (out.x[pay] != x[pay]).flatten(1).any(1).all() and (out.x[cov] != x[cov]).flatten(1).any(1).all()
    assert not out.cross.any() and out.x.min() >= 0 and out.x.max() <= 1


def _tiles_changed(delta: torch.Tensor, g: int = 4) -> torch.Tensor:
    """(n, g·g) bool: which tiles of a 16×16 image a per-sample change touches."""
    n, _, h, w = delta.shape
    t = delta.abs().amax(1).view(n, g, h // g, g, w // g).amax((2, 4))
    return t.flatten(1) > 0


def test_adap_blend_training_trigger_uses_exactly_half_the_pieces():
    x, y = labelled(400)
    x[:] = 0.5  # a flat image: every tile the trigger touches changes (b is noise, never exactly 0.5)
    attack = make("adap_blend", poison_rate=0.05, cover_rate=0.05)
    b = attack.pattern
    out = attack.poison_train(x, y)
    rows = out.poison | out.cover
    delta = out.x[rows] - x[rows]
    tiles = _tiles_changed(delta)
    assert (tiles.sum(1) == 8).all()  # round(0.5·16) masked, 8 shown, on every payload and cover row
    assert len({tuple(t.tolist()) for t in tiles}) > 1  # a fresh random choice per sample
    # inside the shown tiles: x + train_alpha·(b − x); elsewhere untouched
    m = tiles.view(-1, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].float()
    assert torch.allclose(out.x[rows], x[rows] + 0.15 * m * (b - x[rows]), atol=1e-6)
    # the test-time trigger is the whole image at test_alpha
    bd = attack.backdoor_test(x, y)
    assert torch.allclose(bd.x, x[bd.index] + 0.2 * (b - x[bd.index]), atol=1e-6)
    assert attack.trigger_mask() is None
    # mask_rate 0.25 of 9 pieces: round(2.25) = 2 masked, 7 shown
    a9 = make("adap_blend", shape=(3, 18, 18), pieces=9, mask_rate=0.25, poison_rate=0.05, cover_rate=0.0)
    x9 = torch.full((400, 3, 18, 18), 0.5)
    o9 = a9.poison_train(x9, y)
    d9 = (o9.x[o9.poison] - 0.5).abs().amax(1).view(-1, 3, 6, 3, 6).amax((2, 4)).flatten(1) > 0
    assert (d9.sum(1) == 7).all() and o9.cover is not None and not o9.cover.any()


def test_adap_blend_image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "kitty.png"
    Image.new("RGB", (32, 32), (0, 255, 0)).save(path)
    attack = make("adap_blend", image=str(path))
    assert torch.allclose(attack.pattern[1], torch.ones(16, 16)) and attack.pattern[[0, 2]].abs().max() < 1e-6


def test_adap_patch_training_trigger_one_patch_each_in_equal_shares():
    x, y = labelled(1000)
    x[:] = 0.5
    attack = make("adap_patch", poison_rate=0.05, cover_rate=0.03)
    out = attack.poison_train(x, y)
    masks, marks, alphas = attack.masks, attack.marks, (0.5, 0.2, 0.5, 0.3)
    assert masks.shape == (4, 16, 16) and int(masks.sum()) == 4 * 16  # four 4×4 corner squares
    assert masks[0, 0, 0] and masks[1, 0, 15] and masks[2, 15, 0] and masks[3, 15, 15]
    for flag, n in ((out.poison, 50), (out.cover, 30)):
        delta = (out.x[flag] - x[flag]).abs().amax(1)  # (n, H, W)
        touched = torch.stack([(delta * masks[j]).flatten(1).amax(1) > 0 for j in range(4)], 1)
        assert (touched.sum(1) == 1).all()  # exactly one trigger per training sample
        assert (delta * ~masks.any(0)).max() == 0  # nothing outside the marks
        counts = touched.sum(0)
        assert int(counts.sum()) == n and int(counts.max() - counts.min()) <= 1  # the authors' equal shares
        for j in range(4):  # each at its own training opacity
            rows = out.x[flag][touched[:, j]]
            expect = 0.5 + alphas[j] * masks[j] * (marks[j] - 0.5)
            assert torch.allclose(rows, expect.expand_as(rows), atol=1e-6)
    two = make("adap_patch", poison_rate=0.05, cover_rate=0.0, per_sample=2).poison_train(x, y)
    delta = (two.x[two.poison] - 0.5).abs().amax(1)
    touched = torch.stack([(delta * masks[j]).flatten(1).amax(1) > 0 for j in range(4)], 1)
    assert (touched.sum(1) == 2).all() and len({tuple(t.tolist()) for t in touched}) > 1


def test_adap_patch_test_trigger_is_all_patches_at_full_opacity():
    x, y = data()
    attack = make("adap_patch")
    bd = attack.backdoor_test(x, y)
    union = attack.masks.any(0)
    expect = torch.where(union, attack.marks.sum(0), x[bd.index])  # marks do not overlap at the corners
    assert torch.allclose(bd.x, expect, atol=1e-6)
    assert torch.equal(attack.trigger_mask(), union)
    sub = make("adap_patch", test_patches=[0, 2])
    out = sub.apply_trigger(x)
    assert torch.equal(sub.trigger_mask(), sub.masks[0] | sub.masks[2])
    assert torch.equal(out[:, :, ~sub.trigger_mask()], x[:, :, ~sub.trigger_mask()])
    rnd = make("adap_patch", placement="random", size=3)
    assert int(rnd.masks.flatten(1).sum(1).min()) == 9
    assert not torch.equal(rnd.masks, make("adap_patch", placement="random", size=3, seed=1).masks)


def test_adap_patch_image_files(tmp_path):
    from PIL import Image

    paths = []
    for j in range(4):
        img = Image.new("RGB", (16, 16), (0, 0, 0))
        img.putpixel((j, j), (255, 255, 255))  # one white pixel on black: the mask is that pixel
        paths.append(str(tmp_path / f"t{j}.png"))
        img.save(paths[-1])
    attack = make("adap_patch", images=paths)
    assert [int(m.sum()) for m in attack.masks] == [1, 1, 1, 1] and bool(attack.masks[2, 2, 2])
    with pytest.raises(ConfigError, match="images"):
        make("adap_patch", images=paths[:3])


@pytest.mark.parametrize("name", ["adap_blend", "adap_patch"])
def test_adaptive_append_and_determinism(name):
    x, y = labelled(500)
    over = {"poison_rate": 0.04, "cover_rate": 0.02}
    out = make(name, inject="append", **over).poison_train(x, y)
    assert len(out.y) == 500 + 20 + 10 and torch.equal(out.x[:500], x)
    assert out.poison[500:520].all() and not out.poison[:500].any() and not out.poison[520:].any()
    assert out.cover[520:].all() and not out.cover[:520].any()
    assert torch.equal(out.y[520:], out.y_true[520:]) and (out.y[500:520] == 0).all()
    a, b = make(name, seed=2, **over).poison_train(x, y), make(name, seed=2, **over).poison_train(x, y)
    for field in ("x", "y", "y_true", "poison", "cover"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    c = make(name, seed=3, **over).poison_train(x, y)
    assert not torch.equal(a.poison, c.poison) and not torch.equal(a.cover, c.cover)


@pytest.mark.parametrize("name, over, key", [
    ("adap_blend", {"pieces": 15}, "pieces"),
    ("adap_blend", {"pieces": 289}, "pieces"),  # a 17×17 grid on 16×16 images
    ("adap_blend", {"mask_rate": 1.0}, "mask_rate"),
    ("adap_blend", {"mask_rate": 0.99}, "mask_rate"),  # round(15.84) = 16: every piece masked
    ("adap_blend", {"train_alpha": 1.5}, "train_alpha"),
    ("adap_blend", {"test_alpha": -0.1}, "test_alpha"),
    ("adap_blend", {"cover_rate": 2.0}, "cover_rate"),
    ("adap_blend", {"image": "/no/such/file.png"}, "image"),
    ("adap_blend", {"label_mode": "clean"}, "label_mode"),
    ("adap_patch", {"label_mode": "clean"}, "label_mode"),
    ("adap_patch", {"train_alphas": []}, "train_alphas"),
    ("adap_patch", {"train_alphas": [0.5, 1.5]}, "train_alphas"),
    ("adap_patch", {"per_sample": 0}, "per_sample"),
    ("adap_patch", {"per_sample": 5}, "per_sample"),
    ("adap_patch", {"test_patches": [4]}, "test_patches"),
    ("adap_patch", {"test_patches": [0, 0]}, "test_patches"),
    ("adap_patch", {"test_patches": []}, "test_patches"),
    ("adap_patch", {"size": 9}, "size"),  # corner squares of 9 px overlap on 16×16
    ("adap_patch", {"size": 17, "placement": "random"}, "size"),
    ("adap_patch", {"train_alphas": [0.1] * 5}, "placement"),  # five triggers, four corners
    ("adap_patch", {"placement": "center"}, "placement"),
])
def test_adaptive_config_errors(name, over, key):
    with pytest.raises(ConfigError, match=key):
        make(name, **over)


@pytest.mark.parametrize("name", ["adap_blend", "adap_patch"])
def test_adaptive_cover_rate_infeasible_or_rounding_to_zero(name):
    x, y = labelled(100)
    with pytest.raises(ConfigError, match="cover_rate"):
        make(name, poison_rate=0.1, cover_rate=0.95).poison_train(x, y)  # 95 covers, 90 free rows
    with pytest.raises(ConfigError, match="cover_rate"):
        make(name, poison_rate=0.1, cover_rate=0.001).poison_train(x, y)  # round(0.1) = 0 covers
    out = make(name, poison_rate=0.1, cover_rate=0.0).poison_train(x, y)
    assert out.cover is not None and not out.cover.any() and int(out.poison.sum()) == 10
