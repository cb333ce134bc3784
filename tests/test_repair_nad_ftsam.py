"""NAD (bdexp/defenses/nad.py) and FT-SAM (bdexp/defenses/ftsam.py): the attention map and its
distances against direct computations, a frozen teacher, SAM's step against a hand computation, and
both mitigations end to end on the tiny run."""
from __future__ import annotations

import copy
import dataclasses
import signal

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp.cache import weights_digest
from bdexp.defenses import DEFENSES, run_defense
from bdexp.defenses.ftsam import FTSAMOptions, batchnorm_stats_kept, sam_step, smoothed_cross_entropy
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions, clean_data
from bdexp.defenses.nad import AttentionDistillation, attention_loss, attention_map
from bdexp.defenses.repair import repairer_fields
from bdexp.jobs import Interrupted
from bdexp.options import yaml_node
from bdexp.pipeline import build_experiment
from tests.conftest import compose_cfg, with_tiny

# the settings that keep each to about a second on the tiny run (tests/test_defender_view.py FAST)
FAST = {"nad": {"te_epochs": 2, "epochs": 2}, "ftsam": {"epochs": 2}}


@pytest.fixture(scope="module")
def run():
    cfg = compose_cfg(with_tiny("train.epochs=5", "sanitizer_reference_epochs=5", "eval_batch_size=64"), None)
    exp, _ = build_experiment(cfg, torch.device("cpu"), None)
    return exp


def context(run, checkpoints=None, **opts) -> MitigationContext:
    """A mitigation's context on the run's clean data (checkpoints: tag -> path, or none)."""
    x, y, _ = clean_data(run, MitigationOptions(**opts))
    fields = repairer_fields(run, x, y, "test")
    fields["checkpoints"] = checkpoints or (lambda tag: None)
    return MitigationContext(**fields, model=copy.deepcopy(run.model).eval(), model_name="convnet")


def values(rows) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in rows}


def node(name, **more):
    return OmegaConf.create({**yaml_node("defense", name), **FAST[name], **more})


# ---- NAD: the attention map and its distances ------------------------------------------------------
def test_attention_map_by_hand():
    # two channels at two positions: Σ_c |F_c|² = [1 + 4, 4 + 1] -> [1, 1] / √2; p = 1: [3, 3] -> the same
    fm = torch.tensor([[1.0, -2.0], [2.0, 1.0]]).view(1, 2, 1, 2)
    assert torch.allclose(attention_map(fm, 2.0), torch.full((1, 2), 2 ** -0.5), atol=1e-6)
    assert torch.allclose(attention_map(fm, 1.0), torch.full((1, 2), 2 ** -0.5), atol=1e-6)
    # all the energy at one position: a one-hot map
    fm = torch.tensor([[3.0, 0.0], [4.0, 0.0]]).view(1, 2, 1, 2)
    assert torch.allclose(attention_map(fm), torch.tensor([[1.0, 0.0]]), atol=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map_against_numpy(p):
    rng = np.random.default_rng(0)
    fm = rng.normal(size=(3, 5, 4, 3)).astype(np.float32)
    mean_map = (np.abs(fm) ** p).mean(axis=1).reshape(3, -1)  # the channel mean: the same map once normalized
    want = mean_map / np.linalg.norm(mean_map, axis=1, keepdims=True)
    got = attention_map(torch.from_numpy(fm), p).numpy()
    assert got.shape == (3, 12)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_attention_loss_against_numpy():
    rng = np.random.default_rng(1)
    fs, ft = (rng.normal(size=(4, 6, 3, 3)).astype(np.float32) for _ in range(2))

    def amap(f):
        a = (np.abs(f) ** 2).sum(axis=1).reshape(len(f), -1)
        return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-6)

    d = amap(fs) - amap(ft)
    s, t = torch.from_numpy(fs), torch.from_numpy(ft)
    assert attention_loss(s, t, 2.0, "mse").item() == pytest.approx(float((d ** 2).mean()), rel=1e-5)
    assert attention_loss(s, t, 2.0, "l2").item() == pytest.approx(float(np.linalg.norm(d, axis=1).mean()), rel=1e-5)
    # one-hot maps at different positions: mse (1 + 1) / 2 positions = 1, l2 = √2
    a = torch.tensor([[3.0, 0.0], [4.0, 0.0]]).view(1, 2, 1, 2)
    b = a.flip(-1)
    assert attention_loss(a, b, 2.0, "mse").item() == pytest.approx(1.0, abs=1e-5)
    assert attention_loss(a, b, 2.0, "l2").item() == pytest.approx(2 ** 0.5, abs=1e-5)
    # a rescaled activation has the same attention: distance 0
    assert attention_loss(5.0 * s, s, 2.0, "l2").item() == pytest.approx(0.0, abs=1e-5)


