"""ISCP class-wise patterns (ISCP §3-4, App. A): mask search, top-k, PW, batching, the analysis end to end,
the `pw` report, the adversarial regime (docs/training.md) and the ISCP presets."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bdexp import pipeline
from bdexp.analysis.pattern_search import (Job, SearchOptions, iou, pasted_predictions, predictive_power,
                                           search_masks, top_k_mask)
from bdexp.analysis.patterns import PatternOptions, options, patterns, split
from bdexp.data.loader import to_uint8
from bdexp.errors import BdexpError, ConfigError
from bdexp.evaluate import predict
from bdexp.models import build_model
from bdexp.seeding import numpy_rng
from bdexp.training import REGIMES
from bdexp.training.adversarial import pgd
from tests.conftest import compose_cfg

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and on a shared 2-core machine it avoids
    OpenMP oversubscription (measured here: 8 s with one thread, up to 150 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _convnet(classes=4, channels=3, size=16, seed=0, double=False):
    torch.manual_seed(seed)
    net = build_model(OmegaConf.create({"name": "convnet", "width": 0.25}), in_channels=channels,
                      num_classes=classes, image_size=size, mean=[0.5] * channels, std=[0.25] * channels)
    return (net.double() if double else net).eval()


def _jobs(x, y, classes, per_class=2, white=True):
    """Canvases: the first `per_class` images of each class (+ one white canvas)."""
    jobs = []
    for c in classes:
        for i, idx in enumerate(np.flatnonzero(y.numpy() == c)[:per_class]):
            jobs.append(Job(c, x[idx], "positive", i, seed=100 * c + i))
        if white:
            jobs.append(Job(c, torch.ones_like(x[0]), "white", 0, seed=100 * c + 50))
    return jobs


def _pools(y, classes):
    return {c: torch.as_tensor(np.flatnonzero(y.numpy() != c)) for c in classes}


# ---- the search ----------------------------------------------------------------------------------

def test_mask_stays_in_unit_interval_after_every_update():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 3, 16, 16, generator=g), torch.arange(40) % 4
    # Big steps from the extremes: without the clip of Alg. 1 line 8 masks would leave [0, 1].
    for init, step in ((0.0, 0.7), (1.0, 0.7), (0.5, 0.3)):
        opts = SearchOptions(step_size=step, epochs=2, mask_init=init, tv_weight=0.5)
        res = search_masks(_convnet(), x, _pools(y, [1, 2]), _jobs(x, y, [1, 2]), opts, CPU)
        for m in (res.masks, res.mean_masks):
            assert m.shape == (len(res.loss), 16, 16) and float(m.min()) >= 0.0 and float(m.max()) <= 1.0
        assert bool(((res.masks == 0) | (res.masks == 1)).any())  # the clip was active
        assert torch.isfinite(res.loss).all()


@pytest.mark.parametrize("hw", [(16, 16), (28, 28), (32, 32), (10, 10)])
def test_top_k_keeps_exactly_k_pixels_even_with_ties(hw):
    h, w = hw
    g = torch.Generator().manual_seed(1)
    masks = torch.cat([
        (torch.rand(3, h, w, generator=g) * 3).floor() / 2,  # values in {0, 0.5, 1}: many ties
        torch.zeros(1, h, w), torch.ones(1, h, w),  # all tied
        torch.rand(2, h, w, generator=g),
    ])
    tiebreak = torch.rand(masks.shape, generator=g)
    for size in (0.01, 0.02, 0.03, 0.05, 0.1, 0.5, 1.0):
        k = max(1, round(size * h * w))
        for tb in (None, tiebreak):
            out = top_k_mask(masks, size, tb)
            assert out.shape == masks.shape and set(out.unique().tolist()) <= {0.0, 1.0}
            assert out.flatten(1).sum(1).tolist() == [k] * len(masks)
            for i in range(len(masks)):  # the kept values are the largest ones
                kept, dropped = masks[i][out[i] == 1], masks[i][out[i] == 0]
                if len(dropped):
                    assert float(kept.min()) >= float(dropped.max())
                    if tb is not None:  # among values tied at the threshold, the larger tie-break wins
                        edge = float(kept.min())
                        tied_kept = tb[i][(out[i] == 1) & (masks[i] == edge)]
                        tied_dropped = tb[i][(out[i] == 0) & (masks[i] == edge)]
                        if len(tied_kept) and len(tied_dropped):
                            assert float(tied_kept.min()) >= float(tied_dropped.max())
    with pytest.raises(ConfigError, match="fraction"):
        top_k_mask(masks, 0.0)


def test_pw_of_an_all_zero_pattern_is_the_base_rate():
    """With m_γ = 0 nothing is pasted, so PW = P(f(x_n) = y) / ACC(f(x_y), y) (ISCP §4):
    the share of non-target images the model already sends to y, relative to its accuracy on y."""
    g = torch.Generator().manual_seed(2)
    model = _convnet(classes=3, seed=3)
    x, y = torch.rand(90, 3, 16, 16, generator=g), torch.arange(90) % 3
    pred = predict(model, x, CPU)
    checked = 0
    for c in range(3):
        acc = float((pred[y == c] == c).float().mean())
        if acc == 0:
            continue
        base = float((pred[y != c] == c).float().mean()) / acc  # computed directly
        zero = torch.zeros(1, 16, 16)
        hits = pasted_predictions(model, zero, torch.rand(1, 3, 16, 16, generator=g), x[y != c], CPU)[0] == c
        assert predictive_power(hits, acc) == pytest.approx(base, abs=1e-12)
        checked += 1
    assert checked >= 1 and predictive_power(0.5, 0.0) != predictive_power(0.5, 0.0)  # NaN without accuracy


def test_batched_search_equals_separate_searches():
    """K masks in one forward pass = K single searches (module docstring of pattern_search)."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(45, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.as_tensor([0] * 9 + [1] * 15 + [2] * 21)  # unequal D_n sizes: classes run different step counts
    model, classes = _convnet(classes=3, double=True), [0, 1, 2]
    jobs, pools = _jobs(x, y, classes), _pools(y, classes)
    for opts in (SearchOptions(epochs=2), SearchOptions(epochs=2, tv_weight=0.3, learn_canvas=True, alternate_steps=2)):
        together = search_masks(model, x, pools, jobs, opts, CPU)
        chunked = search_masks(model, x, pools, jobs, SearchOptions(**{**vars(opts), "masks_per_step": 2}), CPU)
        assert len(set(together.steps)) == 3
        for k, job in enumerate(jobs):
            alone = search_masks(model, x, pools, [job], opts, CPU)
            for res in (together, chunked):
                assert torch.allclose(res.masks[k], alone.masks[0], atol=1e-9)
                assert torch.allclose(res.canvases[k], alone.canvases[0], atol=1e-9)
                assert float(res.loss[k]) == pytest.approx(float(alone.loss[0]), rel=1e-9)
        if opts.learn_canvas:
            assert not torch.equal(together.canvases[0], jobs[0].canvas.double())  # the canvas was learned


