"""ISCP mask search and predictive power, batched over many masks (ISCP §3, §4, Alg. 1).

One *job* is one search: a class y, a canvas x_c and its own random pairing order over D_n(y),
the search images whose true class is not y. K jobs run in ONE forward pass per step: masks
M (K,1,H,W), canvases C (K,C,H,W) and, for every job, its own minibatch X_k of B images:

    x̃_kj = M_k ⊙ C_k + (1 − M_k) ⊙ X_kj                                       (ISCP eq. 1)
    L_k  = w_ce · mean_j −log f_y(x̃_kj) + w_l1 · ‖M_k‖₁/n + β · ‖∇M_k‖²/n      (eqs. 2, 3)
    M_k  ← clip(M_k − η · sign(∂L_k/∂M_k), 0, 1)                                (Alg. 1, lines 6-8)

n = H·W (the mask has no channel axis, App. A). Algorithm 1 sums the B per-image terms instead
of averaging them; that scales L_k by B and leaves sign(∂L_k/∂M_k) unchanged. The batched loss
is Σ_k L_k and each job owns its mask (the model is frozen, in eval mode), so ∂/∂M_k Σ L = ∂L_k/∂M_k:
K jobs batched are exactly K separate searches (tests/test_patterns.py checks this).

Learned canvas (ISCP App. H, eq. 4): the canvas is optimised too, alternating `alternate_steps`
mask steps and as many canvas steps, canvas ← clip(C − canvas_step · sign(∂L/∂C), 0, 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.errors import ConfigError
from bdexp.options import Options, option
from bdexp.progress import make_progress

# `weighting` (w_ce, w_l1 per unit α): the paper's eq. 2, or the authors' code 0.2·CE + 0.8·Σm/(HW/2)
# = 0.2·CE + 1.6·‖m‖₁/n (the ISCP authors' code), which ignores α.


@dataclass(frozen=True)
class SearchOptions(Options):
    """The mask search's options (ISCP App. A, Algorithm 1); part of `analysis.patterns`."""

    alpha: float = option(0.2, lo=0)  # ISCP §4 / App. A: α ∈ [0.1, 0.3], "slightly adjusted around 0.2"
    weighting: Literal["paper", "code"] = "paper"  # paper: CE + α‖m‖₁/n; code: 0.2·CE + 1.6‖m‖₁/n
    step_size: float = option(0.02, lo=0, lo_open=True)  # η (App. A)
    batch_size: int = option(4, lo=1)  # B (App. A)
    epochs: int = option(5, lo=1)  # T passes over D_n (App. A)
    mask_init: float = option(0.5, lo=0, hi=1)  # App. A: "all 0.5 values"
    tv_weight: float = option(0.0, lo=0)  # β of eq. 3 (App. E: 0.2 or 1); 0 = plain eq. 2
    learn_canvas: bool = False  # eq. 4 (App. H)
    canvas_step: float = option(2 / 255, lo=0, lo_open=True)  # App. H: canvas step size 2/255
    alternate_steps: int = option(5, lo=1)  # App. H: 5 mask steps, then 5 canvas steps
    masks_per_step: int | None = option(None, lo=1)  # jobs per forward pass (None: all at once)

    @property
    def weights(self) -> tuple[float, float]:
        return (1.0, float(self.alpha)) if self.weighting == "paper" else (0.2, 1.6)


@dataclass
class Job:
    """One search: class `cls`, its canvas, and the seed of its pairing order over D_n(cls)."""

    cls: int
    canvas: torch.Tensor  # (C, H, W) float in [0, 1]
    kind: str  # canvas type: positive | negative | random | white
    index: int  # rank of the canvas within its type
    seed: int


@dataclass
class SearchResult:
    masks: torch.Tensor  # (K, H, W) continuous masks in [0, 1] (CPU)
    mean_masks: torch.Tensor  # (K, H, W) each mask averaged over its steps: the tie-break of top_k_mask
    canvases: torch.Tensor  # (K, C, H, W) the canvases (learned ones when learn_canvas)
    loss: torch.Tensor  # (K,) mean eq.-2/3 loss over each job's last epoch
    steps: list[int]  # updates per job

    def binary(self, k, size: float) -> torch.Tensor:
        """m_γ of job(s) k at `size`: the top-k% pixels, ties by the step-averaged mask."""
        return top_k_mask(self.masks[k], size, self.mean_masks[k])


@dataclass
class Selection:
    """The searched patterns after selection (analysis/patterns.py): the search `result` of
    `jobs`, `chosen[(class, canvas type or None, size)]` = the job with the lowest loss (None:
    over every canvas type), and `pw[(job, size)]` = its predictive power."""

    result: SearchResult
    jobs: list[Job]
    chosen: dict[tuple[int, str | None, float], int]
    pw: dict[tuple[int, float], float] = field(default_factory=dict)


