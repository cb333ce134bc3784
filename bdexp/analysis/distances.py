"""`analysis=[distances]`: distributional differences and ARO (ML-MMDR §2.3, §4).

For a feature level i and a set distance M ∈ {MMD², ED², SWD1}:
    a = M(Z^T_t, Z^V_t)                 benign target class vs. malicious
    b = M(Z^T_t, Z^T_t')                two disjoint random subsets of the benign target class
    c = min_{j≠t} M(Z^T_t, Z^T_j)       nearest other class
with Z^T_j the features of clean test images the model *predicts* as j and Z^V_t those of
triggered test images predicted as t. The relative ordering is the rank of a among {a, b, c};
ARO = mean rank over the three distances (3.0: the malicious set is farther than every class;
~2.0: between intra- and inter-class, the floor ML-MMDR reaches, §5).

SWD1 follows ML-MMDR eq. 5 literally (kernels.swd1): the SUM over the m samples of a set of the
sorted projections' gaps, averaged over the random directions, i.e. m × the usual sliced
Wasserstein-1 (the mean over directions of W1 between the projected sets). Every set of a run has
the one size m (record `set_size`), so the ranks are unaffected, but absolute SWD1 values grow
with m; the tables say so (swd1_note, docs/analyses.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bdexp.analysis import ANALYSES
from bdexp.analysis.kernels import Kernel, ed2, mmd2, swd1
from bdexp.attacks import has_backdoor
from bdexp.models.base import Level
from bdexp.options import Options, option
from bdexp.results import record

DISTANCES: tuple[str, ...] = ("mmd2", "ed2", "swd1")  # the three metrics ARO averages (ML-MMDR §4)
PAIRS: tuple[str, ...] = ("malicious", "intra", "inter")


def swd1_note(sizes) -> str:
    """The line a table of SWD1 values carries: what SWD1 sums over, with the runs' set sizes m."""
    sizes = sorted({int(m) for m in sizes})
    shown = ", ".join(map(str, sizes)) if sizes else "the set size (record set_size)"
    return (f"SWD1 = sum over the m = {shown} samples per set (m × the usual sliced Wasserstein-1, the mean over "
            "random directions of W1 between the projected sets; ML-MMDR eq. 5): it grows with m, so compare "
            "SWD1 values at equal m only.")


def rank_of_a(a: float, b: float, c: float) -> int:
    """Rank (1, 2 or 3) of a among {a, b, c}, ascending. Ties go to the LOWER rank (a counts as
    nearer), so an ARO of 3 always means strictly farther than both references."""
    return 1 + int(b < a) + int(c < a)


@dataclass(frozen=True)
class DistanceOptions(Options):
    """conf/analysis/distances.yaml (ML-MMDR §4)."""

    levels: tuple[Level, ...] = option(["s1", "s2", "s3"], nonempty=True)  # feature levels (ML-MMDR §4)
    set_size: int = option(500, lo=2)  # samples per set (ML-MMDR §4); capped per run to one common size m
    repeats: int = option(3, lo=1)  # random draws averaged (ML-MMDR §4)
    min_class_size: int = option(10, lo=2)  # classes with fewer predicted test images are left out
    num_projections: int = option(100, lo=1)  # SWD1 random directions L (our choice)
    kernel: Kernel = "gmk_adaptive"  # MMD² kernel (ML-MMDR authors' code; ablation kernels of Table 3)
    exclude_reserve: bool = False  # draw only from test images outside the defender's reserve



def _skipped(reason: str) -> list[dict]:
    return [record("aro_skipped", 1.0, reason=reason)]


def _draws(rng: np.random.Generator, target_idx: np.ndarray, trig_idx: np.ndarray,
           other_idx: dict[int, np.ndarray], m: int, repeats: int) -> list[dict]:
    """Per repeat: disjoint A, B of size m from the target class, V from the triggered set, one
    sample C_j of size m per compared class, and a seed for the SWD directions."""
    out = []
    for _ in range(repeats):
        perm = rng.permutation(target_idx)
        out.append({
            "A": perm[:m], "B": perm[m:2 * m],
            "V": rng.choice(trig_idx, size=m, replace=False),
            "C": {j: rng.choice(idx, size=m, replace=False) for j, idx in other_idx.items()},
            "seed": int(rng.integers(2**62)),
        })
    return out


def _pair_values(x: torch.Tensor, y: torch.Tensor, opts: DistanceOptions, seed: int,
                 device: torch.device) -> dict[str, float]:
    gen = torch.Generator(device=device).manual_seed(seed)  # same directions for every pair of a repeat
    return {
        "mmd2": float(mmd2(x, y, opts.kernel)),
        "ed2": float(ed2(x, y)),
        "swd1": float(swd1(x, y, opts.num_projections, generator=gen)),
    }


