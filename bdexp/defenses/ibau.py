"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng, Chen, Park, Mao, Jin, Jia, "Adversarial
Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022).

The minimax of paper §3 (eq. 1): θ* = argmin_θ max_{‖δ‖ ≤ C_δ} H(δ, θ), H the loss of the model on
the defender's clean images each shifted by one *universal* perturbation δ. Each round (paper §4,
Alg. 1):

1. inner maximization: δ ← 0, then gradient steps on the clean batches that raise the loss
   (`universal_perturbation`): SGD (lr `inner_lr` = 10) minimizing
   −CE(f(x + δ), ŷ) + `inner_reg`·‖δ‖² with ŷ the model's own predictions, projected onto the ℓ2
   ball of radius `norm_bound` after each step;
2. outer minimization: for every clean batch, the hypergradient of ψ(θ) = L_outer(δ*(θ), θ),
   where δ*(θ) is a fixed point of the inner update F(δ, θ) = Π(δ − α∇_δ L_inner(δ, θ))
   (α = `fp_step`). By the implicit function theorem (paper §4),
       ∇ψ = ∇_θ L_outer + (∂_θ F)ᵀ v,   v = (I − ∂_δ Fᵀ)⁻¹ ∇_δ L_outer,
   v approximated by `fp_iterations` (K) fixed-point iterations v ← ∂_δ Fᵀ v + ∇_δ L_outer
   (`solver=fixed_point`, the truncated Neumann series of the paper's released code) or K steps
   of conjugate gradient (`solver=cg`, the paper's other solver). Every product is a
   vector-Jacobian product through torch.autograd (`implicit_hypergradient`); the model takes an
   Adam step along ∇ψ. `hypergradient=first_order` drops the implicit term (v = 0): plain
   adversarial training against the frozen δ, the decoupled scheme the paper argues against.

L_outer is the cross-entropy of the batch with δ added to a `portion` of its rows: 1 % in the
paper's released code and in BackdoorBench (`portion=1` is eq. 1's H with every row shifted).

Defaults: the paper's released code (github.com/YiZeng623/I-BAU, `defense.py`: Adam lr 1e-3,
batch 100, 5 rounds, K = 5, inner SGD lr 10, fixed-point step 0.1, regularizer 1e-3·‖δ‖², 1 % of
each batch perturbed, no augmentation), which BackdoorBench's `config/defense/i-bau/config.yaml`
repeats but for Adam lr 1e-4, batch 256 and augmented images (both are option values here).
Where bdexp departs (docs/defenses.md, "i-bau"): the ℓ2 projection onto ‖δ‖ ≤ 10 is applied (it is
commented out in both codes, which bound δ only through the regularizer; `norm_bound=null` is
theirs); the fixed-point map uses the same batch and labels as the outer step (both codes use the
first batch with true labels, though δ was fitted to predicted labels); at least one row of a
batch is perturbed (1 % of a batch under 100 rows is no row in both codes); the rounds are scaled
by the run's schedule length like every paper epoch count (`Repairer.scaled_epochs`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.data.loader import DeviceLoader
from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.options import option
from bdexp.results import record


@dataclass(frozen=True)
class IBAUOptions(MitigationOptions):
    rounds: float = option(5, lo=0, lo_open=True)  # code's n_rounds (BackdoorBench too); scaled like paper epochs
    fp_iterations: int = option(5, lo=0)  # K, the code's and BackdoorBench's fixed-point iterations
    solver: Literal["fixed_point", "cg"] = "fixed_point"  # the code's solver | conjugate gradient (paper §4)
    hypergradient: Literal["implicit", "first_order"] = "implicit"  # first_order: no implicit term (v = 0)
    lr: float = option(0.001, lo=0, lo_open=True)  # Adam, the code's default (BackdoorBench: 1e-4)
    batch_size: int = option(100, lo=1)  # the code's (BackdoorBench: 256)
    inner_lr: float = option(10.0, lo=0, lo_open=True)  # SGD on δ, both codes
    inner_epochs: int = option(1, lo=1)  # passes over the clean data per inner maximization (both codes: 1)
    inner_reg: float = option(0.001, lo=0)  # coefficient of ‖δ‖² in the inner loss, both codes
    inner_labels: Literal["predicted", "true"] = "predicted"  # the labels δ is fitted against (codes: predicted)
    fp_step: float = option(0.1, lo=0, lo_open=True)  # α of the fixed-point map (the codes' GradientDescent step)
    norm_bound: float | None = option(10.0, lo=0, lo_open=True)  # ℓ2 radius C_δ on [0,1] images; null: no projection
    portion: float = option(0.01, lo=0, hi=1)  # share of each outer batch shifted by δ (both codes); 1: eq. 1's H
    augment: bool = False  # the run's crop/flip on the clean data (the code: none; BackdoorBench: its train transform)
    clip_images: bool = False  # clamp x + δ to [0, 1] (both codes: no)