def pairing_order(pool_size: int, opts: SearchOptions, seed: int) -> torch.Tensor:
    """(steps, B) positions into a pool: `epochs` reshuffled passes of ⌊|D_n|/B⌋ full minibatches
    (the ≤ B−1 images left over differ per epoch), drawn from a generator seeded per job."""
    b = int(opts.batch_size)
    if pool_size < b:
        raise ConfigError(f"analysis.patterns: a class has {pool_size} non-target search images, fewer than "
                          f"batch_size={b}; raise analysis.patterns.subset_fraction or dataset.test_limit")
    g = torch.Generator().manual_seed(int(seed))
    per_epoch = pool_size // b
    return torch.cat([torch.randperm(pool_size, generator=g)[: per_epoch * b].view(per_epoch, b)
                      for _ in range(int(opts.epochs))])


def total_variation(m: torch.Tensor) -> torch.Tensor:
    """‖∇m‖² per mask of (K, 1, H, W): squared differences of vertical and horizontal neighbours."""
    dh = (m[..., 1:, :] - m[..., :-1, :]).pow(2).flatten(1).sum(1)
    dw = (m[..., :, 1:] - m[..., :, :-1]).pow(2).flatten(1).sum(1)
    return dh + dw


def search_masks(model: nn.Module, x: torch.Tensor, pools: dict[int, torch.Tensor], jobs: Sequence[Job],
                 opts: SearchOptions, device: torch.device, describe: str = "patterns") -> SearchResult:
    """Run every job (see the module docstring). `x`: float (N, C, H, W) images in [0, 1] on
    `device`; `pools[y]`: indices into `x` of D_n(y)."""
    if not jobs:
        raise ConfigError("analysis.patterns: nothing to search (no class has a canvas)")
    group = int(opts.masks_per_step or len(jobs))
    groups = [list(range(i, min(i + group, len(jobs)))) for i in range(0, len(jobs), group)]
    orders = [pools[j.cls][pairing_order(len(pools[j.cls]), opts, j.seed)] for j in jobs]  # (steps, B) into x
    was_training = model.training
    model.eval()
    parts = []
    try:
        with make_progress() as progress:
            task = progress.add_task(describe, total=sum(max(len(orders[k]) for k in g) for g in groups), info="")
            for g in groups:
                parts.append(_search_group(model, x, [jobs[k] for k in g], [orders[k] for k in g], opts,
                                           device, progress, task))
    finally:
        model.train(was_training)
    masks, mean_masks, canvases, loss = (torch.cat([p[i] for p in parts]) for i in range(4))
    return SearchResult(masks, mean_masks, canvases, loss, [len(o) for o in orders])


