"""`analysis=[patterns]`: class-wise input-space patterns and their predictive power (ISCP §3, §4).

For every class y in `classes`: pick N canvases of each type (ISCP §3 "Canvas Sampling"), search
a mask on each (pattern_search.py: all classes and canvases batched), binarize its top-k% (each
of `sizes`) into m_γ, keep the lowest-loss pattern p_y = m_γ⊙x_c (`select_by`, see `choose`) and
measure it by
    PW = ACC(f(x_n with p_y pasted), y) / ACC(f(x_y), y)                           (ISCP §4)
over the non-target (x_n) and class-y (x_y) images of the PW set.

Data split (decision, documented in conf/analysis/patterns.yaml): the test set is split once
with exp.rng("patterns/split") into a search part (`subset_fraction`, ISCP: 20 %) and the rest.
D_n(y) and the positive/negative/random canvases come from the search part only. PW is measured on
the rest (`pw_on: heldout`, ISCP App. B.2, Table 3) or, as in the paper's main tables, on the
whole test set (`pw_on: all`). The defender's clean reserve is not excluded by default: this is a
model inspection that changes nothing other methods read (`exclude_reserve: true` restricts
everything to the test images outside the reserve).

Backdoor use (ISCP §4.3, Fig. 7): when the attack has a trigger mask (patched) and one target
class t is searched, the t pattern at `trigger_size` (1 %) gives `trigger_pw` and its IoU with the
real trigger's pixels `trigger_iou`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bdexp.analysis import ANALYSES
from bdexp.analysis.pattern_search import (Job, SearchOptions, Selection, iou, pasted_apply, pasted_predictions,
                                           predictive_power, search_masks)
from bdexp.attacks import has_backdoor
from bdexp.data.loader import iterate_eval, to_float
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.results import record
from bdexp.seeding import derive_seed

log = logging.getLogger(__name__)

Canvas = Literal["positive", "negative", "random", "white"]  # ISCP §3, Canvas Sampling


@dataclass(frozen=True)
class PatternOptions(SearchOptions):
    """conf/analysis/patterns.yaml: what is searched and measured, plus the search's own options
    (`SearchOptions`, the same flat keys; `.search` is that part)."""

    classes: tuple[int, ...] | None = option(None, lo=0)  # class indices; None = every class (ISCP Tables 1-2)
    sizes: tuple[float, ...] = option([0.01, 0.02, 0.03, 0.05, 0.1], lo=0, hi=1, lo_open=True)  # of H*W (Tables 1-3)
    canvases: tuple[Canvas, ...] = option(["positive", "negative", "random", "white"])
    num_canvases: int = option(5, lo=1)  # N canvases per type; the lowest-loss one is kept (ISCP §3, App. D.3)
    subset_fraction: float = option(0.2, lo=0, hi=1, lo_open=True)  # the search part of the test set (ISCP §4)
    pw_on: Literal["heldout", "all"] = "heldout"  # PW on the rest (ISCP App. B.2) or on the whole test set (§4)
    exclude_reserve: bool = False  # only test images outside the defender's clean reserve
    select_by: Literal["search", "pattern"] = "pattern"  # what "the lowest loss" is (`choose`)
    select_images: int = option(128, lo=1)  # D_n images (per class) the patterns are scored on (select_by=pattern)
    per_canvas: bool = False  # also measure each canvas type's best pattern (ISCP Fig. 12)
    trigger_size: float = option(0.01, lo=0, hi=1, lo_open=True)  # compared with the real trigger (ISCP §4.3)
    figure: bool = True  # write the PNGs into the run dir
    figure_size: float = option(0.05, lo=0, hi=1, lo_open=True)  # shown in the figures (ISCP Figs. 2, 9)
    samples: int = option(6, lo=0)  # pattern-attached non-target images shown per class (ISCP Fig. 2)

    @property
    def search(self) -> SearchOptions:
        return SearchOptions(**{k: getattr(self, k) for k in SearchOptions.fields()})


def options(cfg, num_classes: int) -> PatternOptions:
    """The analysis options of `cfg` (defaults: PatternOptions) with `classes` resolved: every
    class when null, else checked against `num_classes`."""
    opts = PatternOptions.of(cfg, "analysis.patterns")
    classes = tuple(range(num_classes)) if opts.classes is None else opts.classes
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
        raise ConfigError(f"analysis.patterns.classes={list(classes)}: need distinct class indices in "
                          f"[0, {num_classes - 1}] (or null for all)")
    empty = [k for k in ("sizes", "canvases") if not getattr(opts, k)]
    if empty:
        raise ConfigError(f"analysis.patterns: {', '.join(empty)} must not be empty")
    return dataclasses.replace(opts, classes=classes)


def split(exp, opts: PatternOptions) -> tuple[np.ndarray, np.ndarray]:
    """(search indices, PW indices) into the test set; see the module docstring."""
    pool = exp.screen_index.numpy() if opts.exclude_reserve else np.arange(len(exp.data.y_test))
    perm = exp.rng("patterns/split").permutation(pool)
    n_search = int(round(opts.subset_fraction * len(pool)))
    search, rest = np.sort(perm[:n_search]), np.sort(perm[n_search:])
    if opts.pw_on == "heldout" and len(rest) == 0:
        raise ConfigError("analysis.patterns: subset_fraction=1 leaves no held-out images; set pw_on=all")
    return search, (rest if opts.pw_on == "heldout" else np.sort(pool))


@torch.no_grad()
def logits_of(model, x: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb).float().cpu() for xb in iterate_eval(x, batch_size, device)])


def canvas_indices(kind: str, c: int, y: np.ndarray, pred: np.ndarray, prob: np.ndarray, n: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Positions (into the search part) of up to n canvases of one type for class c (ISCP §3):
    positive = the n most confident correctly classified class-c images (all class-c images by
    confidence when none is correct); negative = the n non-target images with the highest p_c, so
    the most confidently misclassified into c come first (ISCP §3); random = n random class-c
    images."""
    own = np.flatnonzero(y == c)
    if kind == "positive":
        correct = own[pred[own] == c]
        cand = correct if len(correct) else own
        return cand[np.argsort(-prob[cand, c], kind="stable")][:n]
    if kind == "negative":
        other = np.flatnonzero(y != c)
        return other[np.argsort(-prob[other, c], kind="stable")][:n]
    return rng.choice(own, size=min(n, len(own)), replace=False) if len(own) else own


