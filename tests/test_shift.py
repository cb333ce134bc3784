"""analysis=[shift] (OVL Theorem 2 / Fig. 5; docs/analyses.md), its report table and preset."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bdexp import pipeline
from bdexp.analysis.overlap import overlap_bound
from bdexp.analysis.shift import mixture, shift, shift_draws
from bdexp.errors import ConfigError
from bdexp.report.cli import report
from bdexp.report.collect import collect
from bdexp.report.tables import TABLES
from bdexp.seeding import numpy_rng
from tests.conftest import CONF_DIR, compose_cfg, with_tiny

RHOS = [round(i / 10, 6) for i in range(11)]
SPACES = ["input", "hidden", "output"]
NORMS = ["l1", "l2", "linf"]


def _by(rows, metric, **tags):
    return [r for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in tags.items())]


def _one(rows, metric, **tags) -> float:
    found = _by(rows, metric, **tags)
    assert len(found) == 1, (metric, tags, found)
    return found[0]["value"]


# ---- the analysis on a hand-made Experiment -----------------------------------------------------

def _stub(*, wrong_clean=0.1, right_trig=0.2, per_class=40, classes=4, empty=False):
    """Four classes of 6×6 uint8 'images' around grey levels 60/100/140/180; the backdoor test set
    is every non-target image with a white 2×2 corner. A fraction `wrong_clean` of clean
    predictions is wrong, a fraction `right_trig` of triggered ones keeps the true label."""
    g = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    x = torch.as_tensor(np.clip(g.normal(60 + 40 * y[:, None, None, None], 20, (len(y), 1, 6, 6)), 0, 255).astype(np.uint8))
    index = torch.as_tensor(np.flatnonzero(y != 0)[: 0 if empty else None])
    trig = x[index].float() / 255
    trig[..., -2:, -2:] = 1.0
    pred = y.copy()
    flip = g.random(len(y)) < wrong_clean
    pred[flip] = (y[flip] + 1) % classes
    y_true = torch.as_tensor(y)[index]
    pred_bd = torch.where(torch.as_tensor(g.random(len(index)) < right_trig), y_true, torch.zeros_like(y_true))
    w = torch.as_tensor(g.normal(size=(36, classes)), dtype=torch.float32)

    def features(images, levels=("s1", "s2", "s3", "penult")):
        flat = images.float().flatten(1)
        return flat @ w, {lv: torch.relu(flat - 0.5) * 3 for lv in levels}

    return SimpleNamespace(
        cfg=None, device=torch.device("cpu"), target=0,
        attack=SimpleNamespace(name="patched", poisons=True, mode="all_to_one", target=0),
        data=SimpleNamespace(x_test=x, y_test=torch.as_tensor(y), num_classes=classes),
        backdoor_test=SimpleNamespace(x=trig, index=index, y_true=y_true, y_target=torch.zeros_like(y_true)),
        pred_test=torch.as_tensor(pred), pred_backdoor=pred_bd,
        features=features, rng=lambda tag: numpy_rng(0, tag),
    )


CFG = {"set_size": 500, "repeats": 2, "num_radii": 10}


@pytest.mark.parametrize("clean_from", ["disjoint", "p"])
def test_measured_accuracy_is_the_accuracy_of_the_drawn_mixture(clean_from):
    exp = _stub()
    rows = shift(exp, {**CFG, "clean_from": clean_from})
    m = int(_one(rows, "shift_set_size"))
    n_clean, n_trig = len(exp.data.y_test), len(exp.backdoor_test.y_true)
    assert m == min(500, n_clean // 2 if clean_from == "disjoint" else n_clean, n_trig)
    for metric in ("shift_bound", "shift_overlap"):
        assert {(r["rho"], r["space"], r["norm"]) for r in _by(rows, metric)} == \
            {(rho, s, n) for rho in RHOS for s in SPACES for n in NORMS}
        assert len(_by(rows, metric)) == len(RHOS) * 9

    correct_clean = (exp.pred_test == exp.data.y_test).numpy()
    correct_trig = (exp.pred_backdoor == exp.backdoor_test.y_true).numpy()
    draws = shift_draws(numpy_rng(0, "shift"), n_clean, n_trig, m, 2, clean_from)  # the analysis's own draws
    for d in draws:
        if clean_from == "disjoint":
            assert not set(d["P"]) & set(d["clean"])  # P is disjoint from T's clean part
        else:
            assert np.array_equal(d["P"], d["clean"])
    assert _one(rows, "shift_clean_acc") == pytest.approx(np.mean([correct_clean[d["P"]].mean() for d in draws]))
    assert _one(rows, "shift_trigger_acc") == pytest.approx(correct_trig.mean())
    for rho in RHOS:
        want = np.mean([np.r_[correct_clean[tc], correct_trig[tt]].mean() for tc, tt in (mixture(d, rho, m) for d in draws)])
        assert _one(rows, "shift_acc", rho=rho) == pytest.approx(want, abs=1e-12)
    # ρ = 1: the clean accuracy of the sampled clean part; ρ = 0: accuracy on the triggered sample
    assert _one(rows, "shift_acc", rho=1.0) == pytest.approx(np.mean([correct_clean[d["clean"]].mean() for d in draws]))
    assert _one(rows, "shift_acc", rho=0.0) == pytest.approx(np.mean([correct_trig[d["triggered"]].mean() for d in draws]))


def test_bound_is_theorem_2_of_the_overlap_bound():
    exp = _stub()
    rows = shift(exp, {**CFG, "repeats": 1})
    m = int(_one(rows, "shift_set_size"))
    (draw,) = shift_draws(numpy_rng(0, "shift"), len(exp.data.y_test), len(exp.backdoor_test.y_true), m, 1, "p")
    a_p, a_q = _one(rows, "shift_clean_acc"), _one(rows, "shift_trigger_acc")
    for rho in (0.0, 0.3, 1.0):
        tc, tt = mixture(draw, rho, m)
        p = exp.data.x_test[draw["P"]].float().flatten(1) / 255  # input space: pixels in [0, 1]
        t = torch.cat([exp.data.x_test[tc].float().flatten(1) / 255, exp.backdoor_test.x[tt].flatten(1)])
        for norm, name in ((1, "l1"), (2, "l2"), (math.inf, "linf")):
            b = overlap_bound(p, t, norm, 10)
            assert _one(rows, "shift_overlap", rho=rho, space="input", norm=name) == pytest.approx(b, abs=1e-6)
            assert _one(rows, "shift_bound", rho=rho, space="input", norm=name) == pytest.approx(a_q + (a_p - a_q) * b, abs=1e-6)
    for r in _by(rows, "shift_bound"):  # a_Q + (a_P − a_Q)·b with b ∈ [0, 1]
        assert a_q - 1e-12 <= r["value"] <= a_p + 1e-12


def test_a_measured_accuracy_above_the_bound_is_reported(caplog):
    """With perfect clean predictions a_P = 1 = the accuracy at ρ = 1, while the plug-in bound of two
    different samples is < 1: with zero tolerance the check must fire (the finite-sample shortfall
    `tolerance: auto` exists for, see bdexp/analysis/shift.py)."""
    with caplog.at_level(logging.WARNING, logger="bdexp.analysis.shift"):
        rows = shift(_stub(wrong_clean=0.0), {**CFG, "tolerance": 0, "spaces": ["input"], "norms": [2],
                                              "clean_from": "disjoint"})
    assert _one(rows, "shift_acc", rho=1.0) == 1.0 > _one(rows, "shift_bound", rho=1.0, space="input", norm="l2")
    count = sum(_one(rows, "shift_acc", rho=rho) > _one(rows, "shift_bound", rho=rho, space="input", norm="l2")
                for rho in RHOS)
    assert _one(rows, "shift_violations") == count >= 1
    assert "exceeds the Theorem 2 bound" in caplog.text


def test_config_errors_and_skips():
    exp = _stub()
    for bad, match in (({"spaces": ["pixels"]}, "spaces"), ({"norms": [3]}, "norms"), ({"hidden_level": "s9"}, "hidden_level"),
                       ({"purities": [0.5, 1.5]}, "purities"), ({"output": "probs"}, "output"),
                       ({"tolerance": -1}, "tolerance"), ({"center": "median"}, "center"), ({"repeats": 0}, "repeats")):
        with pytest.raises(ConfigError, match=match):
            shift(exp, {**CFG, **bad})
    rows = shift(_stub(empty=True), CFG)
    assert len(rows) == 1 and rows[0]["metric"] == "shift_skipped"


# ---- end to end: a tiny pipeline run, its report, the preset ----------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # 300 test images: m = 150 per set (the tolerance √(2/m) = 0.115; the tiny default of 96 gives 0.2)
    cfg = compose_cfg(with_tiny("analysis=[shift]", "dataset.test_size=300", "analysis.shift.repeats=1"))
    assert list(cfg.analysis.shift.spaces) == SPACES and cfg.analysis.shift.hidden_level == "penult"
    path = tmp_path_factory.mktemp("shift") / "run"
    pipeline.run(cfg, path)
    return path


def test_shift_in_a_tiny_pipeline_run(run_dir):
    rows = [r for r in collect(run_dir).to_dict("records") if r.get("analysis") == "shift"]
    rows = [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))} for r in rows]
    assert not _by(rows, "shift_skipped"), rows
    m = _one(rows, "shift_set_size")
    tol = math.sqrt(2 / m)
    assert _one(rows, "shift_violations") == 0 and _by(rows, "shift_violations")[0]["tolerance"] == pytest.approx(tol)
    a_p, a_q = _one(rows, "shift_clean_acc"), _one(rows, "shift_trigger_acc")
    assert a_q < 0.5 < a_p  # the backdoor works on the tiny model
    for rho in RHOS:
        acc = _one(rows, "shift_acc", rho=rho)
        for s in SPACES:
            for n in NORMS:
                bound = _one(rows, "shift_bound", rho=rho, space=s, norm=n)
                # Theorem 2: measured ≤ bound, up to the plug-in bound's sampling shortfall (shift.py)
                assert a_q - 1e-9 <= bound <= a_p + 1e-9 and acc <= bound + tol, (rho, s, n, acc, bound)


def test_shift_table_and_plot_render_from_the_run_dir(run_dir, tmp_path):
    table = TABLES.get("shift")(collect(run_dir))
    assert list(table.index) == RHOS
    assert list(table.columns) == [("actual", "acc")] + [(s, n) for s in SPACES for n in NORMS]
    rows = collect(run_dir)
    cell = rows[(rows.metric == "shift_bound") & (rows.rho == 0.5) & (rows.space == "hidden") & (rows.norm == "l2")]
    assert table.loc[0.5, ("hidden", "l2")] == pytest.approx(cell["value"].item())
    written = report(run_dir, tmp_path, "shift")
    assert written["md"].read_text().startswith("## shift") and written["png"].stat().st_size > 0


@pytest.mark.parametrize("extra", [[], ["scale=cpu"]])
def test_preset_composes(extra):
    cfg = compose_cfg(["experiment=ovl_shift", *extra])
    assert cfg.attack.name == "patched" and list(cfg.analysis) == ["shift"] and not cfg.get("defense")
    assert cfg.analysis.shift.purities == RHOS and list(cfg.analysis.shift.norms) == [1, 2, "inf"]
    assert "dataset" in OmegaConf.load(CONF_DIR / "experiment" / "ovl_shift.yaml").hydra.sweeper.params
    if extra:
        assert cfg.dataset.train_limit == 10000


def test_clean_part_from_p_makes_t_equal_p_at_full_purity():
    """clean_from=p (default): T's clean images are P's own, so at ρ = 1 the samples are identical,
    the bound is 1 in every space and norm and the accuracy on T is the accuracy on P."""
    rows = shift(_stub(), {**CFG, "repeats": 2})
    assert _one(rows, "shift_acc", rho=1.0) == pytest.approx(_one(rows, "shift_clean_acc"))
    for r in _by(rows, "shift_overlap"):
        if r["rho"] == 1.0:
            assert r["value"] == pytest.approx(1.0)
    assert _one(rows, "shift_violations") == 0