# ---------------------------------------------------------------------------- the hypergradient
def project_l2(delta: torch.Tensor, bound: float | None) -> torch.Tensor:
    """δ scaled onto the ℓ2 ball of radius `bound` (the whole tensor's norm); differentiable, so
    the fixed-point map can include it. None: δ unchanged."""
    if bound is None:
        return delta
    return delta * torch.clamp(bound / delta.norm().clamp_min(1e-12), max=1.0)


def _zeros_for_none(grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum()


def implicit_hypergradient(outer: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor],
                           inner: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor],
                           delta: torch.Tensor, params: Sequence[torch.Tensor], step: float, iterations: int,
                           solver: str = "fixed_point", project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           tol: float = 1e-10) -> list[torch.Tensor]:
    """d/dθ outer(δ*(θ), θ) at δ* = `delta`, a fixed point of F(δ, θ) = project(δ − step·∇_δ inner(δ, θ))
    (paper §4): ∇_θ outer + (∂_θ F)ᵀ v with v solving (I − ∂_δ Fᵀ) v = ∇_δ outer, by `iterations`
    fixed-point iterations from v = 0 (v_K = Σ_{j<K} (∂_δ Fᵀ)^j ∇_δ outer) or conjugate-gradient
    steps. `outer(δ, params)` and `inner(δ, params)` return scalars; one gradient per param."""
    params = list(params)
    delta = delta.detach().requires_grad_(True)
    g_delta, *g_theta = _zeros_for_none(
        torch.autograd.grad(outer(delta, params), [delta, *params], allow_unused=True), [delta, *params])
    if iterations <= 0:
        return g_theta
    (grad_inner,) = torch.autograd.grad(inner(delta, params), [delta], create_graph=True)
    mapped = delta - step * grad_inner
    if project is not None:
        mapped = project(mapped)

    def jt(v: torch.Tensor) -> torch.Tensor:  # ∂_δ Fᵀ v
        (out,) = _zeros_for_none(torch.autograd.grad(mapped, [delta], grad_outputs=v, retain_graph=True,
                                                     allow_unused=True), [delta])
        return out

    if solver == "fixed_point":
        v = g_delta.clone()  # the first iteration from v = 0
        for _ in range(int(iterations) - 1):
            nxt = jt(v) + g_delta
            done = float((nxt - v).norm()) < tol
            v = nxt
            if done:
                break
    elif solver == "cg":  # (I − ∂_δ Fᵀ) is symmetric (α × the inner Hessian) without a binding projection
        v = torch.zeros_like(g_delta)
        r = g_delta.clone()
        p = r.clone()
        rr = _dot(r, r)
        for _ in range(int(iterations)):
            if float(rr) <= tol ** 2:
                break
            ap = p - jt(p)
            curvature = _dot(p, ap)
            if float(curvature) == 0.0:
                break
            a = rr / curvature
            v = v + a * p
            r = r - a * ap
            rr_next = _dot(r, r)
            p = r + (rr_next / rr) * p
            rr = rr_next
    else:
        raise ValueError(f"unknown solver {solver!r}")
    implicit = _zeros_for_none(torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True), params)
    return [g + i for g, i in zip(g_theta, implicit)]


# ---------------------------------------------------------------------------- the inner maximization
def _shifted(x: torch.Tensor, delta: torch.Tensor, clip: bool) -> torch.Tensor:
    out = x + delta
    return out.clamp(0, 1) if clip else out


