"""Attacks (docs/attacks.md): triggers change only what they should; selection, labels and determinism."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from omegaconf import OmegaConf

from bdexp.attacks import ATTACKS, Attack, BackdoorTestSet, PoisonedTrainSet, build_attack
from bdexp.errors import ConfigError
from tests.conftest import CONF_DIR, compose_cfg

CONF = CONF_DIR / "attack"
NAMES = ["none", "patched", "blended", "sig", "warped"]
COMMON = {"target", "mode", "source", "poison_rate", "budget", "inject", "label_mode"}
K = 10


@lru_cache(maxsize=None)
def _composed(name: str) -> dict:
    return OmegaConf.to_container(compose_cfg([f"attack={name}"]).attack, resolve=True)


def attack_cfg(name: str, **over):
    """conf/attack/<name>.yaml as the pipeline composes it (its bases included), with overrides."""
    c = OmegaConf.create(_composed(name))
    for key, value in over.items():
        c[key] = value
    return c


cfg = attack_cfg


def data(n: int = 64, c: int = 3, hw: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, hw, hw, generator=g)
    y = torch.arange(n) % K  # every class present, 6-7 samples each
    return x, y[torch.randperm(n, generator=g)]


def make(name: str, shape=(3, 16, 16), seed: int = 0, **over) -> Attack:
    return build_attack(cfg(name, **over), num_classes=K, image_shape=shape, seed=seed)


def test_registry_and_yamls_match():
    assert set(NAMES) <= set(ATTACKS.names())
    for name in NAMES:
        c = cfg(name)
        assert c.name == name
        assert COMMON <= set(c)  # inherited from _common.yaml
        attack = make(name)
        assert set(c) - {"name"} == set(attack.opts.as_dict())  # the YAML lists every key the attack takes


def test_common_keys_are_declared_once():
    """The common block lives in conf/attack/_common.yaml (mirroring AttackOptions); an attack's
    own file states only what it adds or changes; a variant file (warped_strong.yaml) extends an
    attack's file and states only what it changes."""
    from bdexp.attacks.base import AttackOptions

    common = OmegaConf.load(CONF / "_common.yaml")
    assert OmegaConf.to_container(common) == AttackOptions.defaults()
    for path in sorted(CONF.glob("[!_]*.yaml")):
        own = OmegaConf.to_container(OmegaConf.load(path))
        defaults = own.pop("defaults")
        variant = len(defaults) == 2 and defaults[1] == "_self_" and not defaults[0].startswith("_") \
            and (CONF / f"{defaults[0]}.yaml").exists()
        assert defaults in (["_common", "_self_"], ["_scenario", "_self_"]) or variant, path.name
        assert not {"target", "source", "inject"} & set(own), path.name


def test_every_attack_yaml_declares_its_budget():
    """ISPL's attacks count ε per class (ISPL App. B), ML-MMDR's and the generic ones over the whole
    training set (ML-MMDR §3.2's ratio r); each YAML states its attack's default."""
    ispl = {"dlbd", "watermark", "clbd"}
    for path in sorted(CONF.glob("[!_]*.yaml")):
        c = cfg(path.stem)
        code_default = ATTACKS.options(c.name).defaults()["budget"]
        assert c.budget == code_default == ("class" if c.name in ispl else "dataset"), c.name
    x, y = data(n=1800)  # 180 per class
    out = make("patched", poison_rate=0.05).poison_train(x, y)
    assert int(out.poison.sum()) == round(0.05 * 1800) and make("patched").budget_rule.startswith("dataset:")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3])
def test_clean_samples_untouched_and_range(name, channels):
    x, y = data(c=channels)
    attack = make(name, shape=(channels, 16, 16))
    out = attack.poison_train(x, y)
    assert isinstance(out, PoisonedTrainSet)
    assert out.x.shape == x.shape and out.x.dtype == torch.float32
    assert torch.equal(out.x[~out.poison], x[~out.poison])
    assert torch.equal(out.y[~out.poison], y[~out.poison])
    assert torch.equal(out.y_true, y)
    assert not out.cross.any()
    assert out.x.min() >= 0 and out.x.max() <= 1
    assert int(out.poison.sum()) == (0 if name == "none" else round(0.1 * len(y)))
    if name != "none":
        assert not torch.equal(out.x[out.poison], x[out.poison])


def test_patched_only_inside_mask():
    for shape, over in [((3, 16, 16), {}), ((1, 16, 16), {"location": "top_left", "pattern": "white", "size": 4}),
                        ((3, 16, 16), {"location": "random", "pattern": "random"})]:
        x, y = data(c=shape[0])
        attack = make("patched", shape=shape, **over)
        mask = attack.trigger_mask()
        assert mask.dtype == torch.bool and mask.shape == shape[1:]
        assert int(mask.sum()) == attack.opts.size ** 2
        out = attack.poison_train(x, y)
        changed = (out.x != x).any(dim=1)  # (N, H, W)
        assert not changed[:, ~mask].any()
        assert not changed[~out.poison].any()
        m = mask.float()
        expect = (1 - m) * x[out.poison] + m * attack.pattern
        assert torch.equal(out.x[out.poison], expect)


