"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha, Wu, "Shared Adversarial Unlearning: Backdoor
Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023).

The paper (§3–4) bounds the backdoor risk of a model h_θ by its *shared* adversarial risk: the rate
of adversarial examples on which h_θ and the original suspect model h_θ₀ predict the same wrong
class. SAU alternates, on every clean batch:

1. maximization (`shared_perturbation`): a per-image perturbation ‖ε‖∞ ≤ `eps` found by
   signed-gradient steps (`steps` of size `step_size`, from ε = +eps everywhere, `pgd_init=max`)
   that make both models wrong (β₁·L_adv: cross-entropy of the rows a model still gets right,
   raised) and make them agree (β₂·L_share: the Jensen–Shannon divergence of their predictions on
   the rows not yet shared, lowered); it stops early once every row is shared;
2. minimization: one Adam step on
       λ₁·CE(h_θ(x), y) + λ₂·CE(h_θ(x+ε), y) + λ₃·L_sar,
   L_sar = (1/N) Σ_{i: h_θ₀(x_i+ε_i) is wrong} −log(1 − p_θ(h_θ₀(x_i+ε_i) | x_i+ε_i)),
   the paper's surrogate of the shared adversarial risk: on every row where the suspect model is
   fooled (to a class other than y and other than its own clean prediction), the repaired model is
   pushed away from the class the suspect model was fooled into (`sar_loss`, `shared_masks`).

Defaults: BackdoorBench's `config/defense/sau/config.yaml` (written with the paper's first author:
`n_rounds` 100 epochs, Adam lr 1e-4, batch 256, ℓ∞ `trigger_norm` 0.2 on [0,1] images, `adv_lr`
0.2, `adv_steps` 5, `pgd_init` max, β₁ = 0.01, β₂ = 1, λ₁ = 1, λ₂ = 0 (no adversarial-training
term), λ₃ = 1, one outer step, BatchNorm frozen (eval mode), unaugmented images). The epochs are
scaled by the run's schedule length (`Repairer.scaled_epochs`: 20 under scale=cpu).

The maximization's objective is not a plain cross-entropy, so `bdexp.training.adversarial.pgd`
does not apply: `_signed_descent` is a small ℓ∞ PGD on an arbitrary per-batch objective. Where
bdexp departs from BackdoorBench (docs/defenses.md, "sau"): L_sar is computed from log-softmax
(log(1 − p) as a log-sum-exp of the other classes) rather than from clamped probabilities, and
rows with p < 0.001 are left out as BackdoorBench's clamps leave them without gradient; the
early stop is checked before a step, not after it; `pgd_init=random` starts uniform in the ε-ball.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.options import option
from bdexp.results import record


@dataclass(frozen=True)
class SAUOptions(MitigationOptions):
    epochs: float = option(100, lo=0, lo_open=True)  # BackdoorBench's n_rounds (passes over the clean data); scaled
    lr: float = option(0.0001, lo=0, lo_open=True)  # Adam (BackdoorBench)
    batch_size: int = option(256, lo=1)  # BackdoorBench
    eps: float = option(0.2, lo=0)  # ℓ∞ radius on [0,1] images (BackdoorBench's trigger_norm)
    step_size: float = option(0.2, lo=0, lo_open=True)  # signed-gradient step (adv_lr)
    steps: int = option(5, lo=0)  # PGD steps (adv_steps)
    pgd_init: Literal["max", "min", "zero", "random"] = "max"  # BackdoorBench's pgd_init
    beta_adv: float = option(0.01, lo=0)  # β₁, weight of L_adv in the maximization (beta_1)
    beta_share: float = option(1.0, lo=0)  # β₂, weight of L_share in the maximization (beta_2)
    lambda_clean: float = option(1.0, lo=0)  # λ₁, clean cross-entropy (lmd_1)
    lambda_at: float = option(0.0, lo=0)  # λ₂, cross-entropy on the shared adversarial examples (lmd_2)
    lambda_sar: float = option(1.0, lo=0)  # λ₃, the shared adversarial risk surrogate (lmd_3)
    outer_steps: int = option(1, lo=1)  # model steps per batch of adversarial examples (outer_steps)
    bn_mode: Literal["eval", "train"] = "eval"  # model mode when unlearning (BackdoorBench's train_mode=False: eval)
    augment: bool = False  # the run's crop/flip on the clean data (BackdoorBench: its test transform, none)
    clip_images: bool = False  # clamp x + ε to [0, 1] (BackdoorBench: no)