@ANALYSES.register("distances", options=DistanceOptions)
def distances(exp, cfg) -> list[dict]:
    """Distances a/b/c, ranks and ARO per level (ML-MMDR §4); see the module docstring."""
    opts = DistanceOptions.of(cfg, "analysis.distances")
    attack = exp.attack
    if not has_backdoor(attack):
        return _skipped("attack=none: there is no backdoor target class")
    if attack.mode == "all_to_all":
        return _skipped("attack.mode=all_to_all: there is no single target class")
    t, k_min = int(exp.target), opts.min_class_size
    num_classes = int(exp.data.num_classes)
    pred = exp.pred_test.cpu().numpy()
    pred_bd = exp.pred_backdoor.cpu().numpy()
    pool = np.arange(len(pred))
    trig_idx = np.flatnonzero(pred_bd == t)
    if opts.exclude_reserve:  # draw only from test images outside the defender's reserve
        pool = exp.screen_index.cpu().numpy()
        trig_idx = trig_idx[np.isin(exp.backdoor_test.index.cpu().numpy()[trig_idx], pool)]
    by_class = {j: pool[pred[pool] == j] for j in range(num_classes)}
    target_idx = by_class[t]
    if len(target_idx) < 2 * k_min:
        return _skipped(f"{len(target_idx)} clean test images predicted as target {t}; "
                        f"need 2*min_class_size={2 * k_min} for two disjoint sets")
    if len(trig_idx) < k_min:
        return _skipped(f"{len(trig_idx)} triggered test images predicted as target {t}; "
                        f"need min_class_size={k_min}")
    # Classes with fewer than min_class_size predictions are left out of the inter-class minimum.
    others = {j: idx for j, idx in by_class.items() if j != t and len(idx) >= k_min}
    if not others:
        return _skipped(f"no class other than {t} has min_class_size={k_min} predictions")
    # One common set size for every set of the run: the biased MMD² (and ED², and SWD1 as a sum
    # over samples) depend on the set size, so a, b and c are only comparable at equal sizes.
    m = min(opts.set_size, len(target_idx) // 2, len(trig_idx), *(len(i) for i in others.values()))
    draws = _draws(exp.rng("distances"), target_idx, trig_idx, others, m, opts.repeats)

    # Features only of the sampled images: the union of every draw, clean and triggered.
    clean_u = np.unique(np.concatenate([np.concatenate([d["A"], d["B"], *d["C"].values()]) for d in draws]))
    trig_u = np.unique(np.concatenate([d["V"] for d in draws]))
    images = torch.cat([exp.data.x_test[torch.as_tensor(clean_u)], exp.backdoor_test.x[torch.as_tensor(trig_u)]])

    def rows(feats: torch.Tensor, idx: np.ndarray, triggered: bool = False) -> torch.Tensor:
        pos = np.searchsorted(trig_u, idx) + len(clean_u) if triggered else np.searchsorted(clean_u, idx)
        return feats[torch.as_tensor(pos)].to(exp.device)

    out: list[dict] = [record("set_size", m)]
    aro: dict[str, float] = {}
    for lv in opts.levels:
        # One extraction per level keeps host memory to |union| x dim(level) (s1 can be 32k-dim).
        feats = exp.features(images, levels=(lv,))[1][lv]
        sums = {d: {"malicious": 0.0, "intra": 0.0, **{j: 0.0 for j in others}} for d in DISTANCES}
        for draw in draws:
            za = rows(feats, draw["A"])
            refs = {"malicious": rows(feats, draw["V"], triggered=True), "intra": rows(feats, draw["B"]),
                    **{j: rows(feats, c) for j, c in draw["C"].items()}}
            for key, zb in refs.items():
                for dist, v in _pair_values(za, zb, opts, draw["seed"], exp.device).items():
                    sums[dist][key] += v
        del feats
        ranks = []
        for dist in DISTANCES:
            mean = {key: np.float64(s) / opts.repeats for key, s in sums[dist].items()}  # average over repeats
            nearest = min(others, key=lambda j: mean[j])  # min over j of the repeat-averaged value
            a, b, c = mean["malicious"], mean["intra"], mean[nearest]
            for pair, v in zip(PAIRS, (a, b, c)):
                out.append(record(dist, v, level=lv, pair=pair))
            out.append(record("nearest_class", nearest, level=lv, distance=dist))
            r = rank_of_a(a, b, c)
            ranks.append(r)
            out.append(record("rank", r, level=lv, distance=dist))
        aro[lv] = float(np.mean(np.asarray(ranks, dtype=np.float64)))
        out.append(record("aro", aro[lv], level=lv))
    out.append(record("aro", float(np.mean(np.asarray(list(aro.values()), dtype=np.float64))), level="mean"))
    return out