def test_patched_default_is_bottom_right_checkerboard():
    attack = make("patched")
    mask = attack.trigger_mask()
    assert mask[-3:, -3:].all() and int(mask.sum()) == 9
    patch = attack.pattern[:, -3:, -3:]
    assert torch.equal(patch[0], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    assert make("patched", margin=2).trigger_mask()[-5:-2, -5:-2].all()


def test_blended_formula_exact():
    x, y = data()
    attack = make("blended")
    assert attack.trigger_mask() is None
    bd = attack.backdoor_test(x, y)
    expect = (1 - 0.1) * x[bd.index] + 0.1 * attack.pattern
    assert torch.equal(bd.x, expect)
    assert attack.pattern.shape == (3, 16, 16)
    assert not torch.equal(attack.pattern, make("blended", seed=1).pattern)


def test_blended_image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "trigger.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(path)
    attack = make("blended", image=str(path))
    assert torch.allclose(attack.pattern[0], torch.ones(16, 16)) and attack.pattern[1:].abs().max() < 1e-6
    with pytest.raises(ConfigError, match="image"):
        make("blended", image=str(tmp_path / "missing.png"))


def test_sig_adds_only_the_sinusoid():
    x, y = data()
    x[:4] = 0.0  # force clipping at 0 and at 1
    x[4:8] = 1.0
    attack = make("sig")
    out = attack.apply_trigger(x)
    assert out.min() >= 0 and out.max() <= 1
    j = torch.arange(16, dtype=torch.float64)
    b = ((20 / 255) * torch.sin(2 * torch.pi * j * 6 / 16)).float()
    assert torch.allclose(attack.pattern, b.expand(3, 16, 16))
    assert torch.equal(out, (x + attack.pattern).clamp(0, 1))


def test_warped_constant_identity_textured_changes():
    attack = make("warped")
    const = torch.full((4, 3, 16, 16), 0.37)
    assert torch.allclose(attack.apply_trigger(const), const, atol=1e-5)
    x, _ = data(n=8)
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and (out - x).abs().max() > 0.05
    assert torch.allclose(make("warped", strength=0.0).apply_trigger(x), x, atol=1e-5)  # identity grid
    assert not torch.equal(attack.grid, make("warped", seed=1).grid)
    assert make("warped", shape=(1, 12, 20)).apply_trigger(torch.rand(2, 1, 12, 20)).shape == (2, 1, 12, 20)


def test_warped_noise_mode_hook_changes_only_cross():
    x, y = data()
    attack = make("warped", noise_mode=True)
    out = attack.poison_train(x, y)
    n_poison = int(out.poison.sum())
    assert int(out.cross.sum()) == round(2 * n_poison)
    assert not (out.cross & out.poison).any()
    assert torch.equal(out.x[out.cross], x[out.cross]) and torch.equal(out.y[out.cross], y[out.cross])
    gen = torch.Generator().manual_seed(5)
    batch = attack.train_batch_hook(out.x, out.cross, gen)
    changed = (batch != out.x).flatten(1).any(1)
    assert torch.equal(changed, out.cross)
    # the noise differs from the plain backdoor warp, and is fresh per call
    assert not torch.allclose(batch[out.cross], attack.apply_trigger(out.x[out.cross]))
    assert not torch.equal(batch, attack.train_batch_hook(out.x, out.cross, gen))
    plain = make("warped")  # without noise mode the hook is the identity
    assert plain.train_batch_hook(out.x, out.cross, gen) is out.x


@pytest.mark.parametrize("name", ["patched", "blended", "sig"])
def test_default_hook_is_identity(name):
    x, _ = data(n=4)
    assert torch.equal(make(name).train_batch_hook(x, torch.ones(4, dtype=torch.bool), None), x)


def test_all_to_one_labels_and_backdoor_set():
    x, y = data()
    attack = make("patched", target=3)
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == round(0.1 * 64)
    assert (y[out.poison] != 3).all() and (out.y[out.poison] == 3).all()
    bd = attack.backdoor_test(x, y)
    assert isinstance(bd, BackdoorTestSet)
    assert torch.equal(bd.index, (y != 3).nonzero().flatten())
    assert (bd.y_target == 3).all() and torch.equal(bd.y_true, y[bd.index])
    assert torch.equal(bd.x, attack.apply_trigger(x[bd.index]))


def test_one_to_one_counts_from_source_class():
    x, y = data(n=200)
    attack = make("sig", mode="one_to_one", source=2, target=5, poison_rate=0.3)
    out = attack.poison_train(x, y)
    n_src = int((y == 2).sum())
    assert int(out.poison.sum()) == round(0.3 * n_src)
    assert (y[out.poison] == 2).all() and (out.y[out.poison] == 5).all()
    bd = attack.backdoor_test(x, y)
    assert torch.equal(bd.index, (y == 2).nonzero().flatten()) and (bd.y_target == 5).all()


def test_all_to_all_shifts_labels():
    x, y = data()
    attack = make("blended", mode="all_to_all", poison_rate=0.25)
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == round(0.25 * 64)
    assert torch.equal(out.y[out.poison], (y[out.poison] + 1) % K)
    bd = attack.backdoor_test(x, y)
    assert len(bd.index) == len(y) and torch.equal(bd.y_target, (y + 1) % K)


def test_clean_label_keeps_labels_and_poisons_target_only():
    x, y = data(n=200)
    attack = make("patched", label_mode="clean", poison_rate=0.05)
    out = attack.poison_train(x, y)
    assert int(out.poison.sum()) == round(0.05 * 200)
    assert (y[out.poison] == 0).all() and torch.equal(out.y, y)
    with pytest.raises(ConfigError, match="target-class"):
        make("patched", label_mode="clean", poison_rate=0.5).poison_train(x, y)


def test_append_grows_and_keeps_originals():
    x, y = data()
    attack = make("patched", inject="append", mode="all_to_all")
    out = attack.poison_train(x, y)
    n = round(0.1 * 64)
    assert len(out.x) == len(out.y) == len(out.poison) == len(out.cross) == 64 + n
    assert torch.equal(out.x[:64], x) and torch.equal(out.y[:64], y) and not out.poison[:64].any()
    assert out.poison[64:].all() and torch.equal(out.y[64:], (out.y_true[64:] + 1) % K)
    # each appended copy is the trigger applied to some original with that true label
    replaced = make("patched", mode="all_to_all").poison_train(x, y)
    assert torch.equal(out.x[64:], replaced.x[replaced.poison])


def test_none_attack():
    x, y = data()
    attack = make("none")
    out = attack.poison_train(x, y)
    assert not out.poison.any() and torch.equal(out.x, x) and torch.equal(out.y, y)
    bd = attack.backdoor_test(x, y)
    assert bd.x.shape == (0, 3, 16, 16) and bd.y_target.shape == bd.y_true.shape == bd.index.shape == (0,)
    assert bd.index.dtype == torch.long and torch.equal(attack.apply_trigger(x), x)
    assert attack.trigger_mask() is None


@pytest.mark.parametrize("name", NAMES[1:])
def test_determinism(name):
    x, y = data()
    over = {"location": "random", "pattern": "random"} if name == "patched" else {}
    a, b = make(name, seed=7, **over).poison_train(x, y), make(name, seed=7, **over).poison_train(x, y)
    for field in ("x", "y", "y_true", "poison", "cross"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    c = make(name, seed=8, **over).poison_train(x, y)
    assert not torch.equal(a.poison, c.poison)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"mode": "one_to_one"}, "source"),
        ({"mode": "one_to_one", "source": 0}, "source"),
        ({"target": 10}, "target"),
        ({"target": -1}, "target"),
        ({"poison_rate": 1.5}, "poison_rate"),
        ({"poison_rate": -0.1}, "poison_rate"),
        ({"label_mode": "clean", "mode": "all_to_all"}, "label_mode"),
        ({"mode": "some_to_some"}, "mode"),
        ({"inject": "insert"}, "inject"),
        ({"label_mode": "grey"}, "label_mode"),
        ({"source": 3}, "source"),
        ({"bogus": 1}, "bogus"),
        ({"alpha": 0.1}, "alpha"),  # a blended key is unknown to patched
        ({"size": 0}, "size"),
        ({"size": 17}, "size"),
        ({"location": "center"}, "location"),
        ({"pattern": "stripes"}, "pattern"),
    ],
)
def test_config_errors(over, key):
    with pytest.raises(ConfigError, match=key):
        make("patched", **over)


def test_config_errors_specific_and_rounding():
    with pytest.raises(ConfigError, match="alpha"):
        make("blended", alpha=2.0)
    with pytest.raises(ConfigError, match="grid_k"):
        make("warped", grid_k=1)
    with pytest.raises(ConfigError, match="unknown attack"):
        build_attack(OmegaConf.create({"name": "nope"}), K, (3, 16, 16), 0)
    x, y = data(n=20)
    with pytest.raises(ConfigError, match="rounds to 0"):
        make("sig", poison_rate=0.01).poison_train(x, y)
    assert not make("sig", poison_rate=0.0).poison_train(x, y).poison.any()
    with pytest.raises(ValueError, match="shape"):
        make("sig").poison_train(torch.rand(4, 3, 8, 8), y[:4])