# ---------------------------------------------------------------------------- shared adversarial examples
def shared_masks(pred: torch.Tensor, pred_ref: torch.Tensor, wrong_vs: torch.Tensor,
                 wrong_vs_ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fooled, fooled_ref, shared) of adversarial predictions `pred` (the model) and `pred_ref`
    (the suspect model): a model is fooled where its prediction differs from `wrong_vs` (true labels,
    or its clean predictions; `wrong_vs_ref` for the reference, default the same); an example is
    shared where both are fooled and predict the same class."""
    fooled = pred != wrong_vs
    fooled_ref = pred_ref != (wrong_vs if wrong_vs_ref is None else wrong_vs_ref)
    return fooled, fooled_ref, fooled & fooled_ref & (pred == pred_ref)


def unlearning_masks(pred_adv: torch.Tensor, adv_ref: torch.Tensor, clean_ref: torch.Tensor,
                     y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fooled_ref, shared) of the minimization: the suspect model is fooled where its adversarial
    prediction is neither the true label nor its own clean prediction (the rows L_sar counts);
    shared where, besides, the model predicts that same class."""
    _, fooled_ref, shared = shared_masks(pred_adv, adv_ref, y)
    fooled_ref = fooled_ref & (adv_ref != clean_ref)
    return fooled_ref, shared & fooled_ref