# ---- NAD: the teacher stays frozen; the distillation term does its job -------------------------------
def test_the_teacher_is_frozen_while_the_student_trains(run):
    ctx = context(run, clean_ratio=0.25)
    teacher = copy.deepcopy(ctx.model)
    ctx.finetune(teacher, 1, "teacher", lr=0.05)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = weights_digest(ctx.model.state_dict())
    loss = AttentionDistillation(teacher, {"s1": 500.0, "s2": 1000.0, "s3": 1000.0})
    history = ctx.finetune(ctx.model, 2, "student", lr=0.05, loss=loss)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())  # weights and BN statistics
    assert weights_digest(ctx.model.state_dict()) != student_before
    assert len(history["at_loss"]) == 2 and all(np.isfinite(history["at_loss"]))


def test_distillation_pulls_the_students_attention_to_the_teachers(run):
    """Same data, seed and schedule: with β the student's attention maps end nearer the frozen
    teacher's than without (β = 0: plain fine-tuning). The teacher is a freshly initialized model,
    whose maps differ from the suspect model's from the start."""
    from bdexp.models.base import kaiming_init

    ctx = context(run, clean_ratio=0.25)
    teacher = copy.deepcopy(ctx.model)
    torch.manual_seed(5)
    kaiming_init(teacher)
    x = ctx.x.float() / 255

    def distance(beta):
        student = copy.deepcopy(run.model)
        ctx.finetune(student, 5, "student", lr=0.01, loss=AttentionDistillation(teacher, dict.fromkeys(("s1", "s2", "s3"), beta)))
        with torch.no_grad():
            _, s = student.eval().feature_maps(x)
            _, t = teacher.eval().feature_maps(x)
        return sum(attention_loss(s[k], t[k]).item() for k in ("s1", "s2", "s3"))

    with_at, without = distance(100.0), distance(0.0)
    assert with_at < 0.6 * without


def test_nad_end_to_end(run):
    got = values(run_defense(run, "nad", node("nad")))
    assert got["model_epochs"] == 2 + 2  # teacher + student (scaled: train.epochs = reference epochs)
    assert got["ba"] >= got["ba_undefended"] - 0.25
    assert 0 <= got["nad_teacher_acc"] <= 1 and np.isfinite(got["nad_at_loss"])
    assert got["asr_undefended"] > 0.9


def test_nad_options_match_the_authors_and_backdoorbench():
    opts = DEFENSES.options("nad").parse(OmegaConf.create(yaml_node("defense", "nad")))
    assert opts.betas == (500.0, 1000.0, 1000.0) and opts.p == 2.0 and opts.te_epochs == 10
    assert opts.at_distance == "mse" and opts.clean_ratio == 0.05