def build_jobs(exp, opts: PatternOptions, x, search, logits) -> tuple[list[Job], list[dict]]:
    """Every (class, canvas) search, plus records for canvas types a class has no image for."""
    y_all = exp.data.y_test.numpy()
    ys, pred, prob = y_all[search], logits.argmax(1).numpy(), logits.softmax(1).numpy()
    rng, base = exp.rng("patterns/canvas"), int(exp.rng("patterns/order").integers(2**62))
    jobs, missing = [], []
    for c in opts.classes:
        for kind in opts.canvases:
            if kind == "white":  # N restarts on the all-white canvas, each with its own pairing order
                canvases = [torch.ones_like(x[0]).cpu()] * opts.num_canvases
            else:
                pos = canvas_indices(kind, c, ys, pred, prob, opts.num_canvases, rng)
                canvases = [x[int(search[p])].cpu() for p in pos]
            if not canvases:
                missing.append(record("canvas_missing", 1.0, **{"class": c, "canvas": kind}))
            for i, canvas in enumerate(canvases):
                jobs.append(Job(c, canvas, kind, i, derive_seed(base, f"{c}/{kind}/{i}")))
    return jobs, missing


def _pasted_ce(model, masks, canvases, x, target: int, device, batch_size) -> torch.Tensor:
    """Mean −log f_y over x for each binarized pattern (`select_by: pattern`)."""
    ce = pasted_apply(model, masks, canvases, x, device, batch_size,
                      lambda lg: -lg.float().log_softmax(-1)[..., target])
    return ce.mean(1)


def choose(exp, opts: PatternOptions, result, jobs, x, pools, sizes_of) -> dict:
    """chosen[(c, kind or None, size)] = job index with the lowest loss (ISCP §3: "the pattern that has
    the lowest loss value"): the search loss of eq. 2 over the last epoch (`select_by: search`) or
    the binarized pattern's CE on D_n (`select_by: pattern`)."""
    bs = int(exp.cfg.eval_batch_size) if exp.cfg is not None else 512
    chosen = {}
    for c in opts.classes:
        mine = [k for k, j in enumerate(jobs) if j.cls == c]
        groups = {None: mine, **{kind: [k for k in mine if jobs[k].kind == kind] for kind in opts.canvases}}
        for size in sizes_of(c):
            if opts.select_by == "search":
                score = {k: float(result.loss[k]) for k in mine}
            else:
                take = exp.rng(f"patterns/select/{c}").permutation(len(pools[c]))[: opts.select_images]
                sub = pools[c][torch.as_tensor(take, device=pools[c].device)]
                ce = _pasted_ce(exp.model, result.binary(mine, size), result.canvases[mine], x[sub], c,
                                exp.device, bs)
                score = dict(zip(mine, ce.tolist()))
            for kind, ks in groups.items():
                if ks:
                    chosen[(c, kind, size)] = min(ks, key=lambda k: (score[k], k))
    return chosen


