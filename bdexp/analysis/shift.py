"""`analysis=[shift]`: the domain-shift bound of OVL Theorem 2 on a backdoored model (OVL §IV
and Fig. 5; the formulas are lost in the paper's extracted text, the form used here is our reconstruction).

A test set T = ρ·P + (1 − ρ)·Q mixes clean images (P) with triggered non-target images (Q, the
backdoor test set). With a_P the model's accuracy on P and a_Q ≤ a_P its accuracy on Q (w.r.t. the
TRUE labels; ≈ 0 when the attack succeeds), Acc_T = a_Q + (a_P − a_Q)·ρ and η(P, T) ≥ ρ, so

    Acc_T ≤ a_Q + (a_P − a_Q)·η(P, T) ≤ a_Q + (a_P − a_Q)·bound(P, T)        (OVL eqs. 12, 14)

For each purity ρ the analysis draws T (`set_size` images, round(ρ·m) clean) and a clean sample P
of the same size, measures the accuracy on T and evaluates the bound with
bdexp.analysis.overlap in input space (pixels in [0, 1], flattened), hidden space (a feature level)
and output space (softmax probabilities by default: a bounded domain as Theorem 1 assumes), per
norm. The clean parts of T are nested across ρ and T's triggered part likewise (common random
numbers: the curves are smooth in ρ). Values are means over `repeats` draws.

Where T's clean images come from (`clean_from`, **gap**): `p` (default) takes them from P's own
sample, so T = ρ·P̂ + (1 − ρ)·Q̂ up to which of P's images are kept, the bound compares the
empirical distributions it can certify, and at ρ = 1 T = P exactly (bound 1, equal accuracies).
`disjoint` draws them apart from P, the statistical setting of two samples:

Finite samples with `disjoint`: bound(P, T) is a plug-in estimate, so near ρ = 1, where P and T are two
samples of one distribution, it comes out below 1 and the measured accuracy can exceed the bound by
sampling error alone. Two sources, each about 1/√(2m): the estimated ‖μ_P − μ_T‖ of two samples of
one distribution is ≈ √(2·tr Σ/m) against 2D ≥ 2√(tr Σ), and the accuracies on P and on T's clean
part are two binomial estimates (SD of the difference ≤ √(1/(2m))). `tolerance: auto` is their sum,
√(2/m) (0.063 at m = 500; measured ρ = 1 shortfalls on the synthetic tiny run: 0.12 at m = 48,
0.05 at m = 250, 0.035 at m = 500). (Fashion-MNIST ConvNet at scale=cpu, m = 500: 0.022–0.037 at ρ = 1.)
A measured accuracy above a bound by more than the tolerance is logged as a warning and counted in the `shift_violations` record.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from bdexp.analysis import ANALYSES
from bdexp.analysis.overlap import Center, Norm, norm_name, norm_order, overlap_bound
from bdexp.attacks import has_backdoor
from bdexp.models.base import Level
from bdexp.options import Options, option
from bdexp.results import record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShiftOptions(Options):
    """conf/analysis/shift.yaml (OVL §IV, Fig. 5)."""

    purities: tuple[float, ...] = option([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], lo=0, hi=1,
                                         nonempty=True)
    spaces: tuple[Literal["input", "hidden", "output"], ...] = option(["input", "hidden", "output"], nonempty=True)
    hidden_level: Level = "penult"  # the feature level used as the hidden space
    output: Literal["softmax", "logits"] = "softmax"  # softmax: bounded, as Theorem 1 assumes
    norms: tuple[Norm, ...] = option([1, 2, "inf"], nonempty=True)  # ℓ1, ℓ2, ℓ∞ (OVL §IV)
    num_radii: int = option(10, lo=0)  # K balls A_r (OVL §II-C, K = 10)
    center: Center = "best"  # ball centre (overlap.py)
    clean_from: Literal["p", "disjoint"] = "p"  # where T's clean images come from (module docstring)
    set_size: int = option(500, lo=2)  # |T| = |P| = m, capped at the test sets
    repeats: int = option(3, lo=1)  # random draws averaged
    tolerance: Literal["auto"] | float = option("auto", lo=0)  # auto = √(2/m) (module docstring)


    @property
    def rhos(self) -> list[float]:
        """The purities, ascending, each once."""
        return sorted(set(self.purities))

    @property
    def orders(self) -> list[float]:
        """The norms as vector-norm orders (1.0, 2.0, inf), each once."""
        return list(dict.fromkeys(norm_order(n) for n in self.norms))


def shift_draws(rng: np.random.Generator, n_clean: int, n_triggered: int, m: int, repeats: int,
                clean_from: str) -> list[dict]:
    """Per repeat: P (m clean test indices), `clean` (T's clean part is its first round(ρ·m): P
    itself for clean_from="p", m other clean images for "disjoint") and `triggered` (m
    backdoor-test indices: T's triggered part is the first m − round(ρ·m))."""
    out = []
    for _ in range(repeats):
        perm = rng.permutation(n_clean)
        clean = perm[:m] if clean_from == "p" else perm[m:2 * m]
        out.append({"P": perm[:m], "clean": clean, "triggered": rng.permutation(n_triggered)[:m]})
    return out


def mixture(draw: dict, rho: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    """T's clean and triggered indices at purity ρ."""
    k = int(round(rho * m))
    return draw["clean"][:k], draw["triggered"][:m - k]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1] (the test set is uint8, the backdoor test set float)."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def _spaces(exp, images: torch.Tensor, opts: ShiftOptions) -> dict[str, torch.Tensor]:
    """Each of `opts.spaces` (once, in order): the points the bound compares."""
    out = {}
    if "input" in opts.spaces:
        out["input"] = images.flatten(1)
    if {"hidden", "output"} & set(opts.spaces):
        levels = (opts.hidden_level,) if "hidden" in opts.spaces else ()
        logits, feats = exp.features(images, levels=levels)
        if "hidden" in opts.spaces:
            out["hidden"] = feats[opts.hidden_level].flatten(1)
        if "output" in opts.spaces:
            out["output"] = logits.float().softmax(1) if opts.output == "softmax" else logits.float()
    return {s: out[s].double() for s in opts.spaces}  # float64 once: overlap_bound computes in it


@ANALYSES.register("shift", options=ShiftOptions)
def shift(exp, cfg) -> list[dict]:
    """Measured accuracy and Theorem 2's bound against the purity ρ (OVL Theorem 2, Fig. 5)."""
    opts = ShiftOptions.of(cfg, "analysis.shift")
    rhos, norms = opts.rhos, opts.orders
    bd = exp.backdoor_test
    n_clean, n_trig = len(exp.data.y_test), len(bd.y_true)
    if not has_backdoor(exp.attack) or n_trig == 0:
        return [record("shift_skipped", 1.0, reason="no triggered test images (attack=none?)")]
    m = min(opts.set_size, n_clean if opts.clean_from == "p" else n_clean // 2, n_trig)
    if m < 2:
        return [record("shift_skipped", 1.0, reason=f"set size {m}: too few test images")]
    tol = float(np.sqrt(2 / m)) if opts.tolerance == "auto" else float(opts.tolerance)
    draws = shift_draws(exp.rng("shift"), n_clean, n_trig, m, opts.repeats, opts.clean_from)

    correct_clean = (exp.pred_test.cpu() == exp.data.y_test.cpu()).numpy()
    correct_trig = (exp.pred_backdoor.cpu() == bd.y_true.cpu()).numpy()  # w.r.t. the TRUE labels
    a_q = float(correct_trig.mean())  # accuracy on Q: the whole backdoor test set

    # Features only of the sampled images (the union over repeats), in every requested space.
    clean_u = np.unique(np.concatenate([np.r_[d["P"], d["clean"]] for d in draws]))
    trig_u = np.unique(np.concatenate([d["triggered"] for d in draws]))
    images = torch.cat([_unit(exp.data.x_test[torch.as_tensor(clean_u)]), _unit(bd.x[torch.as_tensor(trig_u)])])
    spaces = _spaces(exp, images, opts)

    def rows(idx_clean: np.ndarray, idx_trig: np.ndarray) -> torch.Tensor:
        pos = np.r_[np.searchsorted(clean_u, idx_clean), np.searchsorted(trig_u, idx_trig) + len(clean_u)]
        return torch.as_tensor(pos.astype(np.int64))

    no_trig = np.zeros(0, dtype=np.int64)
    a_p = [float(correct_clean[d["P"]].mean()) for d in draws]  # accuracy on P, per repeat
    acc = {rho: 0.0 for rho in rhos}
    eta = {(rho, s, n): 0.0 for rho in rhos for s in spaces for n in norms}
    bound = dict(eta)
    for draw, ap in zip(draws, a_p):
        p_pos = rows(draw["P"], no_trig)
        for rho in rhos:
            tc, tt = mixture(draw, rho, m)
            acc[rho] += float(np.r_[correct_clean[tc], correct_trig[tt]].mean()) / len(draws)
            t_pos = rows(tc, tt)
            for s, z in spaces.items():
                for n in norms:
                    b = overlap_bound(z[p_pos], z[t_pos], n, opts.num_radii, center=opts.center)
                    eta[rho, s, n] += b / len(draws)
                    bound[rho, s, n] += (a_q + (ap - a_q) * b) / len(draws)  # OVL eq. (12)

    mean_ap = float(np.mean(a_p))
    if a_q > mean_ap:
        log.warning("shift: accuracy on triggered images %.3f exceeds clean accuracy %.3f; Theorem 2 "
                    "assumes a_Q <= a_P (did the attack fail?)", a_q, mean_ap)
    out = [record("shift_set_size", m), record("shift_clean_acc", mean_ap), record("shift_trigger_acc", a_q)]
    violations = 0
    for rho in rhos:
        out.append(record("shift_acc", acc[rho], rho=round(rho, 6)))
        for s in spaces:
            for n in norms:
                tags = {"rho": round(rho, 6), "space": s, "norm": norm_name(n)}
                out.append(record("shift_overlap", eta[rho, s, n], **tags))
                out.append(record("shift_bound", bound[rho, s, n], **tags))
                if acc[rho] > bound[rho, s, n] + tol:
                    violations += 1
                    log.warning("shift: measured accuracy %.4f exceeds the Theorem 2 bound %.4f by more than "
                                "the tolerance %.3f at rho=%g in %s space (%s)", acc[rho], bound[rho, s, n],
                                tol, rho, s, norm_name(n))
    out.append(record("shift_violations", violations, tolerance=tol))
    return out
