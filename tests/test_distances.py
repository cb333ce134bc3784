"""Set distances (MMD², ED², SWD1) against direct formulas, and the distances/ARO analysis."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bdexp import pipeline
from bdexp.analysis import ANALYSES
from bdexp.analysis.distances import DISTANCES, distances, rank_of_a
from bdexp.analysis.kernels import KERNELS, ed2, mmd2, swd1
from bdexp.errors import ConfigError
from bdexp.seeding import numpy_rng


def _sets(m=7, n=9, d=5, shift=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype) + shift


def _mmd2_loops(x: np.ndarray, y: np.ndarray, kernel: str) -> float:
    """Biased MMD² by explicit double loops (ML-MMDR eq. 3) with the adaptive Gaussian-mixture kernel (docs/analyses.md)."""
    z = np.concatenate([x, y])
    n_all = len(z)
    d2 = np.array([[np.sum((z[i] - z[j]) ** 2) for j in range(n_all)] for i in range(n_all)])
    base = sum(d2[i, j] for i in range(n_all) for j in range(n_all) if i != j) / (n_all * n_all - n_all)
    mults = KERNELS[kernel]

    def k(u, v):
        if not mults:
            return float(np.dot(u, v))
        return sum(np.exp(-np.sum((u - v) ** 2) / (base * s)) for s in mults)

    def mean_k(a, b):
        return sum(k(u, v) for u in a for v in b) / (len(a) * len(b))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


@pytest.mark.parametrize("kernel", ["gmk_adaptive", "gk1", "gmk6", "lk"])
def test_mmd2_matches_double_loop(kernel):
    x, y = _sets()
    want = _mmd2_loops(x.numpy(), y.numpy(), kernel)
    assert float(mmd2(x, y, kernel)) == pytest.approx(want, rel=1e-9, abs=1e-12)
    # float32 inputs are computed in float32
    got32 = mmd2(x.float(), y.float(), kernel)
    assert got32.dtype == torch.float32 and float(got32) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_ed2_matches_double_loop():
    x, y = _sets()
    xn, yn = x.numpy(), y.numpy()

    def mean_norm(a, b):
        return np.mean([np.linalg.norm(u - v) for u in a for v in b])

    want = 2 * mean_norm(xn, yn) - mean_norm(xn, xn) - mean_norm(yn, yn)
    assert float(ed2(x, y)) == pytest.approx(want, rel=1e-9)


def test_table3_kernel_sets():
    assert KERNELS["gmk_adaptive"] == KERNELS["gmk2"] == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert [KERNELS[f"gk{i}"] for i in (1, 2, 3)] == [(0.5,), (1.0,), (2.0,)]
    assert KERNELS["gmk6"] == (1 / 27, 1 / 9, 1 / 3, 1.0, 3.0, 9.0, 27.0)
    with pytest.raises(ValueError, match="unknown MMD kernel"):
        mmd2(*_sets(), kernel="rbf")


def test_identical_sets_give_zero():
    x, _ = _sets(m=40, d=6, dtype=torch.float32)
    for kernel in ("gmk_adaptive", "gk2", "lk"):
        assert abs(float(mmd2(x, x.clone(), kernel))) < 1e-5
    assert abs(float(ed2(x, x.clone()))) < 1e-4
    assert float(swd1(x, x.clone(), generator=torch.Generator().manual_seed(0))) == pytest.approx(0.0, abs=1e-5)


def test_distances_grow_with_the_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    noise = torch.randn(200, 8, generator=g)
    for fn in (lambda a, b: mmd2(a, b, "gmk_adaptive"), lambda a, b: mmd2(a, b, "lk"), ed2,
               lambda a, b: swd1(a, b, generator=torch.Generator().manual_seed(2))):
        values = [float(fn(x, noise + s)) for s in (0.5, 1.0, 2.0, 4.0)]
        assert values[0] > 0 and all(a < b for a, b in zip(values, values[1:])), values


def test_linear_kernel_mmd2_of_a_shift_is_the_squared_mean_shift():
    x, _ = _sets(m=30, d=4)
    delta = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    # linear kernel (ML-MMDR Table 3, LK): MMD² = ‖mean x − mean y‖² = ‖Δ‖² for y = x + Δ
    assert float(mmd2(x, x + delta, "lk")) == pytest.approx(0.25 + 1.0 + 4.0, rel=1e-12)


@pytest.mark.parametrize("n", [3, 10])
def test_point_masses_have_closed_forms(n):
    a = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    b = torch.tensor([4.0, 6.0, 2.0], dtype=torch.float64)  # ‖a − b‖ = 5
    x, y = a.expand(n, 3), b.expand(n, 3)
    # ED² (ML-MMDR eq. 4): 2·‖a − b‖ − 0 − 0
    assert float(ed2(x, y)) == pytest.approx(10.0, rel=1e-12)
    # Gaussian mixture MMD²: the adaptive base is the mean off-diagonal d² of the pooled 2n points,
    # 2n²·25 / (2n(2n − 1)) = 25n / (2n − 1), so MMD² = 2 Σ_s (1 − exp(−(2n − 1) / (n·s)))
    for kernel in ("gmk_adaptive", "gk2", "gmk6"):
        want = 2 * sum(1 - np.exp(-(2 * n - 1) / (n * s)) for s in KERNELS[kernel])
        assert float(mmd2(x, y, kernel)) == pytest.approx(want, rel=1e-12)
    assert float(mmd2(x, y, "lk")) == pytest.approx(25.0, rel=1e-12)
    # SWD1 (eq. 5, a sum over the n samples): every projection gives n·|θ·(b − a)|; in the
    # direction of b − a alone that is 5n, so along one coordinate axis it is n·|Δ_axis|.
    assert float(swd1(x[:, :1], y[:, :1], num_projections=3)) == pytest.approx(3.0 * n, rel=1e-12)


def test_mmd2_is_differentiable_and_float32_under_autocast():
    x, y = _sets(m=12, n=10, d=16, dtype=torch.float32)
    x = torch.cat([x, x[:2]]).requires_grad_(True)  # duplicate rows: zero distances off the diagonal
    y = y.requires_grad_(True)
    for kernel in ("gmk_adaptive", "gk3", "lk"):
        loss = mmd2(x, y, kernel)
        gx, gy = torch.autograd.grad(loss, (x, y))
        assert torch.isfinite(gx).all() and torch.isfinite(gy).all() and gx.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = mmd2(x.detach().bfloat16(), y.detach(), "gmk_adaptive")
    assert under.dtype == torch.float32
    assert float(under) == pytest.approx(float(mmd2(x.detach().bfloat16().float(), y.detach(), "gmk_adaptive")), rel=1e-5)


def test_swd1_in_one_dimension_is_n_times_w1():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(25, 1, generator=g), torch.randn(25, 1, generator=g) * 2 + 1
    # in 1-D every unit direction is ±1, and both give the sum of sorted differences (= n · W1)
    want = float((x.flatten().sort().values - y.flatten().sort().values).abs().sum())
    assert float(swd1(x, y, num_projections=7, generator=g)) == pytest.approx(want, rel=1e-5)
    # unequal sizes: the larger set is subsampled to the smaller size
    assert torch.isfinite(swd1(x, torch.randn(40, 1, generator=g), generator=g))


def test_rank_of_a():
    assert rank_of_a(0.5, 1.0, 2.0) == 1
    assert rank_of_a(1.5, 1.0, 2.0) == 2
    assert rank_of_a(3.0, 1.0, 2.0) == 3
    assert rank_of_a(3.0, 2.0, 1.0) == 3
    # ties go to the lower rank
    assert rank_of_a(1.0, 1.0, 2.0) == 1 and rank_of_a(2.0, 1.0, 2.0) == 2 and rank_of_a(1.0, 1.0, 1.0) == 1


# ---- the analysis on a hand-made Experiment -----------------------------------------------------

def _stub(trigger_mean: float, *, attack="patched", mode="all_to_one", per_class=60, n_trig=60, std=20.0):
    """Three classes of 16-pixel uint8 'images' around means 100/130/160 (std 20; the target class 0
    and the triggered images with `std`), predicted perfectly; triggered images around
    `trigger_mean`. Features = pixel values at every level."""
    g = np.random.default_rng(0)
    means = [100, 130, 160]
    x = np.concatenate([g.normal(mu, std if j == 0 else 20, (per_class, 1, 4, 4)) for j, mu in enumerate(means)])
    y = np.repeat(np.arange(3), per_class)
    trig = g.normal(trigger_mean, std, (n_trig, 1, 4, 4))

    def u8(a):
        return torch.as_tensor(np.clip(np.round(a), 0, 255).astype(np.uint8))

    def features(images, levels=("s1", "s2", "s3", "penult")):
        f = images.float().flatten(1)
        return torch.zeros(len(images), 3), {lv: f * (i + 1) for i, lv in enumerate(levels)}

    return SimpleNamespace(
        cfg=None, device=torch.device("cpu"), target=0,
        attack=SimpleNamespace(name=attack, poisons=attack != "none", mode=mode, target=0),
        data=SimpleNamespace(x_test=u8(x), y_test=torch.as_tensor(y), num_classes=3),
        backdoor_test=SimpleNamespace(x=u8(trig), index=torch.arange(n_trig)),
        pred_test=torch.as_tensor(y), pred_backdoor=torch.zeros(n_trig, dtype=torch.long),
        features=features, rng=lambda tag: numpy_rng(0, tag),
    )


def _by(rows, metric, **tags):
    return [r for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in tags.items())]


CFG = {"levels": ["s1", "s3"], "set_size": 25, "repeats": 2, "min_class_size": 10, "num_projections": 20}


@pytest.mark.parametrize("trigger_mean,aro", [(250.0, 3.0), (115.0, 2.0)])
def test_aro_known_answers(trigger_mean, aro):
    rows = distances(_stub(trigger_mean), CFG)
    assert _by(rows, "set_size")[0]["value"] == 25  # min(25, 60 // 2, 60, 60)
    for lv in ("s1", "s3"):
        for dist in DISTANCES:
            a, b, c = (_by(rows, dist, level=lv, pair=p)[0]["value"] for p in ("malicious", "intra", "inter"))
            assert b < c
            assert _by(rows, "rank", level=lv, distance=dist)[0]["value"] == rank_of_a(a, b, c) == aro
            assert _by(rows, "nearest_class", level=lv, distance=dist)[0]["value"] == 1  # mean 130
        assert _by(rows, "aro", level=lv)[0]["value"] == aro
    assert _by(rows, "aro", level="mean")[0]["value"] == aro
    expected_keys = {"metric", "value", "level", "pair"}
    assert all(set(r) == expected_keys for r in rows if r["metric"] in DISTANCES)
    assert "distances" in ANALYSES


def test_malicious_identical_to_the_target_ranks_first():
    """Every target-class and triggered image is the same constant image: a = b = 0 exactly for
    MMD², ED² and SWD1 while c > 0; the tie goes to the lower rank (rank_of_a), so ARO = 1.0."""
    rows = distances(_stub(100.0, std=0.0), CFG)
    for lv in ("s1", "s3"):
        for dist in DISTANCES:
            a, b, c = (_by(rows, dist, level=lv, pair=p)[0]["value"] for p in ("malicious", "intra", "inter"))
            assert a == b == 0.0 and c > 0, (dist, a, b, c)
            assert _by(rows, "rank", level=lv, distance=dist)[0]["value"] == 1
        assert _by(rows, "aro", level=lv)[0]["value"] == 1.0
    assert _by(rows, "aro", level="mean")[0]["value"] == 1.0


def test_analysis_skips_without_a_single_target():
    for stub in (_stub(200, attack="none"), _stub(200, mode="all_to_all"), _stub(200, per_class=15),
                 _stub(200, n_trig=5)):
        rows = distances(stub, CFG)
        assert len(rows) == 1 and rows[0]["metric"] == "aro_skipped" and rows[0]["reason"]
    with pytest.raises(ConfigError, match="s9"):
        distances(_stub(200), {**CFG, "levels": ["s9"]})


def test_distances_in_a_tiny_pipeline_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg("analysis=[distances]", "analysis.distances.set_size=20", "analysis.distances.repeats=1",
                   "analysis.distances.num_projections=20")
    assert cfg.analysis.distances.levels == ["s1", "s2", "s3"]
    rows = [r for r in pipeline.run(cfg, tmp_path / "run")["metrics"] if r.get("analysis") == "distances"]
    assert not _by(rows, "aro_skipped"), rows
    # (the set size depends on the tiny model's predictions; its rule is pinned on the stubs above)
    assert len(_by(rows, "rank")) == 9
    aros = {r["level"]: r["value"] for r in _by(rows, "aro")}
    assert set(aros) == {"s1", "s2", "s3", "mean"}
    for lv in ("s1", "s2", "s3"):
        ranks = []
        for dist in DISTANCES:
            a, b, c = (_by(rows, dist, level=lv, pair=p)[0]["value"] for p in ("malicious", "intra", "inter"))
            (rank,) = _by(rows, "rank", level=lv, distance=dist)
            assert rank["value"] == rank_of_a(a, b, c)  # the recorded rank is the rank of the recorded a
            ranks.append(rank["value"])
        assert aros[lv] == pytest.approx(np.mean(ranks))
    assert aros["mean"] == pytest.approx(np.mean([aros[lv] for lv in ("s1", "s2", "s3")]))


def test_exclude_reserve_draws_outside_the_reserve():
    stub = _stub(250.0)
    stub.screen_index = torch.arange(0, 180, 2)  # every other clean image; 30 per class
    rows = distances(stub, {**CFG, "exclude_reserve": True})
    assert _by(rows, "set_size")[0]["value"] == 15  # min(25, 30 // 2, ...)
    assert _by(rows, "aro", level="mean")[0]["value"] == 3.0
