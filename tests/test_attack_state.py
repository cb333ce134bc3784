"""Attacks with state (docs/attacks.md, "Learned and optimized triggers"): a co-trained generator is
checkpointed and cached with the classifier, the sets come from its final state, and an optimized
trigger is content-addressed and reused."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from bdexp import pipeline
from bdexp.attacks import build_attack
from bdexp.attacks.base import AttackOptions, AttackServices
from bdexp.attacks.iad import InputAwareAttack
from bdexp.attacks.optimized import OptimizedTriggerAttack
from bdexp.cache import ModelCache
from bdexp.errors import ConfigError
from bdexp.jobs import Interrupted
from bdexp.options import option
from tests.conftest import compose_cfg, with_tiny

# A small IAD: 4-channel one-step generators, one mask epoch (0.34 × 3), three classifier epochs.
IAD = ("attack=iad", "attack.channels=4", "attack.steps=1", "attack.mask_epoch_ratio=0.34", "train.epochs=3",
       "dataset.train_size=160", "dataset.test_size=48", "attack.poison_rate=0.125")


def _experiment(cache_dir, *extra):
    cfg = compose_cfg(with_tiny(*IAD, *extra), cache_dir)
    return pipeline.build_experiment(cfg, torch.device("cpu"), None)


def _net_state(attack):
    return {k: v.clone() for k, v in attack.nets.state_dict().items()}


def test_the_generator_is_trained_and_the_sets_come_from_its_final_state(tmp_path):
    cfg = compose_cfg(with_tiny(*IAD), None)
    fresh = build_attack(cfg.attack, num_classes=4, image_shape=(3, 16, 16), seed=int(cfg.seed))
    exp, info = _experiment(tmp_path / "c")
    before, after = _net_state(fresh), _net_state(exp.attack)
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training changed it
    # The backdoor test set is the final networks' trigger on the clean test images ...
    x = exp.data.x_test[exp.backdoor_test.index].float() / 255
    expected = (exp.attack.apply(x).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(exp.backdoor_test.x, expected)
    # ... not the initial networks'.
    fresh.end_training()
    assert not torch.equal(exp.backdoor_test.x, (fresh.apply(x).clamp(0, 1) * 255).round().to(torch.uint8))
    # The materialized training set: select's rows relabelled to the target, a cross share with labels kept.
    train = exp.train_set
    n = len(train.y)
    assert int(train.poison.sum()) == round(0.125 * n) and (train.y[train.poison] == 0).all()
    assert int(train.cross.sum()) == int(train.poison.sum()) and not (train.cross & train.poison).any()
    assert torch.equal(train.y[train.cross], train.y_true[train.cross])
    changed = (train.x != exp.data.x_train).flatten(1).any(1)
    assert changed[train.poison | train.cross].float().mean() > 0.9 and not changed[~(train.poison | train.cross)].any()
    assert info["history"]["epochs"] == 3


def test_a_cache_hit_restores_the_generator_bit_for_bit(tmp_path):
    first, info1 = _experiment(tmp_path / "c")
    second, info2 = _experiment(tmp_path / "c")
    assert (info1["cache"], info2["cache"]) == ("miss", "hit")
    assert torch.equal(first.backdoor_test.x, second.backdoor_test.x)
    assert torch.equal(first.train_set.x, second.train_set.x)
    assert first.attack.state_record() == second.attack.state_record()


def test_a_cached_model_without_its_attack_state_is_set_aside(tmp_path):
    _experiment(tmp_path / "c")
    store = ModelCache(tmp_path / "c")
    (path,) = store.root.glob("*.pt")
    record = torch.load(path, weights_only=True)
    record["attack_state"] = {k: v + 1 if v.is_floating_point() else v for k, v in record["attack_state"].items()}
    torch.save(record, path)  # the generator edited after storing: its digest no longer matches
    _, info = _experiment(tmp_path / "c")
    assert info["cache"] == "miss" and path.with_name(path.name + ".bad").exists()


def test_an_interrupted_run_resumes_the_generator_with_the_classifier(tmp_path, monkeypatch):
    reference, _ = _experiment(tmp_path / "uninterrupted")
    steps = len(reference.train_set.y) // 32  # batches per epoch (drop_last)
    calls = {"n": 0}
    original = InputAwareAttack.poison_batch

    def interrupting(self, model, batch):
        calls["n"] += 1
        if calls["n"] == steps + 2:  # in the middle of epoch 2: epoch 1 is checkpointed
            raise Interrupted(2)
        return original(self, model, batch)

    monkeypatch.setattr(InputAwareAttack, "poison_batch", interrupting)
    with pytest.raises(Interrupted):
        _experiment(tmp_path / "c")
    (ckpt,) = (tmp_path / "c" / "checkpoints").glob("*.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and state["attack"]["mask_done"]
    counted = {"batches": 0, "pretrain": 0}

    def counting(self, model, batch):
        counted["batches"] += 1
        return original(self, model, batch)

    def no_pretrain(self, loader, device):
        counted["pretrain"] += 1

    monkeypatch.setattr(InputAwareAttack, "poison_batch", counting)
    monkeypatch.setattr(InputAwareAttack, "pretrain", no_pretrain)
    torch.manual_seed(999)  # a new process: another global RNG state
    resumed, info = _experiment(tmp_path / "c")
    assert info["cache"] == "miss"
    # Only epochs 2 and 3 ran, and the mask network came from the checkpoint, not a new pre-training.
    assert counted == {"batches": 2 * steps, "pretrain": 0}
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert torch.equal(reference.backdoor_test.x, resumed.backdoor_test.x)


def test_iad_refuses_what_it_cannot_do():
    def make(**over):
        cfg = compose_cfg(with_tiny(*IAD, *[f"attack.{k}={v}" for k, v in over.items()]), None)
        return build_attack(cfg.attack, num_classes=4, image_shape=(3, 16, 16), seed=0)

    with pytest.raises(ConfigError, match="label_mode=dirty"):
        make(label_mode="clean")
    with pytest.raises(ConfigError, match="divide by 2"):
        make(steps=5)
    with pytest.raises(ConfigError, match="build_experiment"):
        pipeline.prepare(compose_cfg(with_tiny(*IAD), None))


# ---------------------------------------------------------------- optimized triggers
@dataclass(frozen=True)
class _MeanOptions(AttackOptions):
    scale: float = option(0.5, lo=0)


class _MeanTrigger(OptimizedTriggerAttack):
    """A stand-in whose 'optimized' trigger is scale × the reference model's first weight mean
    plus the data mean: a known answer that depends on the model and the data."""

    name = "mean_trigger"
    Options = _MeanOptions
    calls = 0

    def optimize(self, model, x, y, device, generator):
        type(self).calls += 1
        w = next(model.parameters()).detach().mean()
        return {"delta": torch.full(self.image_shape, float(self.opts.scale * w + x.mean()))}

    def apply_trigger(self, x):
        return (x + self.require_trigger()["delta"].to(x.device)).clamp(0, 1)


def _services(model, x, y, cache):
    return AttackServices(device=lambda: torch.device("cpu"), clean_model=lambda: model,
                          train_data=lambda: (x, y), trigger_cache=lambda: cache)


def test_an_optimized_trigger_is_content_addressed_and_reused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    x = (torch.rand(20, 3, 2, 2) * 255).to(torch.uint8)
    y = torch.randint(0, 2, (20,))
    cache = ModelCache(tmp_path, kind="triggers")

    def attach(scale=0.5, poison_rate=0.1, m=model, xs=x):
        attack = _MeanTrigger({"name": "mean_trigger", "scale": scale, "poison_rate": poison_rate}, 2, (3, 2, 2), 0)
        attack.attach(_services(m, xs, y, cache))
        return attack

    _MeanTrigger.calls = 0
    first = attach()
    expected = 0.5 * float(next(model.parameters()).detach().mean()) + float(x.float().div(255).mean())
    assert torch.allclose(first.trigger["delta"], torch.full((3, 2, 2), expected))
    assert first.state_record()["trigger_cache"] == "miss"
    # A sweep over the poison rate reuses it: the selection keys are not in its key.
    again = attach(poison_rate=0.2)
    assert _MeanTrigger.calls == 1 and again.state_record()["trigger_cache"] == "hit"
    assert torch.equal(again.trigger["delta"], first.trigger["delta"])
    assert again.state_record()["trigger_sha256"] == first.state_record()["trigger_sha256"]
    # Another option, other reference weights or other data: optimized again.
    attach(scale=0.25)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    attach(m=other)
    attach(xs=x.flip(0))
    assert _MeanTrigger.calls == 4
    # A stored trigger edited on disk is set aside, never served.
    (stored,) = [p for p in cache.root.glob("*.pt") if torch.load(p, weights_only=True)["meta"] and
                 torch.equal(torch.load(p, weights_only=True)["state_dict"]["delta"], first.trigger["delta"])]
    record = torch.load(stored, weights_only=True)
    record["state_dict"]["delta"] += 0.1
    torch.save(record, stored)
    attach()
    assert _MeanTrigger.calls == 5 and stored.with_name(stored.name + ".bad").exists()


@pytest.mark.parametrize("damage", ["dropped", "reshaped"])
def test_a_cached_model_whose_attack_state_is_missing_or_misshapen_is_set_aside(tmp_path, damage):
    from bdexp.cache import stored_digest

    _experiment(tmp_path / "c")
    (path,) = ModelCache(tmp_path / "c").root.glob("*.pt")
    record = torch.load(path, weights_only=True)
    if damage == "dropped":
        del record["attack_state"]
    else:
        name = next(k for k, v in record["attack_state"].items() if v.dim() == 4)
        record["attack_state"][name] = record["attack_state"][name][:, :1].clone()
    # a consistent record (digest recomputed), only its attack state does not fit the attack
    record["weights_sha256"] = stored_digest(record["state_dict"], record.get("attack_state"))
    torch.save(record, path)
    exp, info = _experiment(tmp_path / "c")
    assert info["cache"] == "miss" and path.with_name(path.name + ".bad").exists()
    assert exp.attack.state_record()["networks_sha256"]  # trained again, so it has its networks


def test_iad_history_keeps_the_cross_entropy_and_its_own_loss_apart(tmp_path):
    exp, info = _experiment(None, "train.epochs=2")
    history = info["history"]
    assert len(history["attack_loss"]) == 2 and all(v > 0 for v in history["attack_loss"])
    # the history's loss is the classifier's cross-entropy, the same scale as any attack's
    assert all(0 < v < 5 for v in history["loss"])
    # two classifier epochs still pre-train the mask network (round(0.34 · 2) = 1 epoch)
    assert exp.attack.mask_epochs == 1 and exp.attack.mask_done


def test_adap_cover_rows_are_not_the_defenders_clean_data():
    from bdexp.defenses.mitigation import MitigationOptions, clean_data

    cfg = compose_cfg(with_tiny("attack=adap_blend", "attack.poison_rate=0.05", "attack.cover_rate=0.1",
                                "train.epochs=1"), None)
    exp, _ = pipeline.build_experiment(cfg, torch.device("cpu"), None)
    ts = exp.train_set
    n_cover, n_poison = int(ts.cover.sum()), int(ts.poison.sum())
    assert n_cover == round(0.1 * len(ts.y)) and n_poison == round(0.05 * len(ts.y))
    x, y, _ = clean_data(exp, MitigationOptions(clean_ratio=1.0))  # every clean row there is
    assert len(y) == len(ts.y) - n_cover - n_poison
    clean = ~(ts.poison | ts.cover)
    assert torch.equal(torch.sort(x.flatten(1).sum(1)).values, torch.sort(ts.x[clean].flatten(1).sum(1)).values)


def test_a_run_saves_its_trigger_and_examples_as_images(tmp_path):
    from PIL import Image

    cfg = compose_cfg(with_tiny("attack=narcissus", "attack.poison_rate=0.01", "attack.epochs=2",
                                "train.epochs=1"), tmp_path / "cache")
    out = pipeline.run(cfg, tmp_path / "run")
    assert sorted(out["run"]["attack_images"]) == ["attack_examples.png", "attack_trigger.png"]
    state = out["run"]["attack_state"]
    assert state["trigger_cache"] == "miss" and len(state["trigger_sha256"]) == 64
    with Image.open(tmp_path / "run" / "attack_examples.png") as img:
        assert img.size[0] > img.size[1]  # 8 columns, 2 rows: clean over triggered
