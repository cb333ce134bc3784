"""ISPL's attacks (SPEC §1 `dlbd`, `watermark`): triggers, scenarios, 1-to-1 poisoning, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import bdexp
from bdexp.attacks import ATTACKS, build_attack
from bdexp.attacks.dlbd import SHAPES
from bdexp.attacks.scenarios import SCENARIOS
from bdexp.attacks.watermark import MARKS
from bdexp.errors import ConfigError

CONF = Path(bdexp.__file__).parent / "conf" / "attack"
K = 10
SPEC_PAIRS = [(0, 2), (1, 3), (3, 5), (7, 4), (2, 5), (8, 6), (9, 2), (3, 7)]


def cfg(name: str, **over):
    c = OmegaConf.load(CONF / f"{name}.yaml")
    for key, value in over.items():
        c[key] = value
    return c


def make(name: str, image=(3, 16, 16), seed: int = 0, k: int = K, **over):
    """`image` is the (C, H, W) image shape (dlbd's own `shape` key goes in `over`)."""
    return build_attack(cfg(name, **over), num_classes=k, image_shape=image, seed=seed)


def data(n: int = 200, c: int = 3, hw: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, hw, hw, generator=g)
    y = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    return x, y


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
def test_registered_and_yaml_lists_every_key(name):
    assert name in ATTACKS.names()
    c = OmegaConf.load(CONF / f"{name}.yaml")
    assert c.name == name and c.scenario == 0 and c.target is None and c.source is None
    assert c.mode == "one_to_one"
    assert set(c) == set(make(name).cfg)


@pytest.mark.parametrize("channels", [1, 3])
def test_dlbd_overwrites_only_the_shape(channels):
    x, y = data(c=channels)
    for seed in range(6):
        attack = make("dlbd", image=(channels, 16, 16), seed=seed)
        mask = attack.trigger_mask()
        assert int(mask.sum()) == len(SHAPES[attack.shape]) in (1, 5, 3)
        assert attack.colour.shape == (channels,)
        assert torch.equal(attack.colour * 255, (attack.colour * 255).round()) and attack.colour.max() <= 254 / 255
        out = attack.poison_train(x, y)
        changed = (out.x != x).any(dim=1)
        assert not changed[:, ~mask].any() and not changed[~out.poison].any()
        assert torch.equal(out.x[~out.poison], x[~out.poison])
        pixels = out.x[out.poison][:, :, mask]  # (n, C, P): every shape pixel set to the colour
        assert torch.equal(pixels, attack.colour.view(1, -1, 1).expand_as(pixels))


@pytest.mark.parametrize("forced, n_px", [("pixel", 1), ("X", 5), ("L", 3)])
def test_dlbd_forced_shapes_fit_many_seeds_and_sizes(forced, n_px):
    for hw in (16, 28, 32):
        for seed in range(25):
            for over in ({"shape": forced}, {}):
                attack = make("dlbd", image=(3, hw, hw), seed=seed, scenario=seed % 8, **over)
                mask = attack.trigger_mask()
                assert mask.shape == (hw, hw)
                assert int(mask.sum()) == len(SHAPES[attack.shape])  # nothing clipped at the border
                assert 0 <= int(attack.rows.min()) and int(attack.rows.max()) < hw
                assert 0 <= int(attack.cols.min()) and int(attack.cols.max()) < hw
            assert int(attack.trigger_mask().sum()) in (1, 3, 5)
    assert int(make("dlbd", shape=forced).trigger_mask().sum()) == n_px


def test_dlbd_random_shapes_all_occur():
    drawn = {make("dlbd", seed=s).shape for s in range(40)}
    assert drawn == set(SHAPES)


def test_dlbd_deterministic_per_seed_and_scenario():
    def trig(seed, scenario):
        a = make("dlbd", image=(3, 32, 32), seed=seed, scenario=scenario)
        return a.shape, a.top, a.left, a.colour.tolist()

    for k in range(8):
        assert trig(3, k) == trig(3, k)
    assert len({str(trig(3, k)) for k in range(8)}) == 8  # every scenario draws its own trigger
    assert trig(3, 0) != trig(4, 0)
    x, y = data(hw=32)
    a, b = make("dlbd", image=(3, 32, 32), seed=5).poison_train(x, y), make("dlbd", image=(3, 32, 32), seed=5).poison_train(x, y)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.poison, b.poison)


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
@pytest.mark.parametrize("k", range(8))
def test_scenario_pairs_one_to_one(name, k):
    assert SCENARIOS[k] == SPEC_PAIRS[k]
    src, tgt = SPEC_PAIRS[k]
    x, y = data(n=300)
    attack = make(name, scenario=k, poison_rate=0.2)
    assert (attack.source, attack.target, attack.mode) == (src, tgt, "one_to_one")
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == round(0.2 * int((y == src).sum()))  # ε of the source class
    assert (y[out.poison] == src).all() and (out.y[out.poison] == tgt).all()
    assert torch.equal(out.y[~out.poison], y[~out.poison])
    bd = attack.backdoor_test(x, y)
    assert torch.equal(bd.index, (y == src).nonzero().flatten())
    assert (bd.y_target == tgt).all() and torch.equal(bd.x, attack.apply_trigger(x[bd.index]))


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
def test_scenario_with_other_modes_and_explicit_values(name):
    x, y = data()
    attack = make(name, scenario=3, mode="all_to_one")
    assert attack.target == 4 and attack.source is None
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == round(0.1 * len(y))
    assert (y[out.poison] != 4).all() and (out.y[out.poison] == 4).all()
    assert torch.equal(attack.backdoor_test(x, y).index, (y != 4).nonzero().flatten())
    assert make(name, scenario=3, mode="all_to_all").target == 4
    agree = make(name, scenario=3, target=4, source=7)  # explicit values equal to the pair: fine
    assert (agree.source, agree.target) == (7, 4)
    free = make(name, scenario=None, target=1, source=6)  # no scenario: any pair, any K
    assert (free.source, free.target) == (6, 1)
    assert make(name, k=5, scenario=None, target=1, source=3).source == 3


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
@pytest.mark.parametrize(
    "over, keys",
    [
        ({"scenario": 0, "target": 5}, ["scenario", "target"]),
        ({"scenario": 2, "source": 1}, ["scenario", "source"]),
        ({"scenario": 8}, ["scenario"]),
        ({"scenario": -1}, ["scenario"]),
        ({"scenario": True}, ["scenario"]),
        ({"scenario": None}, ["scenario", "target"]),
        ({"scenario": 1, "mode": "all_to_one", "source": 1}, ["source"]),
        ({"bogus": 1}, ["bogus"]),  # the base reports unknown keys by name
    ],
)
def test_scenario_config_errors(name, over, keys):
    with pytest.raises(ConfigError) as err:
        make(name, **over)
    for key in keys:
        assert (key if key == "bogus" else f"attack.{key}") in str(err.value)


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
def test_fewer_than_ten_classes_is_an_error(name):
    with pytest.raises(ConfigError, match="classes"):
        make(name, k=9)


