"""Attacks whose trigger is optimized against a clean reference model (bdexp/attacks/optimized.py):
`lf` (Zeng et al. ICCV 2021), `trojannn` (Liu et al. NDSS 2018), `narcissus` (Zeng et al. CCS 2023).

A small ConvNet trained for 40 steps on a synthetic task (one smooth pattern per class plus noise;
~100 % held-out accuracy) stands in for the reference model."""
from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from bdexp.attacks import ATTACKS, build_attack
from bdexp.attacks.base import AttackServices
from bdexp.attacks.lf import gaussian_kernel, lowpass, rescale, targeted_deepfool
from bdexp.attacks.trojannn import most_connected_neurons
from bdexp.cache import ModelCache
from bdexp.errors import ConfigError
from bdexp.models import build_for
from tests.test_attacks import K, attack_cfg, make

NAMES = ["lf", "trojannn", "narcissus"]
SHAPE = (3, 16, 16)
# Iteration counts small enough for tests (each optimization well under a second here).
FAST = {"lf": {"sigma": 2.0, "n_images": 40, "max_passes": 1},
        "trojannn": {"size": 10, "steps": 40},
        "narcissus": {"epochs": 30, "poison_rate": 0.01}}


@pytest.fixture(autouse=True, scope="module")
def _setup():
    """One thread (single-image steps, DeepFool's and TrojanNN's, run ~10x slower with 2 threads on
    shared cores) and the two reference models, trained once (~0.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _trained_state(K, 0.25)
    _trained_state(3, 0.1)
    yield
    torch.set_num_threads(threads)


def task(n: int = 320, seed: int = 0, k: int = K, amp: float = 0.25, c: int = 3, hw: int = 16
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """k classes: x = clip(0.5 + amp·p_y + N(0, 0.15²) noise), p_y a fixed smooth pattern in [−1, 1]."""
    protos = torch.rand(k, c, 4, 4, generator=torch.Generator().manual_seed(123)) * 2 - 1
    protos = F.interpolate(protos, size=(hw, hw), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    return (0.5 + amp * protos[y] + 0.15 * torch.randn(n, c, hw, hw, generator=g)).clamp(0, 1), y


@lru_cache(maxsize=None)
def _trained_state(k: int, amp: float) -> dict:
    torch.manual_seed(0)
    x, y = task(k=k, amp=amp)
    model = build_for({"name": "convnet", "width": 0.25}, x, num_classes=k)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {name: v.clone() for name, v in model.state_dict().items()}


def reference(k: int = K, amp: float = 0.25) -> torch.nn.Module:
    """A fresh copy of the reference model trained on `task(k=k, amp=amp)`, in eval mode."""
    model = build_for({"name": "convnet", "width": 0.25}, task(k=k, amp=amp)[0], num_classes=k)
    model.load_state_dict(_trained_state(k, amp))
    return model.eval()


def optimized(name: str, seed: int = 0, model: torch.nn.Module | None = None, **over):
    """The attack with its trigger optimized on the task's training images (as `attach` does)."""
    attack = make(name, shape=SHAPE, seed=seed, **{**FAST[name], **over})
    x, y = task()
    xo, yo = attack.optimization_data(x, y)
    g = torch.Generator().manual_seed(seed)
    attack.set_trigger(attack.optimize(model if model is not None else reference(), xo, yo, torch.device("cpu"), g))
    return attack


def target_rate(model: torch.nn.Module, x: torch.Tensor, target: int = 0) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == target).float().mean())


