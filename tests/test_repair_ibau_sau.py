"""I-BAU and SAU (bdexp/defenses/ibau.py, sau.py): the implicit hypergradient against analytic and
finite-difference answers, the universal perturbation's bound, SAU's shared-adversarial-example
selection on a hand-made pair of models, and both defenses end to end on the tiny run."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from bdexp.data.loader import to_float
from bdexp.defenses import DEFENSES, run_defense
from bdexp.defenses.ibau import implicit_hypergradient, inner_loss, project_l2, universal_perturbation
from bdexp.defenses.mitigation import MitigationContext
from bdexp.defenses.repair import Repair, repairer_fields
from bdexp.defenses.sau import (SAUOptions, _unlearn_step, sar_loss, shared_masks, shared_perturbation,
                                unlearning_masks)
from bdexp.options import yaml_node
from bdexp.pipeline import build_experiment
from tests.conftest import compose_cfg, with_tiny

FAST = {"ibau": {"rounds": 1}, "sau": {"epochs": 1}}  # tests/test_defender_view.py's settings


# ---------------------------------------------------------------------------- the implicit hypergradient
def _quadratic(seed=0):
    """inner(δ, θ) = ½δᵀAδ − δᵀBθ (minimized at δ* = A⁻¹Bθ), outer(δ, θ) = ½‖δ − c‖² + ½‖Dθ‖²:
    dψ/dθ = DᵀDθ + BᵀA⁻¹(δ* − c)."""
    g = torch.Generator().manual_seed(seed)
    d, m = 4, 3
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.tensor([0.5, 0.9, 1.4, 2.0], dtype=torch.float64)) @ q.T
    b, c = torch.randn(d, m, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    dm = torch.randn(m, m, generator=g, dtype=torch.float64)
    theta = torch.randn(m, generator=g, dtype=torch.float64).requires_grad_(True)

    def inner(delta, p):
        return 0.5 * delta @ a @ delta - delta @ b @ p[0]

    def outer(delta, p):
        return 0.5 * (delta - c).pow(2).sum() + 0.5 * (dm @ p[0]).pow(2).sum()

    star = torch.linalg.solve(a, b @ theta.detach())
    exact = dm.T @ dm @ theta.detach() + b.T @ torch.linalg.solve(a, star - c)
    return dict(a=a, b=b, c=c, dm=dm, theta=theta, inner=inner, outer=outer, star=star, exact=exact)


@pytest.mark.parametrize("solver,iterations", [("fixed_point", 300), ("cg", 4)])
def test_the_implicit_hypergradient_is_the_analytic_one_on_a_quadratic(solver, iterations):
    q = _quadratic()
    (got,) = implicit_hypergradient(q["outer"], q["inner"], q["star"], [q["theta"]], 0.3, iterations, solver=solver)
    assert torch.allclose(got, q["exact"], atol=1e-8), (got, q["exact"])
    # the direct gradient alone (first-order) is not the answer: the implicit term matters here
    (first,) = implicit_hypergradient(q["outer"], q["inner"], q["star"], [q["theta"]], 0.3, 0)
    assert torch.allclose(first, q["dm"].T @ q["dm"] @ q["theta"].detach())
    assert (first - q["exact"]).abs().max() > 0.1


def test_k_fixed_point_iterations_are_the_truncated_neumann_series():
    """v_K = Σ_{j<K} Jᵀʲ ∇δ outer with J = I − αA, and ∂θF = αB: K = 5 against that sum by hand."""
    q, alpha, k = _quadratic(1), 0.3, 5
    jac = torch.eye(4, dtype=torch.float64) - alpha * q["a"]
    v = sum(torch.linalg.matrix_power(jac.T, j) @ (q["star"] - q["c"]) for j in range(k))
    want = q["dm"].T @ q["dm"] @ q["theta"].detach() + (alpha * q["b"]).T @ v
    (got,) = implicit_hypergradient(q["outer"], q["inner"], q["star"], [q["theta"]], alpha, k)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(got, q["exact"], atol=1e-3)  # truncated: not yet the exact answer


def test_the_hypergradient_through_the_l2_projection_matches_finite_differences():
    """δ*(θ) = r·Mθ/‖Mθ‖ (the ball's boundary) for inner ½‖δ − Mθ‖²: the fixed-point map includes
    the projection, and the hypergradient of wᵀδ*(θ) + ½‖θ‖² is the central difference."""
    g = torch.Generator().manual_seed(2)
    mm, w = 3 * torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    r, theta = 0.5, torch.randn(2, generator=g, dtype=torch.float64)

    def star(t):
        u = mm @ t
        return r * u / u.norm()

    def psi(t):
        return w @ star(t) + 0.5 * t.pow(2).sum()

    th = theta.clone().requires_grad_(True)
    (got,) = implicit_hypergradient(lambda d, p: w @ d + 0.5 * p[0].pow(2).sum(),
                                    lambda d, p: 0.5 * (d - mm @ p[0]).pow(2).sum(),
                                    star(theta), [th], 0.5, 200, project=lambda z: project_l2(z, r))
    h = 1e-6
    fd = torch.stack([(psi(theta + h * e) - psi(theta - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)])
    assert torch.allclose(got, fd, atol=1e-6), (got, fd)


# ---------------------------------------------------------------------------- the tiny run
@pytest.fixture(scope="module")
def exp():
    cfg = compose_cfg(with_tiny("eval_batch_size=64", "sanitizer_reference_epochs=3"))
    run, _ = build_experiment(cfg, torch.device("cpu"), None)
    return run


def _context(exp, n=32):
    x, y = exp.data.x_test[:n], exp.data.y_test[:n]
    return MitigationContext(**repairer_fields(exp, x, y, "test"), model=copy.deepcopy(exp.model).eval(),
                             model_name=str(exp.cfg.model.name))


def test_the_universal_perturbation_respects_its_bound_and_raises_the_loss(exp):
    ctx = _context(exp)
    model = ctx.model
    loader = ctx.loader("t", 16, augment=False)
    x = to_float(ctx.x)
    with torch.no_grad():
        pred = model(x).argmax(1)
    zero = torch.zeros((1, *x.shape[1:]))
    for bound in (0.5, 2.0):
        delta = universal_perturbation(model, loader, lr=1000.0, reg=0.001, epochs=2, bound=bound)
        assert delta.shape == zero.shape
        assert float(delta.norm()) <= bound * (1 + 1e-5)
        assert float(delta.norm()) > 0.9 * bound  # the step is large: the bound binds
        with torch.no_grad():
            assert float(inner_loss(model, x, pred, delta, 0.0)) < float(inner_loss(model, x, pred, zero, 0.0)) - 1e-3
    assert not any(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------- SAU's selection
class Lookup(nn.Module):
    """A hand-made model: input i (an (N, 1, 1, 1) code) gets the logits 8·onehot(table[i]) + bias."""

    def __init__(self, table, k=4):
        super().__init__()
        self.register_buffer("logits", 8.0 * F.one_hot(torch.as_tensor(table), k).float())
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        return self.logits[x.flatten(1)[:, 0].round().long()] + self.bias


def test_only_examples_both_models_send_to_the_same_wrong_class_are_shared():
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    pred = torch.tensor([2, 2, 3, 1, 0, 3])      # the model on x + ε: wrong on rows 0, 1, 2, 3, 5
    pred_ref = torch.tensor([2, 1, 3, 0, 2, 3])  # the suspect model: wrong on rows 0, 2, 3, 4, 5
    fooled, fooled_ref, shared = shared_masks(pred, pred_ref, y)
    assert fooled.tolist() == [True, True, True, True, False, True]
    assert fooled_ref.tolist() == [True, False, True, True, True, True]
    assert shared.tolist() == [True, False, True, False, False, True]  # same wrong class: rows 0, 2, 5
    # the minimization also needs the suspect model fooled away from its own clean prediction:
    # on row 5 it predicts 3 on the clean image already, so ε fooled it into nothing
    clean_ref = torch.tensor([0, 1, 2, 3, 0, 3])
    fooled_ref, shared = unlearning_masks(pred, pred_ref, clean_ref, y)
    assert fooled_ref.tolist() == [True, False, True, True, True, False]
    assert shared.tolist() == [True, False, True, False, False, False]


def test_sau_unlearns_on_the_rows_a_hand_made_suspect_model_is_fooled_on():
    """Codes 0–5 are the clean images, 6–11 their x + ε: the tables give the predictions of the
    previous test; one unlearning step counts 2 shared rows and 4 suspect-fooled rows, and L_sar is
    −log(1 − p(suspect's class)) summed over the fooled rows only."""
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    model = Lookup([0, 1, 2, 3, 0, 1] + [2, 2, 3, 1, 0, 3])
    ref = Lookup([0, 1, 2, 3, 0, 3] + [2, 1, 3, 0, 2, 3])
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    delta = torch.full_like(x, 6.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    counts = _unlearn_step(model, ref, x, y, delta, SAUOptions(), opt)
    assert counts == {"n": 6.0, "shared": 2.0, "fooled_ref": 4.0}
    assert float(model.bias.detach().abs().sum()) > 0  # it took a step
    logits_adv = model.logits[6:]
    target = torch.tensor([2, 1, 3, 0, 2, 3])
    rows = torch.tensor([True, False, True, True, True, False])
    p = F.softmax(logits_adv, 1).gather(1, target[:, None])[:, 0]
    keep = rows & (p >= 1e-3)
    want = (-torch.log(1e-6 + 1 - p) * keep).sum() / 6
    assert torch.allclose(sar_loss(logits_adv, target, rows), want, atol=1e-5)
    assert keep[0] and keep[2] and float(sar_loss(logits_adv, target, torch.zeros(6, dtype=torch.bool))) == 0.0


def test_the_shared_perturbation_stays_in_its_linf_ball(exp):
    model = copy.deepcopy(exp.model).eval()
    x, y = to_float(exp.data.x_test[:8]), exp.data.y_test[:8]
    for init in ("max", "zero"):
        opts = SAUOptions(eps=0.1, step_size=0.05, steps=3, pgd_init=init)
        delta = shared_perturbation(model, copy.deepcopy(model), x, y, opts)
        assert delta.shape == x.shape and float(delta.abs().max()) <= 0.1 + 1e-7


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["ibau", "sau"])
def test_the_defense_runs_on_the_tiny_run_and_returns_a_changed_model(exp, name):
    rows = run_defense(exp, name, OmegaConf.create({**yaml_node("defense", name), **FAST[name]}))
    got = {r["metric"]: r["value"] for r in rows}
    assert {"ba", "asr", "der", "ra", "wall_s", "clean_n"} <= set(got)
    assert got["model_epochs"] == 1.0 and got[f"{name}_{'rounds' if name == 'ibau' else 'epochs'}"] == 1.0
    # the registered function itself returns a Repair whose model fits the run's and moved
    ctx = _context(exp)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    fn = DEFENSES.get(name)
    out = fn(ctx, DEFENSES.options(name).parse(OmegaConf.create({**yaml_node("defense", name), **FAST[name]}), name))
    assert isinstance(out, Repair) and out.model_epochs == 1.0
    after = out.model.state_dict()
    assert set(after) == set(before) and not out.model.training
    assert any(not torch.equal(before[k], after[k]) for k in before)