# ---- SAM: one step against a hand computation -------------------------------------------------------
class Quadratic(nn.Module):
    """L(w) = ½ Σ c_i (w_i − t_i)², gradient c ⊙ (w − t)."""

    def __init__(self, w, c, t):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.c, self.t = torch.tensor(c, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)

    def closure(self):
        loss = 0.5 * (self.c * (self.w - self.t) ** 2).sum()
        return loss, self.w.view(1, -1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_sam_step_takes_the_gradient_at_the_perturbed_weights(adaptive):
    w, c, t, rho, lr = np.array([1.0, -2.0, 0.5]), np.array([2.0, 1.0, 4.0]), np.array([0.0, 1.0, 1.0]), 0.3, 0.1
    model = Quadratic(w, c, t)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss, _ = sam_step(model, model.closure, opt, rho, adaptive=adaptive)
    g = c * (w - t)
    eps = rho * w ** 2 * g / np.linalg.norm(np.abs(w) * g) if adaptive else rho * g / np.linalg.norm(g)
    g_at = c * (w + eps - t)  # the gradient at w + ε ...
    want = w - lr * g_at  # ... applied at w
    np.testing.assert_allclose(model.w.detach().numpy(), want, rtol=1e-12)
    assert loss.item() == pytest.approx(0.5 * float((c * (w - t) ** 2).sum()))  # the loss at w
    assert not np.allclose(want, w - lr * g)  # and it is not the plain step


def test_a_sam_step_with_radius_zero_is_the_plain_step():
    model = Quadratic([1.0, 2.0], [1.0, 3.0], [0.0, 0.0])
    sam_step(model, model.closure, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.0)
    np.testing.assert_allclose(model.w.detach().numpy(), [1.0 - 0.1 * 1.0, 2.0 - 0.1 * 6.0])


def test_the_perturbed_pass_leaves_the_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 2, (8,))
    model(x)  # materialize the lazy layer
    one_pass = copy.deepcopy(model).train()
    one_pass(x)  # the statistics after exactly one forward pass at w
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the statistics could move
    def closure():
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    sam_step(model, closure, opt, rho=1.0)
    bn, want = model[1], one_pass[1]
    assert torch.equal(bn.running_mean, want.running_mean) and torch.equal(bn.running_var, want.running_var)
    assert torch.equal(bn.num_batches_tracked, want.num_batches_tracked)
    with batchnorm_stats_kept(model):
        model(x * 3)
    assert torch.equal(bn.running_mean, want.running_mean)


def test_smoothed_cross_entropy_against_numpy():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]])
    y = torch.tensor([0, 3])
    s = 0.1
    logp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    q = np.full((2, 4), s / 3)
    q[[0, 1], [0, 3]] = 1 - s
    assert smoothed_cross_entropy(logits, y, s).item() == pytest.approx(float(-(q * logp).sum(1).mean()), rel=1e-6)
    assert smoothed_cross_entropy(logits, y, 0.0).item() == pytest.approx(nn.functional.cross_entropy(logits, y).item())


# ---- FT-SAM end to end ------------------------------------------------------------------------------
def test_ftsam_end_to_end(run):
    got = values(run_defense(run, "ftsam", node("ftsam")))
    assert got["model_epochs"] == 2
    assert got["ba"] >= got["ba_undefended"] - 0.25
    assert np.isfinite(got["ftsam_train_loss"])


def test_ftsam_changes_the_model_and_resumes_where_it_stopped(run, tmp_path, monkeypatch):
    """An FT-SAM interrupted in its third epoch ends, re-run, with the weights of an uninterrupted run."""
    import bdexp.defenses.ftsam as ftsam

    repair = DEFENSES.get("ftsam")
    opts = dataclasses.replace(FTSAMOptions(), epochs=4, clean_ratio=0.25, batch_size=32)
    whole = repair(context(run, lambda tag: tmp_path / "a" / f"{tag}.pt", clean_ratio=0.25), opts).model
    assert weights_digest(whole.state_dict()) != weights_digest(run.model.state_dict())

    steps, real = {"n": 0}, ftsam.sam_step

    def interrupted(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 5:  # 2 steps per epoch: in the third epoch
            raise Interrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(ftsam, "sam_step", interrupted)
    where = lambda tag: tmp_path / "b" / f"{tag}.pt"  # noqa: E731
    with pytest.raises(Interrupted):
        repair(context(run, where, clean_ratio=0.25), opts)
    monkeypatch.setattr(ftsam, "sam_step", real)
    resumed = repair(context(run, where, clean_ratio=0.25), opts).model
    assert weights_digest(resumed.state_dict()) == weights_digest(whole.state_dict())