def high_frequency_share(delta: torch.Tensor, radius: float = 4.0) -> float:
    """Share of δ's (mean-removed) spectral energy above `radius` cycles per image side: the 2-D DFT
    of δ mirrored to 2H × 2W (a DCT, so the image border is no jump), radius doubled to match."""
    d = torch.cat([delta, delta.flip(-1)], -1)
    d = torch.cat([d, d.flip(-2)], -2)
    spec = torch.fft.fft2(d - d.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    h, w = d.shape[-2:]
    fy = torch.fft.fftfreq(h) * h
    fx = torch.fft.fftfreq(w) * w
    high = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() > 2 * radius
    return float(spec[..., high].sum() / spec.sum())


# ---------------------------------------------------------------------------- all three
def test_registered_with_yaml_defaults():
    for name in NAMES:
        c = attack_cfg(name)
        attack = make(name, shape=SHAPE)
        assert name in ATTACKS.names() and c.name == name
        assert set(c) - {"name"} == set(attack.opts.as_dict())
    assert make("lf").opts.poison_rate == 0.1 and make("trojannn").opts.label_mode == "dirty"


@pytest.mark.parametrize("name", NAMES)
def test_trigger_needed_before_use(name):
    x, y = task(n=20)
    with pytest.raises(RuntimeError, match="no trigger yet"):
        make(name, shape=SHAPE).apply_trigger(x)


@pytest.mark.parametrize("name", NAMES)
def test_attach_optimizes_once_then_hits_the_cache(name, tmp_path):
    x, y = task()
    x8 = (x * 255).round().to(torch.uint8)
    calls = []

    def clean_model():
        calls.append(1)
        return reference()

    services = AttackServices(device=lambda: torch.device("cpu"), clean_model=clean_model,
                              train_data=lambda: (x8, y),
                              trigger_cache=lambda: ModelCache(str(tmp_path), kind="triggers"))
    fast = {**FAST[name], "n_images": 16} if name == "lf" else FAST[name]
    first = make(name, shape=SHAPE, **fast)
    first.attach(services)
    again = make(name, shape=SHAPE, **fast)
    again.attach(services)
    assert first.state_record()["trigger_cache"] == "miss" and again.state_record()["trigger_cache"] == "hit"
    assert len(calls) == 2  # each attach asks for the reference model: the key hashes its weights
    assert first.state_record()["trigger_sha256"] == again.state_record()["trigger_sha256"]
    for key, t in first.trigger.items():
        assert torch.equal(t, again.trigger[key])
    (img,) = first.state_images().values()
    assert img.shape == SHAPE and img.min() >= 0 and img.max() <= 1
    out = first.poison_train(x, y)
    assert out.x.min() >= 0 and out.x.max() <= 1 and torch.equal(out.y_true, y)
    other = make(name, shape=SHAPE, seed=1, **fast)
    other.attach(services)
    assert other.state_record()["trigger_key"] != first.state_record()["trigger_key"]


# ---------------------------------------------------------------------------- lf
def test_lf_filter_known_answers():
    e = math.exp(-0.5)
    assert torch.allclose(gaussian_kernel(1.0, 3), torch.tensor([e, 1, e]) / (1 + 2 * e))
    impulse = torch.zeros(1, 5, 5)
    impulse[0, 2, 2] = 1
    k = gaussian_kernel(1.0, 3)
    expect = torch.zeros(5, 5)
    expect[1:4, 1:4] = k[:, None] * k[None, :]
    assert torch.allclose(lowpass(impulse, 1.0, 3)[0], expect, atol=1e-7)
    for window in (2, 3, 30):  # even windows pad one less before than after: the size is kept
        assert lowpass(torch.rand(2, 3, 16, 16), 6.0, window).shape == (2, 3, 16, 16)
    assert torch.allclose(rescale(torch.tensor([[1.0, 3.0], [2.0, 5.0]]), 0.2), torch.tensor([[0, 0.1], [0.05, 0.2]]))
    assert torch.equal(rescale(torch.full((2, 2), 0.7), 0.2), torch.zeros(2, 2))
    assert make("lf").window == 30  # int(5·6): the authors' kernel_size


def test_deepfool_linear_model_one_step():
    """f(x) = x (two logits): from (0.3, 0.1) to class 1, r = 0.2/2·(−1, 1), times 1.02."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    r, reached = targeted_deepfool(model, torch.tensor([[[[0.3, 0.1]]]]), 1, 0.02, 200)
    assert reached and torch.allclose(r.flatten(), torch.tensor([-0.102, 0.102]))
    r, reached = targeted_deepfool(model, torch.tensor([[[[0.3, 0.1]]]]), 0, 0.02, 200)
    assert reached and torch.equal(r, torch.zeros_like(r))  # already the target


def test_lf_trigger_is_smooth_bounded_and_sends_to_target():
    """On a 3-class task with close classes (amp 0.1) a universal direction towards the target exists;
    the 10-class task's classes are too far apart for δ's 0.2 range (its target rate stays put)."""
    model = reference(k=3, amp=0.1)
    attack = build_attack(attack_cfg("lf", **FAST["lf"]), num_classes=3, image_shape=SHAPE, seed=0)
    x, y = task(k=3, amp=0.1)
    attack.set_trigger(attack.optimize(model, *attack.optimization_data(x, y), torch.device("cpu"),
                                       torch.Generator().manual_seed(0)))
    delta = attack.trigger["delta"]
    assert delta.shape == SHAPE and float(delta.min()) == 0 and math.isclose(float(delta.max()), 0.2, rel_tol=1e-6)
    shuffled = delta.flatten()[torch.randperm(delta.numel(), generator=torch.Generator().manual_seed(0))].view_as(delta)
    # σ = 2 px passes ~exp(−4π²σ²r²/H²) of the power at r cycles per side: 5e-5 at r = 4 (edges add a little)
    assert high_frequency_share(delta) < 0.005 and high_frequency_share(shuffled) > 0.5
    x_test, _ = task(n=200, seed=7, k=3, amp=0.1)
    clean = target_rate(model, x_test)
    lf = target_rate(model, attack.apply_trigger(x_test))
    rand = target_rate(model, (x_test + shuffled).clamp(0, 1))  # the same values: the same norms, any p
    assert lf > rand + 0.1 and lf > clean + 0.1
    assert torch.equal(attack.apply_trigger(x_test), (x_test + delta).clamp(0, 1))
    assert attack.trigger_mask() is None


def test_lf_deterministic_per_seed():
    a, b, c = optimized("lf"), optimized("lf"), optimized("lf", seed=1)
    assert torch.equal(a.trigger["delta"], b.trigger["delta"])
    assert not torch.equal(a.trigger["delta"], c.trigger["delta"])


@pytest.mark.parametrize("over", [{"eps": 0}, {"eps": 1.5}, {"sigma": 0}, {"window": 0}, {"n_images": 0},
                                  {"max_passes": 0}, {"fooling_rate": 2}])
def test_lf_bad_options(over):
    with pytest.raises(ConfigError):
        make("lf", **over)


# ---------------------------------------------------------------------------- trojannn
def test_trojannn_neuron_criterion_on_a_hand_built_layer():
    w = torch.tensor([[1.0, -5.0, 0.5, 0.0], [2.0, 1.0, -0.1, 0.0]])  # Σ_j |W[j, i]| = 3, 6, 0.6, 0
    assert most_connected_neurons(w, 1).tolist() == [1]
    assert most_connected_neurons(w, 3).tolist() == [1, 0, 2]
    model = reference()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[:, 7] = torch.linspace(-1, 1, K)
        model.fc.weight[0, 11] = 3.0  # one large weight (sum 3) below column 7's sum 5.56
    attack = make("trojannn", shape=SHAPE, num_neurons=2)
    assert attack.select_neurons(model).tolist() == [7, 11]
    with pytest.raises(ConfigError, match="num_neurons"):
        make("trojannn", shape=SHAPE, num_neurons=33).select_neurons(model)  # width 0.25: 32 neurons


def test_trojannn_patch_excites_the_chosen_neurons():
    model = reference()
    attack = optimized("trojannn", model=model)
    neurons = attack.trigger["neurons"].long()
    assert neurons.tolist() == most_connected_neurons(model.fc.weight, 2).tolist()
    init = (torch.tanh(attack.initial_param(torch.Generator().manual_seed(0))) + 1) / 2
    with torch.no_grad():
        before = attack.neuron_values(model, init, neurons)
        after = attack.neuron_values(model, attack.trigger["patch"], neurons)
    assert float(after.sum()) > 2.5 * float(before.sum()) and (after > before).all()  # measured: 4.7 -> 13.1
    patch = attack.trigger["patch"]
    assert patch.shape == (3, 10, 10) and patch.min() >= 0 and patch.max() <= 1
    assert attack.state_record()["neurons"] == neurons.tolist()


def test_trojannn_stamps_only_inside_the_corner_mask():
    attack = optimized("trojannn", steps=5)
    x, y = task(n=60)
    mask = attack.trigger_mask()
    assert mask[-10:, -10:].all() and int(mask.sum()) == 100
    out = attack.apply_trigger(x)
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert torch.equal(out[:, :, -10:, -10:], attack.trigger["patch"].expand(60, -1, -1, -1))
    train = attack.poison_train(x, y)  # dirty label, all-to-one: round(0.1 · 60) non-target rows -> target
    assert int(train.poison.sum()) == 6 and (train.y[train.poison] == 0).all() and (y[train.poison] != 0).all()


def test_trojannn_default_size_and_bad_options():
    assert make("trojannn", shape=(3, 32, 32)).size == 6  # round(44/224 · 32)
    assert make("trojannn", shape=(1, 16, 16)).size == 3  # round(44/224 · 16)
    assert make("trojannn", shape=(3, 32, 32), margin=3).trigger_mask()[-9:-3, -9:-3].all()
    for over in ({"size": 17}, {"size": 14, "margin": 3}, {"steps": -1}, {"lr": 0}, {"num_neurons": 0}):
        with pytest.raises(ConfigError):
            make("trojannn", shape=SHAPE, **over)


def test_trojannn_deterministic_per_seed():
    a, b, c = optimized("trojannn", steps=5), optimized("trojannn", steps=5), optimized("trojannn", steps=5, seed=1)
    assert torch.equal(a.trigger["patch"], b.trigger["patch"])
    assert not torch.equal(a.trigger["patch"], c.trigger["patch"])


# ---------------------------------------------------------------------------- narcissus
def test_narcissus_default_budget_is_25_of_cifar10():
    attack = make("narcissus")
    assert (attack.opts.poison_rate, attack.budget, attack.label_mode) == (0.0005, "dataset", "clean")
    y = torch.arange(50_000) % K
    ((candidates, n),) = attack.quotas(y)
    assert n == 25 and (y[candidates] == 0).all() and len(candidates) == 5000
    assert math.isclose(attack.opts.eps, 16 / 255) and attack.opts.test_multiplier == 3


def test_narcissus_trigger_lowers_the_target_loss_and_poisons_clean_label():
    model = reference()
    attack = optimized("narcissus", model=model)
    delta = attack.trigger["delta"]
    assert delta.shape == SHAPE and float(delta.abs().max()) <= 16 / 255 + 1e-7
    x, y = task()
    xt = x[y == 0]
    with torch.no_grad():
        zero = F.cross_entropy(model(xt), torch.zeros(len(xt), dtype=torch.long))
        with_delta = F.cross_entropy(model((xt + delta).clamp(0, 1)), torch.zeros(len(xt), dtype=torch.long))
    assert float(with_delta) < 0.5 * float(zero)
    out = attack.poison_train(x, y)
    assert torch.equal(out.y, y) and torch.equal(out.y_true, y)  # clean label
    assert int(out.poison.sum()) == round(0.01 * len(y)) and (y[out.poison] == 0).all()
    assert torch.equal(out.x[out.poison], (x[out.poison] + delta).clamp(0, 1))  # unmagnified
    assert torch.equal(out.x[~out.poison], x[~out.poison])
    bd = attack.backdoor_test(x, y)
    assert torch.equal(bd.x, (x[y != 0] + 3 * delta).clamp(0, 1))  # magnified at test time
    five = make("narcissus", shape=SHAPE, **FAST["narcissus"], test_multiplier=5.0)
    five.set_trigger(attack.trigger)
    assert torch.equal(five.apply_trigger(x), (x + 5 * delta).clamp(0, 1))
    assert torch.equal(attack.apply_trigger(x), (x + 3 * delta).clamp(0, 1))  # poison_train restored m


def test_narcissus_test_multiplier_is_not_in_the_trigger_key():
    model = reference()
    x, y = task()
    base = make("narcissus", shape=SHAPE)
    xo, yo = base.optimization_data(x, y)
    assert (yo == 0).all() and len(yo) == (y == 0).sum()
    ident = base.trigger_identity(model, xo, yo)
    assert make("narcissus", shape=SHAPE, test_multiplier=5.0).trigger_identity(model, xo, yo) == ident
    assert make("narcissus", shape=SHAPE, poison_rate=0.01).trigger_identity(model, xo, yo) == ident
    assert make("narcissus", shape=SHAPE, eps=8 / 255).trigger_identity(model, xo, yo) != ident


def test_narcissus_warmup_leaves_the_reference_model_alone():
    model = reference()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = make("narcissus", shape=SHAPE, epochs=3, warmup_epochs=2)
    x, y = task()
    xo, _ = attack.optimization_data(x, y)
    warm = attack.surrogate(model, xo, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert warm is not model and not warm.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(warm.fc.weight, model.fc.weight)
    assert make("narcissus", shape=SHAPE).surrogate(model, xo, torch.device("cpu"), torch.Generator()) is model
    delta = attack.optimize(model, xo, y[y == 0], torch.device("cpu"), torch.Generator().manual_seed(0))["delta"]
    assert float(delta.abs().max()) <= 16 / 255 + 1e-7


def test_narcissus_deterministic_and_bad_options():
    a, b = optimized("narcissus", epochs=5), optimized("narcissus", epochs=5)
    assert torch.equal(a.trigger["delta"], b.trigger["delta"])
    for over in ({"label_mode": "dirty"}, {"eps": 0}, {"test_multiplier": 0}, {"epochs": -1}, {"lr": 0}):
        with pytest.raises(ConfigError):
            make("narcissus", **over)
    with pytest.raises(ConfigError, match="rounds to 0"):  # the paper's 0.05 % of 320 images
        optimized("narcissus", epochs=1, poison_rate=0.0005).poison_train(*task())
