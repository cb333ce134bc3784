"""`clbd` (ISPL §4.1, App. B after Turner et al.): stamp(PGD(x)) on target-class images, labels
kept; only the corner checkerboards at test time, on every non-target image by default; the pipeline
supplies a cached clean reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bdexp import pipeline
from bdexp.attacks import ATTACKS, build_attack
from bdexp.attacks.clbd import DEFAULT_EPS
from bdexp.data.loader import to_float, to_uint8
from bdexp.errors import ConfigError
from tests.test_attacks import attack_cfg

K, HW = 10, 16
CHECKER = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])


def make(seed: int = 0, k: int = K, **over):
    return build_attack(attack_cfg("clbd", **over), num_classes=k, image_shape=(3, HW, HW), seed=seed)


def data(n: int = 200, seed: int = 0):
    """Each class a random prototype image plus noise, so a linear model can learn it."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(K, 3, HW, HW, generator=g)
    y = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    x = (protos[y] + 0.2 * torch.randn(n, 3, HW, HW, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def reference():
    """A tiny clean reference model: a linear classifier fitted for a few dozen steps."""
    x, y = data(seed=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * HW * HW, K))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def attached(reference, **over):
    attack = make(**over)
    attack.set_reference_model(reference, "cpu")
    return attack


def loss(model, x, y):
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y).item()


def test_registered_yaml_lists_every_key_and_scenario_defaults():
    assert "clbd" in ATTACKS.names()
    c = attack_cfg("clbd")
    attack = make()
    assert set(c) - {"name"} == set(attack.opts.as_dict())
    # ISPL §4.1 measures "misclassify an image from any non-source class": all_to_one, source null
    assert attack.label_mode == "clean" and attack.mode == "all_to_one" and c.scenario == 0
    assert (attack.source, attack.target) == (None, 2)  # ISPL scenario 0's target (bird)
    assert attack.budget == "class" and "target class 2" in attack.budget_rule
    one = make(mode="one_to_one")  # the scenario's source comes back with one_to_one
    assert (one.source, one.target) == (0, 2)
    assert attack.eps == pytest.approx(8 / 255) and attack.step_size == pytest.approx(2 / 255)
    assert attack.steps == 10


def test_clbd_asks_the_pipeline_for_its_clean_model_through_attach():
    """The pipeline knows no attack: clbd takes its reference model from AttackServices, which
    trains it only when called; an attack that needs nothing never calls it."""
    from bdexp.attacks import build_attack
    from bdexp.attacks.base import AttackServices

    asked = []
    reference = torch.nn.Linear(1, 1)

    def clean_model():
        asked.append(1)
        return reference

    services = AttackServices(device=lambda: torch.device("cpu"), clean_model=clean_model)
    attack = make()
    attack.attach(services)
    assert asked == [1] and attack._model is reference
    build_attack(attack_cfg("patched"), num_classes=10, image_shape=(3, 8, 8), seed=0).attach(services)
    assert asked == [1]


def test_poison_train_without_reference_model_raises():
    x, y = data()
    with pytest.raises(RuntimeError, match="reference model"):
        make().poison_train(x, y)


def test_trigger_is_a_checkerboard_in_all_four_corners():
    attack = make()
    out = attack.apply_trigger(torch.full((2, 3, HW, HW), 0.5))
    for rows in (slice(0, 3), slice(HW - 3, HW)):
        for cols in (slice(0, 3), slice(HW - 3, HW)):
            assert torch.equal(out[:, :, rows, cols], CHECKER.expand(2, 3, 3, 3))
    assert int(attack.trigger_mask().sum()) == 4 * 9
    assert (out[:, :, ~attack.trigger_mask()] == 0.5).all()


def test_poisons_only_target_class_labels_kept_within_eps(reference):
    x, y = data()
    attack = attached(reference, poison_rate=0.25)
    out = attack.poison_train(x, y)
    mask = attack.trigger_mask()
    assert torch.equal(out.y, y) and torch.equal(out.y_true, y)  # clean label
    assert (y[out.poison] == attack.target).all()
    assert int(out.poison.sum()) == round(0.25 * int((y == attack.target).sum()))  # of the target class
    assert torch.equal(out.x[~out.poison], x[~out.poison])
    delta = (out.x - x)[out.poison][:, :, ~mask]
    assert delta.abs().max() <= attack.eps + 1e-6 and delta.abs().max() > attack.eps / 2
    quantized = (to_float(to_uint8(out.x)) - x)[out.poison][:, :, ~mask]  # as the pipeline stores it
    assert quantized.abs().max() <= attack.eps + 0.5 / 255 + 1e-6
    corners = out.x[out.poison][:, :, mask]
    assert torch.equal(corners, attack.pattern[:, mask].expand_as(corners))
    # PGD maximises the reference model's loss on the true label
    xp, yp = x[out.poison], y[out.poison]
    assert loss(reference, attack.perturb(xp, yp), yp) > loss(reference, xp, yp) + 0.1
    assert loss(reference, out.x[out.poison], yp) > loss(reference, xp, yp) + 0.1