# ---- a known answer: a model whose class-0 logit reads one 2x2 region -------------------------------

REGION = (slice(3, 5), slice(12, 14))  # 4 pixels = 1 % of a 20x20 image


class RegionModel(nn.Module):
    """Class 0 iff the mean of REGION is above 0.6; classes 1/2 from the image mean."""

    def forward(self, x, features=False):
        region = x[:, 0, REGION[0], REGION[1]].mean((1, 2))
        mean = x.mean((1, 2, 3))
        return torch.stack([12 * (region - 0.6), 0.5 - mean, 2 * (mean - 0.25)], 1)


def _region_exp(tmp_path):
    g = torch.Generator().manual_seed(5)
    y = torch.arange(240) % 3
    x = torch.rand(240, 1, 20, 20, generator=g) * 0.5
    x[y == 0, 0, REGION[0], REGION[1]] = 1.0  # class-0 images carry the region
    trigger = torch.zeros(20, 20, dtype=torch.bool)
    trigger[REGION] = True
    return SimpleNamespace(
        cfg=None, device=CPU, target=0, info={"run_dir": tmp_path},
        model=RegionModel(), data=SimpleNamespace(x_test=to_uint8(x), y_test=y, num_classes=3, classes=["a", "b", "c"]),
        attack=SimpleNamespace(name="patched", poisons=True, mode="all_to_one", target=0, trigger_mask=lambda: trigger),
        rng=lambda tag: numpy_rng(0, tag),
    ), trigger


def _by(rows, metric, **tags):
    return [r for r in rows if r["metric"] == metric and all(r.get(k) == v for k, v in tags.items())]