def _js_divergence(logits: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen–Shannon divergence of two softmax distributions."""
    p = F.softmax(logits.float(), 1).clamp_min(1e-8)
    q = F.softmax(logits_ref.float(), 1).clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p.log() - m.log())).sum(1) + (q * (q.log() - m.log())).sum(1))


def _signed_descent(objective: Callable[[torch.Tensor], tuple[torch.Tensor, bool]], delta: torch.Tensor,
                    eps: float, step: float, steps: int) -> torch.Tensor:
    """ℓ∞ PGD that *lowers* `objective(δ) -> (loss, stop)`: δ ← clip(δ − step·sign(∇loss), −eps, eps),
    up to `steps` times, stopping early when the objective says so. Input gradients only."""
    delta = delta.detach().clamp(-eps, eps)
    for _ in range(int(steps)):
        delta.requires_grad_(True)
        loss, stop = objective(delta)
        if stop:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta = (delta.detach() - step * grad.sign()).clamp(-eps, eps)
    return delta.detach()


def _shift(x: torch.Tensor, delta: torch.Tensor, clip: bool) -> torch.Tensor:
    out = x + delta
    return out.clamp(0, 1) if clip else out


def shared_perturbation(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, opts: "SAUOptions",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image ε (‖ε‖∞ ≤ eps) whose x + ε fools `model` and `ref` into the same wrong class (step 1 of
    the module docstring). The models' modes are left as they are (the caller sets eval)."""
    with torch.no_grad():
        clean = model(x).argmax(1)
        clean_ref = ref(x).argmax(1)
    eps, n = float(opts.eps), len(y)
    if opts.pgd_init == "max":
        start = torch.full_like(x, eps)
    elif opts.pgd_init == "min":
        start = torch.full_like(x, -eps)
    elif opts.pgd_init == "random":
        start = (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1) * eps
    else:
        start = torch.zeros_like(x)

    def objective(delta):
        xa = _shift(x, delta, opts.clip_images)
        logits, logits_ref = model(xa).float(), ref(xa).float()
        fooled, fooled_ref, shared = shared_masks(logits.argmax(1), logits_ref.argmax(1), clean, clean_ref)
        if bool(shared.all()):
            return None, True
        # L_adv: cross-entropy of the rows each model still gets right, to be raised (so negated)
        ce = F.cross_entropy(logits, y, reduction="none")
        ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
        loss_adv = -((ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()) / (2 * n)
        loss_share = (_js_divergence(logits, logits_ref) * ~shared).sum() / n
        return opts.beta_adv * loss_adv + opts.beta_share * loss_share, False

    return _signed_descent(objective, start, eps, float(opts.step_size), int(opts.steps))


def sar_loss(logits_adv: torch.Tensor, target_ref: torch.Tensor, rows: torch.Tensor,
             min_prob: float = 1e-3) -> torch.Tensor:
    """(1/N) Σ_{rows} −log(1 − p(target_ref | x + ε)) (module docstring): the repaired model is pushed off
    the class the suspect model was fooled into. Rows where that probability is under `min_prob`
    do not count (BackdoorBench's clamps give them no gradient)."""
    logp = F.log_softmax(logits_adv.float(), 1)
    log_p = logp.gather(1, target_ref[:, None])[:, 0]
    others = logp.masked_fill(F.one_hot(target_ref, logp.shape[1]).bool(), float("-inf"))
    log_1mp = torch.logsumexp(others, 1)  # log(1 − p) without cancellation
    keep = rows & (log_p >= math.log(min_prob))
    loss = -torch.log(1e-6 + log_1mp.exp())
    return (loss * keep).sum() / len(target_ref)


# ---------------------------------------------------------------------------- the defense
def _unlearn_step(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                  opts: SAUOptions, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """One step of the minimization (module docstring, 2.); returns the batch's counts."""
    xa = _shift(x, delta, opts.clip_images)
    model.train(opts.bn_mode == "train")
    logits, logits_adv = model(torch.cat([x, xa])).float().split(len(y))
    model.eval()
    with torch.no_grad():
        clean_ref = ref(x).argmax(1)
        adv_ref = ref(xa).argmax(1)
    fooled_ref, shared = unlearning_masks(logits_adv.argmax(1), adv_ref, clean_ref, y)
    loss = opts.lambda_clean * F.cross_entropy(logits, y)
    if opts.lambda_at:
        loss = loss + opts.lambda_at * F.cross_entropy(logits_adv, y)
    if opts.lambda_sar:
        loss = loss + opts.lambda_sar * sar_loss(logits_adv, adv_ref, fooled_ref)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"n": float(len(y)), "shared": float(shared.sum()), "fooled_ref": float(fooled_ref.sum())}


@DEFENSES.register("sau", options=SAUOptions, kind=Kind.mitigation)
def sau(ctx: MitigationContext, opts: SAUOptions) -> Repair:
    model = ctx.model
    ref = copy.deepcopy(model).eval()  # the suspect model h_θ₀, frozen (taken before any resume loads)
    for p in ref.parameters():
        p.requires_grad_(False)
    model.eval()
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)  # betas (0.9, 0.999), no weight decay (BackdoorBench)
    loader = ctx.loader("sau", opts.batch_size, augment=opts.augment)
    epochs = ctx.scaled_epochs(opts.epochs)
    counts = {"n": 0.0, "shared": 0.0, "fooled_ref": 0.0}
    for _ in ctx.epochs("sau", epochs, model, optimizer, loader):
        counts = dict.fromkeys(counts, 0.0)
        for batch in loader:
            delta = shared_perturbation(model, ref, batch.x, batch.y, opts, generator=loader.generator)
            for _ in range(int(opts.outer_steps)):
                for k, v in _unlearn_step(model, ref, batch.x, batch.y, delta, opts, optimizer).items():
                    counts[k] += v
    model.eval()
    records = [record("sau_epochs", float(epochs))]
    if counts["n"]:  # the last epoch's share of shared / suspect-fooled adversarial examples
        records += [record("sau_shared_rate", counts["shared"] / counts["n"]),
                    record("sau_ref_fooled_rate", counts["fooled_ref"] / counts["n"])]
    return Repair(model, model_epochs=float(epochs), records=records)