def _search_group(model, x, jobs, orders, opts: SearchOptions, device, progress, task):
    k = len(jobs)
    _, h, w = jobs[0].canvas.shape
    n = h * w
    w_ce, w_l1 = opts.weights
    steps = [len(o) for o in orders]
    per_epoch = [s // int(opts.epochs) for s in steps]
    max_steps, b = max(steps), int(opts.batch_size)
    idx = torch.zeros(k, max_steps, b, dtype=torch.long)
    for i, o in enumerate(orders):
        idx[i, : len(o)] = o
    idx = idx.to(device)
    target = torch.tensor([j.cls for j in jobs], device=device)
    mask = torch.full((k, 1, h, w), float(opts.mask_init), device=device, dtype=x.dtype)
    canvas = torch.stack([j.canvas for j in jobs]).to(device, x.dtype)
    history = torch.full((k, max_steps), float("nan"), device=device, dtype=x.dtype)
    mask_sum = torch.zeros_like(mask)
    everyone = torch.arange(k, device=device)
    for s in range(max_steps):
        live = [i for i in range(k) if s < steps[i]]  # classes differ in |D_n|, hence in steps
        rows = everyone if len(live) == k else torch.tensor(live, device=device)
        m = mask[rows].requires_grad_(True)
        c = canvas[rows]
        canvas_phase = opts.learn_canvas and (s // int(opts.alternate_steps)) % 2 == 1
        c.requires_grad_(canvas_phase)
        xb = x[idx[rows, s]]  # (k', B, C, H, W): each job its own minibatch
        mixed = m[:, None] * c[:, None] + (1 - m[:, None]) * xb  # eq. 1
        logits = model(mixed.flatten(0, 1)).float()
        ce = F.cross_entropy(logits, target[rows].repeat_interleave(b), reduction="none").view(len(rows), b).mean(1)
        loss = w_ce * ce + w_l1 * m.flatten(1).sum(1) / n  # eq. 2
        if opts.tv_weight > 0:
            loss = loss + float(opts.tv_weight) * total_variation(m) / n  # eq. 3
        var = c if canvas_phase else m
        (grad,) = torch.autograd.grad(loss.sum(), [var])  # Σ_k L_k: per-job gradients (module doc)
        with torch.no_grad():
            if canvas_phase:  # eq. 4, App. H: signed step on the canvas, kept a valid image
                canvas[rows] = (c - float(opts.canvas_step) * grad.sign()).clamp_(0, 1)
            else:
                mask[rows] = (m - float(opts.step_size) * grad.sign()).clamp_(0, 1)  # Alg. 1 lines 7-8
            history[rows, s] = loss.detach()
            mask_sum[rows] += mask[rows]
        if s % 25 == 0 or s == max_steps - 1:  # .item() syncs the device: only now and then
            progress.update(task, info=f"{k} masks, classes {sorted({j.cls for j in jobs})}, "
                                       f"loss {float(loss.detach().mean()):.3f}")
        progress.advance(task)
    last = torch.stack([history[i, steps[i] - per_epoch[i]: steps[i]].mean() for i in range(k)])
    mean_mask = mask_sum[:, 0] / torch.tensor(steps, device=device, dtype=mask.dtype)[:, None, None]
    return mask[:, 0].detach().cpu(), mean_mask.cpu(), canvas.detach().cpu(), last.cpu()


def top_k_mask(m: torch.Tensor, size: float, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Binary m_γ keeping exactly k = max(1, round(size·H·W)) pixels of each (…, H, W) mask
    (App. A: γ is set so that a given share of the pixels remains): the k largest values of m.
    Sign steps saturate many pixels at exactly 1 (or 0), so ties are broken by `tiebreak` (the
    search passes each mask's average over its steps: the pixel that reached 1 sooner, or left it
    later, ranks first), then by the lower pixel index; k is exact whatever the ties."""
    if not 0.0 < float(size) <= 1.0:
        raise ConfigError(f"analysis.patterns.sizes: {size} is not a fraction of the image in (0, 1]")
    flat = m.reshape(-1, m.shape[-2] * m.shape[-1])
    k = max(1, int(round(float(size) * flat.shape[1])))
    order = torch.arange(flat.shape[1]).expand_as(flat)
    if tiebreak is not None:  # stable sorts: secondary key first, then the primary one
        order = torch.argsort(tiebreak.reshape(flat.shape).to(flat.device), dim=1, descending=True, stable=True)
    primary = torch.argsort(flat.gather(1, order.to(flat.device)), dim=1, descending=True, stable=True)
    keep = order.to(flat.device).gather(1, primary)[:, :k]
    out = torch.zeros_like(flat, dtype=torch.float32).scatter_(1, keep, 1.0)
    return out.view(m.shape)


@torch.no_grad()
def pasted_apply(model: nn.Module, masks: torch.Tensor, canvases: torch.Tensor, x: torch.Tensor,
                 device: torch.device, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(P, N) values fn(logits) for every image of `x` with each pattern m⊙x_c pasted, i.e.
    m⊙x_c + (1 − m)⊙x (masks (P, H, W), canvases (P, C, H, W), x float (N, C, H, W)); `fn` maps
    logits (P, b, classes) to (P, b). Chunks hold about `batch_size` pasted images."""
    model.eval()
    m = masks.to(device, x.dtype)[:, None]
    pattern = m * canvases.to(device, x.dtype)
    per = max(1, int(batch_size) // len(m))
    out = []
    for start in range(0, len(x), per):
        xb = x[start:start + per].to(device)
        mixed = pattern[:, None] + (1 - m[:, None]) * xb[None]  # (P, b, C, H, W)
        out.append(fn(model(mixed.flatten(0, 1)).view(len(m), len(xb), -1)).cpu())
    return torch.cat(out, 1) if out else torch.zeros(len(m), 0)


def pasted_predictions(model: nn.Module, masks: torch.Tensor, canvases: torch.Tensor, x: torch.Tensor,
                       device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """(P, N) arg-max predictions with each pattern pasted (see `pasted_apply`)."""
    return pasted_apply(model, masks, canvases, x, device, batch_size, lambda lg: lg.argmax(-1))


def predictive_power(hits: torch.Tensor | float, class_acc: float) -> float:
    """PW = ACC(f(x_n + p_y), y) / ACC(f(x_y), y) (ISCP §4): the share of non-target images sent
    to y by the pattern, relative to the clean accuracy on class y; NaN when that accuracy is 0."""
    rate = float(hits.float().mean()) if isinstance(hits, torch.Tensor) else float(hits)
    return rate / class_acc if class_acc > 0 else float("nan")


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two (H, W) binary masks."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else float("nan")