def test_known_answer_the_1pct_pattern_is_the_region(tmp_path):
    exp, trigger = _region_exp(tmp_path)
    cfg = {"classes": [0, 1], "sizes": [0.01, 0.05], "canvases": ["positive", "white"], "num_canvases": 2,
           "subset_fraction": 0.5, "samples": 3, "per_canvas": True}
    rows = patterns(exp, cfg)
    # Pasting the region at 1.0 (positive or white canvas) gives logit 0 = 12·0.4 = 4.8 against at
    # most 0.5 for classes 1/2, so every non-target image goes to class 0: PW = 1 / ACC = 1, at 1 %
    # and at 5 % (16 more pasted pixels raise the image mean by at most 0.04).
    assert _by(rows, "class_acc", **{"class": 0})[0]["value"] == 1.0
    for size in (0.01, 0.05):
        (pw,) = _by(rows, "pw", **{"class": 0, "size": size})
        assert pw["value"] == 1.0
        assert [r["value"] for r in _by(rows, "pw_by_canvas", **{"class": 0, "size": size})] == [1.0, 1.0]
    assert _by(rows, "trigger_iou")[0]["value"] == 1.0  # the 1 % pattern is exactly the region
    assert _by(rows, "trigger_pw")[0]["value"] == 1.0
    # Class 1 wins every image without the region (0.5 − mean > 2·(mean − 0.25) while mean < 1/3),
    # so ACC(1) = 1. A positive canvas has the region dark: pasting it removes class 0's evidence,
    # PW = 1. A white canvas can only brighten the region: only the class-2 images (already called
    # 1) count, PW = n(class 2) / n(classes 0 and 2) in the PW set.
    _, pw_set = split(exp, options(cfg, 3))
    y_pw = exp.data.y_test[torch.as_tensor(pw_set)]
    assert _by(rows, "class_acc", **{"class": 1})[0]["value"] == 1.0
    white = float((y_pw == 2).sum() / (y_pw != 1).sum())
    for size in (0.01, 0.05):
        by_canvas = {r["canvas"]: r["value"] for r in _by(rows, "pw_by_canvas", **{"class": 1, "size": size})}
        assert by_canvas == {"positive": 1.0, "white": pytest.approx(white, abs=1e-12)}
        assert _by(rows, "pw", **{"class": 1, "size": size})[0]["value"] == 1.0  # the lower-loss positive one
    assert {r["size"] for r in _by(rows, "mpw")} == {0.01, 0.05} and len(_by(rows, "pw_std")) == 2
    assert len(_by(rows, "pw_by_canvas")) == 2 * 2 * 2  # classes x sizes x canvas types
    assert _by(rows, "search_images")[0]["value"] == 120 and _by(rows, "pw_images")[0]["value"] == 120
    for name in ("patterns.png", "patterns_canvases.png", "pattern_samples.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert iou(trigger, trigger) == 1.0 and iou(trigger, ~trigger) == 0.0
    # At trigger_size 5 % (20 px) the target pattern holds the 4-px region and 16 other pixels: IoU 4/20.
    rows = patterns(exp, {**cfg, "trigger_size": 0.05, "figure": False})
    assert _by(rows, "trigger_iou")[0]["value"] == pytest.approx(0.2, abs=1e-12)
    assert _by(rows, "trigger_pw")[0]["value"] == 1.0


def test_option_errors():
    for bad, match in (({"canvases": ["blue"]}, "canvases"), ({"canvases": []}, "canvases"),
                       ({"sizes": [0.0]}, "sizes"), ({"sizes": []}, "sizes"), ({"classes": [5]}, "classes"),
                       ({"typo": 1}, "typo"), ({"pw_on": "some"}, "pw_on"), ({"weighting": "mine"}, "weighting"),
                       ({"step_size": 0}, "step_size"), ({"select_by": "best"}, "select_by")):
        with pytest.raises(ConfigError, match=match):
            options(bad, 3)
    opts = options({}, 3)  # defaults: conf/analysis/patterns.yaml (ISCP App. A)
    assert opts.classes == (0, 1, 2) and opts.sizes == (0.01, 0.02, 0.03, 0.05, 0.1)
    s = opts.search
    assert isinstance(s, SearchOptions) and not isinstance(s, PatternOptions)
    assert (s.alpha, s.step_size, s.batch_size, s.epochs, s.mask_init) == (0.2, 0.02, 4, 5, 0.5)
    assert opts.num_canvases == 5 and opts.subset_fraction == 0.2
    assert SearchOptions(weighting="code").weights == (0.2, 1.6)  # 0.8·Σm/(HW/2) = 1.6‖m‖₁/n


# ---- adversarial training (docs/training.md) ------------------------------------------------------

def test_pgd_stays_in_the_eps_ball_and_raises_the_loss():
    model = _convnet(seed=6)
    g = torch.Generator().manual_seed(7)
    x, y = torch.rand(16, 3, 16, 16, generator=g), torch.arange(16) % 4
    x[:4], x[4:8] = 0.0, 1.0  # images at the range's edges: the [0, 1] projection must act
    eps = 8 / 255
    regime = REGIMES.get("adversarial")(compose_cfg(["train=adversarial"]).train)
    assert (regime.eps, regime.step, regime.steps) == (eps, 2 / 255, 10)
    model.train()
    x_adv = regime.adversarial(model, x, y)
    assert model.training  # the mode is restored after the attack
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    ce = nn.functional.cross_entropy
    model.eval()
    fixed = pgd(model, x, y, eps, 2 / 255, 10, random_start=False)
    with torch.no_grad():
        clean = float(ce(model(x), y))
        assert float(ce(model(x_adv), y)) > clean and float(ce(model(fixed), y)) > clean
    loss, logits = regime.loss(model.train(), SimpleNamespace(x=x, y=y))  # trains on x_adv
    assert logits.shape == (16, 4) and float(loss.detach()) == pytest.approx(float(ce(logits.detach(), y)))
    with pytest.raises(ConfigError, match="pgd_model_mode"):
        REGIMES.get("adversarial")(OmegaConf.create({"name": "adversarial", "pgd_model_mode": "half"}))


# ---- end to end: pipeline, report, presets ---------------------------------------------------------

TINY_PATTERNS = ["analysis=[patterns]", "analysis.patterns.sizes=[0.02,0.1]", "analysis.patterns.num_canvases=2",
                 "analysis.patterns.canvases=[positive,white]", "analysis.patterns.epochs=1",
                 "analysis.patterns.subset_fraction=0.4", "analysis.patterns.samples=2"]


def test_tiny_pipeline_patterns_and_the_pw_report(tiny_cfg, tmp_path):
    from bdexp.report.cli import report

    out = pipeline.run(tiny_cfg(*TINY_PATTERNS), tmp_path / "runs" / "standard")
    rows = [r for r in out["metrics"] if r.get("analysis") == "patterns"]
    classes = range(4)  # synthetic: 4 classes
    for size in (0.02, 0.1):
        values = []
        for c in classes:
            (row,) = _by(rows, "pw", **{"class": c, "size": size})
            assert row["canvas"] in ("positive", "white")
            values.append(row["value"])
        # mPW and its STD are the mean and population std of the class PWs (ISCP Table 1)
        assert _by(rows, "mpw", size=size)[0]["value"] == pytest.approx(np.nanmean(values))
        assert _by(rows, "pw_std", size=size)[0]["value"] == pytest.approx(np.nanstd(values))
    assert _by(rows, "search_s")[0]["value"] > 0
    assert _by(rows, "search_s")[0]["masks"] == 4 * 2 * 2  # classes x canvas types x N
    assert len(_by(rows, "trigger_iou")) == 1  # its value is pinned on RegionModel above
    assert (tmp_path / "runs" / "standard" / "patterns.png").exists()
    assert (tmp_path / "runs" / "standard" / "pattern_samples.png").exists()

    adv = tiny_cfg(*TINY_PATTERNS, "train=adversarial", "train.steps=2", "attack=none", "train.epochs=2",
                   "analysis.patterns.per_canvas=true")
    assert adv.train.name == "adversarial"
    pipeline.run(adv, tmp_path / "runs" / "adversarial")
    written = report(tmp_path / "runs", tmp_path / "report", "pw")
    text = written["md"].read_text()
    assert "mPW" in text and "STD" in text and "2%" in text and "10%" in text and "adversarial" in text
    assert written["png"].exists()
    assert "trigger_iou" in report(tmp_path / "runs", tmp_path / "report", "pw_trigger")["md"].read_text()
    canvas = report(tmp_path / "runs", tmp_path / "report", "pw_canvas")  # only the per_canvas run has rows
    assert "white" in canvas["md"].read_text() and canvas["png"].exists()
    with pytest.raises(BdexpError, match="pw_canvas"):
        report(tmp_path / "runs" / "standard", tmp_path / "report", "pw_canvas")  # per_canvas is off by default


@pytest.mark.parametrize("preset", ["iscp_natural", "iscp_canvases", "iscp_backdoor", "iscp_adversarial"])
def test_presets_compose_with_scale_cpu(preset):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    cfg = compose_cfg([f"experiment={preset}", "scale=cpu"])
    assert "patterns" in cfg.analysis and cfg.train.epochs == 8 and cfg.dataset.test_limit == 2000
    opts = options(cfg.analysis.patterns, 10)
    assert opts.sizes == (0.01, 0.02, 0.03, 0.05, 0.1)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="bdexp.conf", version_base="1.3"):
        hcfg = compose("config", overrides=[f"experiment={preset}", "scale=cpu"], return_hydra_config=True)
    sweep = dict(hcfg.hydra.sweeper.params or {})
    if preset == "iscp_adversarial":
        assert set(sweep["train"].split(",")) == {"standard", "adversarial"}
        assert REGIMES.get("adversarial") and cfg.attack.name == "none"
    if preset == "iscp_backdoor":
        assert set(sweep["attack"].split(",")) == {"patched", "none"} and cfg.attack.name == "patched"
    if preset == "iscp_canvases":
        assert opts.canvases == ("positive", "negative", "random", "white") and opts.per_canvas