def _inner_labels(model: nn.Module, batch, which: str) -> torch.Tensor:
    if which == "true":
        return batch.y
    with torch.no_grad():
        return model(batch.x).argmax(1)


def inner_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, reg: float,
               clip: bool = False) -> torch.Tensor:
    """The loss the inner step minimizes (both codes): −CE(f(x + δ), labels) + reg·‖δ‖²."""
    return -F.cross_entropy(model(_shifted(x, delta, clip)).float(), labels) + reg * delta.pow(2).sum()


def universal_perturbation(model: nn.Module, loader: DeviceLoader, lr: float, reg: float, epochs: int = 1,
                           bound: float | None = None, labels: str = "predicted", clip: bool = False) -> torch.Tensor:
    """One δ of an image's shape for all of the loader's images (paper §4's inner maximization): SGD
    from 0 on `inner_loss` over `epochs` passes, projected onto ‖δ‖₂ ≤ `bound` after each step.
    The model is used as it is (its mode unchanged) and gets no parameter gradients."""
    delta = torch.zeros((1, *loader.x.shape[1:]), device=loader.device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=lr)
    for _ in range(int(epochs)):
        for batch in loader:
            y = _inner_labels(model, batch, labels)
            (grad,) = torch.autograd.grad(inner_loss(model, batch.x, y, delta, reg, clip), [delta])
            opt.zero_grad(set_to_none=True)
            delta.grad = grad
            opt.step()
            with torch.no_grad():
                delta.copy_(project_l2(delta, bound))
    return delta.detach()


# ---------------------------------------------------------------------------- the defense
def _outer_step(model: nn.Module, params: list[torch.Tensor], batch, delta: torch.Tensor, opts: IBAUOptions,
                optimizer: torch.optim.Optimizer) -> float:
    """One Adam step along the hypergradient on one batch; returns the outer loss."""
    x, y = batch.x, batch.y
    n = len(y)
    k = 0 if opts.portion == 0 else min(n, max(1, int(opts.portion * n)))
    rows = torch.zeros((n, 1, 1, 1), device=x.device, dtype=x.dtype)
    rows[:k] = 1.0  # the loader shuffles, so the first k rows are a random sample of the batch
    labels = _inner_labels(model, batch, opts.inner_labels)

    def outer(d, _params):
        return F.cross_entropy(model(_shifted(x, rows * d, opts.clip_images)).float(), y)

    def inner(d, _params):
        return inner_loss(model, x, labels, d, opts.inner_reg, opts.clip_images)

    iterations = opts.fp_iterations if opts.hypergradient == "implicit" else 0
    project = None if opts.norm_bound is None else (lambda d: project_l2(d, opts.norm_bound))
    grads = implicit_hypergradient(outer, inner, delta, params, opts.fp_step, iterations, solver=opts.solver,
                                   project=project)
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g.detach()
    optimizer.step()
    with torch.no_grad():
        return float(outer(delta, params))


@DEFENSES.register("ibau", options=IBAUOptions, kind=Kind.mitigation)
def ibau(ctx: MitigationContext, opts: IBAUOptions) -> Repair:
    model = ctx.model
    model.eval()  # both codes unlearn in eval mode: BatchNorm keeps its running statistics
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr)  # betas (0.9, 0.999), no weight decay (both codes)
    loader = ctx.loader("ibau", opts.batch_size, augment=opts.augment)
    rounds = ctx.scaled_epochs(opts.rounds)
    norms, losses = [], []
    for _ in ctx.epochs("ibau", rounds, model, optimizer, loader):
        delta = universal_perturbation(model, loader, opts.inner_lr, opts.inner_reg, opts.inner_epochs,
                                       opts.norm_bound, opts.inner_labels, opts.clip_images)
        norms.append(float(delta.norm()))
        losses = [_outer_step(model, params, batch, delta, opts, optimizer) for batch in loader]
    model.eval()
    records = [record("ibau_rounds", float(rounds))]
    if norms:  # none when every round was resumed from a checkpoint
        records += [record("ibau_delta_norm", norms[-1]), record("ibau_outer_loss", sum(losses) / max(1, len(losses)))]
    return Repair(model, model_epochs=float(rounds), records=records)