def test_l2_perturbation_within_the_l2_ball(reference):
    x, y = data()
    attack = attached(reference, pgd_norm="l2", pgd_eps=0.5)
    xp, yp = x[y == attack.target], y[y == attack.target]
    adv = attack.perturb(xp, yp)
    assert (adv - xp).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert loss(reference, adv, yp) > loss(reference, xp, yp)
    assert make(pgd_norm="l2").eps == pytest.approx(DEFAULT_EPS["l2"])


def test_backdoor_test_set_is_the_stamp_only():
    x, y = data()
    attack = make()  # no reference model needed at test time
    bd = attack.backdoor_test(x, y)
    assert torch.equal(bd.index, (y != 2).nonzero().flatten())  # default: any non-target image
    assert (bd.y_target == attack.target).all() and torch.equal(bd.y_true, y[bd.index])
    mask = attack.trigger_mask()
    assert torch.equal(bd.x[:, :, ~mask], x[bd.index][:, :, ~mask])
    assert torch.equal(bd.x[:, :, mask], attack.pattern[:, mask].expand(len(bd.x), -1, -1))
    source_only = make(mode="one_to_one").backdoor_test(x, y)  # scenario 0's source images
    assert torch.equal(source_only.index, (y == 0).nonzero().flatten())


def test_append_keeps_originals_and_is_deterministic(reference):
    x, y = data()
    out = attached(reference, inject="append", poison_rate=0.5).poison_train(x, y)
    n = round(0.5 * int((y == 2).sum()))
    assert len(out.y) == len(y) + n and out.poison[len(y):].all() and not out.poison[: len(y)].any()
    assert torch.equal(out.x[: len(y)], x) and (out.y[len(y):] == 2).all()
    again = attached(reference, inject="append", poison_rate=0.5).poison_train(x, y)
    assert torch.equal(out.x, again.x)


@pytest.mark.parametrize(
    "over, key",
    [
        ({"label_mode": "dirty"}, "label_mode"),
        ({"pgd_norm": "l1"}, "pgd_norm"),
        ({"size": 9}, "size"),
        ({"pgd_steps": -1}, "pgd_steps"),
        ({"pgd_eps": -0.1}, "pgd_eps"),
        ({"mode": "all_to_all"}, "label_mode"),
        ({"budget": "dataset"}, "budget"),
        ({"source": 0}, "source"),  # all_to_one (the default) takes no source
    ],
)
def test_config_errors(over, key):
    with pytest.raises(ConfigError, match=key):
        make(**over)


def test_pipeline_run_end_to_end_and_shares_the_cached_reference(tiny_cfg, tmp_path):
    # On the easy synthetic data ε = 8/255 cannot make the target images hard (the clean-label
    # backdoor is not learned, as with the stamp alone); a large ε (Turner et al. went to 32/255) can.
    over = ("attack=clbd", "attack.scenario=null", "attack.target=1", "attack.pgd_eps=0.25",
            "attack.poison_rate=1.0")
    out = pipeline.run(tiny_cfg(*over, cache=True), tmp_path / "run")
    metrics = {r["metric"]: r["value"] for r in out["metrics"] if "defense" not in r and "analysis" not in r}
    assert metrics["ba"] > 0.9 and metrics["asr"] > 0.8 and out["run"]["n_poison"] > 0
    models = tmp_path / "cache" / "models"
    assert len(list(models.glob("*.pt"))) == 2  # the clean reference + the run's model
    # Another rate and norm reuse the cached reference: prepare trains nothing new.
    cfg = tiny_cfg(*over[:-1], "attack.poison_rate=0.25", "attack.pgd_norm=l2", cache=True)
    data, attack, train, _ = pipeline.prepare(cfg)
    assert len(list(models.glob("*.pt"))) == 2
    assert torch.equal(train.y, data.y_train.long()) and (train.y[train.poison] == 1).all()
