"""ISPL's attacks (`dlbd`, `watermark`; ISPL §4.1, App. B): triggers, scenarios, ISPL's poison
budget in every mode, errors."""
from __future__ import annotations

import pytest
import torch

from bdexp import pipeline
from bdexp.attacks import ATTACKS, build_attack
from bdexp.attacks.dlbd import SHAPES
from bdexp.attacks.scenarios import SCENARIOS
from bdexp.attacks.watermark import MARKS
from bdexp.errors import ConfigError
from tests.test_attacks import attack_cfg as cfg

K = 10
ISPL_PAIRS = [(0, 2), (1, 3), (3, 5), (7, 4), (2, 5), (8, 6), (9, 2), (3, 7)]


def make(name: str, image=(3, 16, 16), seed: int = 0, k: int = K, **over):
    """`image` is the (C, H, W) image shape (dlbd's own `shape` key goes in `over`)."""
    return build_attack(cfg(name, **over), num_classes=k, image_shape=image, seed=seed)


def data(n: int = 200, c: int = 3, hw: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, hw, hw, generator=g)
    y = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    return x, y


def per_class(y: torch.Tensor, poison: torch.Tensor) -> list[int]:
    """Poisoned samples per (original) class."""
    return torch.bincount(y[poison], minlength=K).tolist()


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
def test_registered_and_yaml_lists_every_key(name):
    assert name in ATTACKS.names()
    c = cfg(name)
    assert c.name == name and c.scenario == 0 and c.target is None and c.source is None
    assert c.mode == "one_to_one"
    assert set(c) - {"name"} == set(make(name).opts.as_dict())


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
    assert SCENARIOS[k] == ISPL_PAIRS[k]
    src, tgt = ISPL_PAIRS[k]
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
    assert torch.equal(attack.backdoor_test(x, y).index, (y != 4).nonzero().flatten())
    assert make(name, scenario=3, mode="all_to_all").target == 4
    agree = make(name, scenario=3, target=4, source=7)  # explicit values equal to the pair: fine
    assert (agree.source, agree.target) == (7, 4)
    free = make(name, scenario=None, target=1, source=6)  # no scenario: any pair, any K
    assert (free.source, free.target) == (6, 1)
    assert make(name, k=5, scenario=None, target=1, source=3).source == 3


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
@pytest.mark.parametrize("eps, each", [(0.05, 1), (0.2, 4)])
def test_all_to_one_poisons_eps_of_one_class_spread_equally(name, eps, each):
    """ISPL App. B: "an equal proportion of every non-target class such that the total amount of
    poison is ε times the size of the source class" (§4.2: "an ε/9 percentage of each non-target
    class"). 180 per class: ε/9·180 = `each` per non-target class, 9·each = ε·180 in all."""
    x, y = data(n=1800)
    attack = make(name, scenario=3, mode="all_to_one", poison_rate=eps)  # target 4
    out = attack.poison_train(x, y)
    assert per_class(y, out.poison) == [0 if c == 4 else each for c in range(K)]
    assert int(out.poison.sum()) == 9 * each == round(eps * 180)
    assert (out.y[out.poison] == 4).all() and torch.equal(out.y[~out.poison], y[~out.poison])
    assert attack.budget_rule.startswith("class:") and "non-target" in attack.budget_rule


@pytest.mark.parametrize("name", ["dlbd", "watermark"])
def test_all_to_all_poisons_eps_of_every_class(name):
    """ISPL App. B: "we select a cyclic permutation of the classes, then poison a ε percentage of
    each class": 0.05·180 = 9 of every class, relabelled to the next class."""
    x, y = data(n=1800)
    out = make(name, scenario=3, mode="all_to_all", poison_rate=0.05).poison_train(x, y)
    assert per_class(y, out.poison) == [9] * K
    assert torch.equal(out.y[out.poison], (y[out.poison] + 1) % K)


def test_all_to_one_uses_each_class_own_size():
    """Equal proportion, not equal count: classes of 100·(c+1) images at ε = 0.09 lose
    0.09/9·100·(c+1) = c+1 images each (none from the target)."""
    y = torch.cat([torch.full((100 * (c + 1),), c) for c in range(K)])
    x = torch.rand(len(y), 3, 16, 16)
    out = make("dlbd", scenario=None, target=0, mode="all_to_one", poison_rate=0.09).poison_train(x, y)
    assert per_class(y, out.poison) == [0] + [c + 1 for c in range(1, K)]


def test_pipeline_all_to_one_budget_and_its_record(tiny_cfg, tmp_path):
    """`attack=dlbd attack.mode=all_to_one attack.poison_rate=0.05` on 10 balanced classes of 180:
    5 % of one class's size (9 images), one from each non-target class; the run info says which
    rule produced the count."""
    cfg = tiny_cfg("attack=dlbd", "attack.mode=all_to_one", "attack.poison_rate=0.05", "dataset.num_classes=10",
                   "dataset.train_size=1800", "train.epochs=1")
    out = pipeline.run(cfg, tmp_path)
    _, attack, train, _ = pipeline.prepare(cfg)
    assert out["run"]["n_poison"] == int(train.poison.sum()) == round(0.05 * 180)
    assert per_class(train.y_true, train.poison) == [0 if c == attack.target else 1 for c in range(K)]
    assert out["run"]["poison_budget"] == attack.budget_rule and "eps/(K-1)" in attack.budget_rule


def test_dataset_budget_is_the_generic_rule_and_one_to_one_is_unchanged():
    """budget=dataset restores the generic attacks' rule (ε·N among non-target samples); the
    1-to-1 draw is the same under both budgets."""
    x, y = data(n=1800)
    out = make("dlbd", scenario=3, mode="all_to_one", poison_rate=0.05, budget="dataset").poison_train(x, y)
    assert int(out.poison.sum()) == round(0.05 * 1800) and not out.poison[y == 4].any()
    a = make("dlbd", scenario=3, poison_rate=0.1).poison_train(x, y)
    b = make("dlbd", scenario=3, poison_rate=0.1, budget="dataset").poison_train(x, y)
    assert torch.equal(a.poison, b.poison) and per_class(y, a.poison)[7] == 18 == int(a.poison.sum())


def test_class_budget_keeps_the_total_by_largest_remainders():
    """ISPL App. B: "the total amount of poison is ε times the size of the source class". Quotas of
    27.8 per class (CIFAR-10, 5 000 per class, ε = 5 %) give 250, not 9 × 28 = 252."""
    from bdexp.attacks.base import apportion

    counts = apportion([0.05 / 9 * 5000] * 9)
    assert sum(counts) == 250 and sorted(set(counts)) == [27, 28] and counts.count(28) == 7
    assert apportion([0.1 * 20] * 10) == [2] * 10 and apportion([]) == []
    x, y = data(n=200)  # 20 per class, ε = 0.1: quotas 0.22 each, 0.1·20 = 2 in all
    out = make("dlbd", scenario=3, mode="all_to_one", poison_rate=0.1).poison_train(x, y)
    assert int(out.poison.sum()) == 2 and not out.poison[y == 4].any() and max(per_class(y, out.poison)) == 1


def test_class_budget_errors():
    x, y = data(n=200)  # 20 per class: ε = 0.02 gives 0.02·20 = 0.4 poisoned samples in all
    with pytest.raises(ConfigError, match="rounds to 0.*budget=class"):
        make("dlbd", scenario=3, mode="all_to_one", poison_rate=0.02).poison_train(x, y)
    with pytest.raises(ConfigError, match="attack.budget"):
        make("dlbd", budget="source")


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