@ANALYSES.register("patterns", options=PatternOptions)
def patterns(exp, cfg) -> list[dict]:
    """Search, select and measure class-wise patterns (module docstring); records below."""
    opts = options(cfg, int(exp.data.num_classes))
    device, bs = exp.device, (int(exp.cfg.eval_batch_size) if exp.cfg is not None else 512)
    x = to_float(exp.data.x_test).to(device)
    y = exp.data.y_test.cpu()
    search, pw_set = split(exp, opts)
    logits = logits_of(exp.model, x[torch.as_tensor(search, device=device)], device, bs)
    jobs, rows = build_jobs(exp, opts, x, search, logits)
    searched = sorted({j.cls for j in jobs})  # a class without any canvas image is left out (recorded)
    if searched != list(opts.classes):
        log.warning("patterns: no canvas for class(es) %s in the search part; raise subset_fraction or add "
                    "the white canvas", sorted(set(opts.classes) - set(searched)))
        opts = dataclasses.replace(opts, classes=tuple(searched))
    s_idx = torch.as_tensor(search)
    pools = {c: s_idx[y[s_idx] != c].to(device) for c in opts.classes}  # D_n(c): non-target search images

    trig = _trigger_mask(exp, opts)
    sizes_of = (lambda c: sorted({*opts.sizes, *([opts.trigger_size] if trig is not None and c == exp.target
                                                    else [])}))
    t0 = time.perf_counter()
    result = search_masks(exp.model, x, pools, jobs, opts.search, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    search_s = time.perf_counter() - t0
    rows += [record("search_s", search_s, masks=len(jobs), classes=len(opts.classes)),
             record("search_images", len(search)), record("pw_images", len(pw_set))]
    log.info("patterns: %d masks (%d classes x %s canvases) searched in %.1fs", len(jobs), len(opts.classes),
             opts.canvases, search_s)

    t0 = time.perf_counter()
    sel = Selection(result, jobs, choose(exp, opts, result, jobs, x, pools, sizes_of))
    pred_pw = logits_of(exp.model, x[torch.as_tensor(pw_set, device=device)], device, bs).argmax(1)
    y_pw, pw_t = y[torch.as_tensor(pw_set)], torch.as_tensor(pw_set)
    acc = {}
    for c in opts.classes:
        acc[c] = float((pred_pw[y_pw == c] == c).float().mean()) if bool((y_pw == c).any()) else 0.0
        pairs = sorted({(k, s) for (cc, kind, s), k in sel.chosen.items()
                        if cc == c and (kind is None or opts.per_canvas)})
        masks = torch.stack([result.binary(k, s) for k, s in pairs])
        preds = pasted_predictions(exp.model, masks, result.canvases[[k for k, _ in pairs]],
                                   x[pw_t[y_pw != c].to(device)], device, bs)
        for (k, s), hits in zip(pairs, preds):
            sel.pw[(k, s)] = predictive_power(hits == c, acc[c])
        rows.append(record("class_acc", acc[c], **{"class": c}))
    rows += _pw_records(opts, sel)
    rows.append(record("pw_eval_s", time.perf_counter() - t0))
    if trig is not None:
        k = sel.chosen[(exp.target, None, opts.trigger_size)]
        found = result.binary(k, opts.trigger_size)
        tags = {"class": exp.target, "size": opts.trigger_size, "canvas": jobs[k].kind}
        rows += [record("trigger_pw", sel.pw[(k, opts.trigger_size)], **tags),
                 record("trigger_iou", iou(found, trig), **tags)]
    run_dir = exp.info.get("run_dir") if isinstance(getattr(exp, "info", None), dict) else None
    if opts.figure and run_dir is not None:
        from bdexp.analysis.pattern_figures import PWImages, write_figures

        write_figures(exp, opts, sel, PWImages(x, pw_t, y_pw), Path(run_dir))
    return rows


def _pw_records(opts: PatternOptions, sel: Selection) -> list[dict]:
    """pw per class and size (the lowest-loss canvas), pw_by_canvas per canvas type (`per_canvas`
    with several types), and mpw / pw_std (population std, as ISCP Table 1's STD) per size."""
    rows, jobs, chosen, pw = [], sel.jobs, sel.chosen, sel.pw
    for size in opts.sizes:
        values = []
        for c in opts.classes:
            k = chosen[(c, None, size)]
            values.append(pw[(k, size)])
            rows.append(record("pw", pw[(k, size)], **{"class": c, "size": size, "canvas": jobs[k].kind,
                                                      "canvas_index": jobs[k].index}))
            if opts.per_canvas and len(opts.canvases) > 1:
                for kind in opts.canvases:
                    if (c, kind, size) in chosen:
                        rows.append(record("pw_by_canvas", pw[(chosen[(c, kind, size)], size)],
                                           **{"class": c, "size": size, "canvas": kind}))
        v = np.asarray(values, dtype=np.float64)
        rows += [record("mpw", float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"), size=size),
                 record("pw_std", float(np.nanstd(v)) if np.isfinite(v).any() else float("nan"), size=size)]
    return rows


def _trigger_mask(exp, opts) -> torch.Tensor | None:
    """The real trigger's (H, W) pixels when the run has one target class and a local trigger."""
    attack = exp.attack
    if not has_backdoor(attack) or getattr(attack, "mode", "all_to_one") == "all_to_all":
        return None
    get = getattr(attack, "trigger_mask", None)
    mask = get() if callable(get) else None
    if mask is None or exp.target not in opts.classes:
        return None
    return mask.bool().cpu()