def test_dlbd_option_errors():
    with pytest.raises(ConfigError, match="attack.shape"):
        make("dlbd", shape="square")
    with pytest.raises(ConfigError, match="attack.shape"):
        make("dlbd", image=(3, 2, 2), shape="X")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mark", MARKS)
def test_watermark_blend_in_corner_only(channels, mark):
    x, y = data(c=channels, hw=32)
    attack = make("watermark", image=(channels, 32, 32), mark=mark)
    out = attack.poison_train(x, y)
    changed = (out.x != x).any(dim=1)
    assert not changed[:, 8:, :].any() and not changed[:, :, 8:].any()
    assert not changed[~out.poison].any()
    a = 0.8 * attack.alpha
    xp = x[out.poison][:, :, :8, :8]
    expect = (1 - a) * xp + a * attack.mark
    assert torch.allclose(out.x[out.poison][:, :, :8, :8], expect, atol=1e-6)
    assert attack.mark.shape == (channels, 8, 8) and out.x.min() >= 0 and out.x.max() <= 1
    mask = attack.trigger_mask()
    assert torch.equal(mask[:8, :8], attack.alpha > 0) and not mask[8:].any() and not mask[:, 8:].any()
    assert not changed[:, :8, :8][:, ~mask[:8, :8]].any()


def test_watermark_marks_nonempty_distinct_and_opacity_zero():
    marks = {m: make("watermark", mark=m) for m in MARKS}
    for m, attack in marks.items():
        assert attack.alpha.shape == (8, 8) and 0 < attack.alpha.sum() < 64
        assert attack.alpha.min() >= 0 and attack.alpha.max() <= 1
    blends = [(a.alpha[None] * a.mark).flatten() for a in marks.values()]
    for i in range(len(blends)):
        for j in range(i + 1, len(blends)):
            assert not torch.allclose(blends[i], blends[j], atol=1e-3)
    x, _ = data(n=8)
    for m in MARKS:
        assert torch.equal(make("watermark", mark=m, opacity=0.0).apply_trigger(x), x)
    full = make("watermark", mark="colour_patch", opacity=1.0).apply_trigger(x)
    assert torch.allclose(full[:, :, 2:6, 2:6], marks["colour_patch"].mark[:, 2:6, 2:6].expand(8, -1, -1, -1))


def test_watermark_options():
    big = make("watermark", image=(3, 32, 32), size=12, location="bottom_right")
    assert big.alpha.shape == (12, 12) and big.trigger_mask()[20:, 20:].any() and not big.trigger_mask()[:20].any()
    for over, key in [({"mark": "smiley"}, "mark"), ({"opacity": 1.5}, "opacity"), ({"size": 0}, "size"),
                      ({"size": 17}, "size"), ({"location": "center"}, "location")]:
        with pytest.raises(ConfigError, match=f"attack.{key}"):
            make("watermark", **over)
