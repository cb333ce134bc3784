"""Cognitive Distillation (Huang et al., ICLR 2023; follows the authors'
detection/cognitive_distillation.py and analysis/cognitive_distillation.py).

Per input x, with the model frozen, learn a one-channel mask m = (tanh(w) + 1)/2 (w starts at 1)
that keeps the model's output while blanking as much of x as possible:

    x_cp = x⊙m + (1 − m)⊙δ,   δ one random colour per image, redrawn every step
    loss  = mean_k |f(x_cp) − f(x)|_k + α‖m‖₁ + β·TV(m),   TV = Σ squared neighbour diffs / (c·h·w)

with Adam (lr 0.1, betas (0.1, 0.1)), 100 steps; f = logits (α 0.01, β 1) or, `variant: feature`,
the last conv stage s3 (α 0.001, β 10, lr 0.05). Backdoored inputs distil to a tiny pattern:
the suspicion score is −‖m‖₁, and the authors' rule flags ‖m‖₁ < μ − t·σ (t = 0.5)
with μ, σ the mean and (unbiased, as torch.std) standard deviation over the clean reserve.

Batched: a whole batch of masks is optimised at once with the per-image losses *summed*, so each
mask gets exactly its own gradient (Adam is elementwise); the authors' `.mean()` only scales every
gradient by 1/b, which Adam undoes up to its ε. The colours are drawn per image up front, so the
result does not depend on the batch size.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import DetectorContext, Kind
from bdexp.data.loader import iterate_eval
from bdexp.defenses.input_pools import InputDetectorOptions
from bdexp.models.base import Level
from bdexp.options import option
from bdexp.defenses.screening import DetectorOutput
from bdexp.errors import ConfigError
from bdexp.seeding import torch_generator



@dataclass(frozen=True)
class CDOptions(InputDetectorOptions):
    """conf/defense/cd.yaml explains each value (cd_feature.yaml, cd_probs.yaml: the variants)."""

    variant: Literal["logit", "feature"] = "logit"
    output: Literal["logits", "probs"] = "logits"  # logit variant: match logits or softmax(z / temperature)
    temperature: float = option(1.0, lo=0, lo_open=True)
    level: Level = "s3"  # feature variant: the features matched
    steps: int = option(100, lo=1)
    lr: float = option(0.1, lo=0, lo_open=True)
    betas: tuple[float, float] = option([0.1, 0.1], lo=0, hi=1, hi_open=True)  # Adam's (β1, β2)
    alpha: float = option(0.01, lo=0)  # ‖m‖₁ weight
    beta: float = option(1.0, lo=0)  # total-variation weight
    mask_init: float = 1.0
    threshold_t: float = 0.5  # flag ‖m‖₁ < μ − t·σ of the reserve (the authors' rule)
    autocast: bool = False  # bf16 on CUDA
    batch_size: int = option(256, lo=1)


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no gradient into the weights for the duration; restores both afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def total_variation(m: torch.Tensor) -> torch.Tensor:
    """(b,) squared-difference TV of (b, c, h, w) masks divided by c·h·w (authors' code)."""
    tv_h = (m[:, :, 1:, :] - m[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    tv_w = (m[:, :, :, 1:] - m[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (tv_h + tv_w) / m[0].numel()


def output_fn(model: nn.Module, variant: str, level: str, output: str, temperature: float
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """What CD matches: the logits (authors' code), the softmax probabilities at a temperature
    (`output: probs`, softmax(z / temperature); our option, see cd_probs.yaml), or the flattened
    features at `level` (the authors' feature variant)."""
    if variant == "logit":
        if output == "logits":
            return lambda x: model(x)
        return lambda x: torch.softmax(model(x) / temperature, dim=1)
    return lambda x: model(x, features=True)[1][level]


def distill(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, colors: torch.Tensor, *, lr: float,
            betas: tuple[float, float], alpha: float, beta: float, mask_init: float,
            amp: bool) -> torch.Tensor:
    """Masks (b, 1, h, w) for float images x (b, c, h, w) on one device; colors (steps, b, c) holds
    the random colour δ of every step and image. f must belong to a frozen model."""
    b, c, h, w = x.shape
    use_amp = amp and x.device.type == "cuda"  # bf16 autocast only on CUDA (off by default)
    cast = (lambda: torch.autocast("cuda", torch.bfloat16)) if use_amp else nullcontext
    with torch.no_grad(), cast():
        ref = f(x).float().flatten(1)
    param = torch.full((b, 1, h, w), float(mask_init), device=x.device, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([param], lr=lr, betas=betas)
    for delta in colors:  # one step per colour draw
        opt.zero_grad(set_to_none=True)
        m = (torch.tanh(param) + 1) / 2
        x_cp = x * m + (1 - m) * delta.view(b, c, 1, 1)
        with cast():
            out = f(x_cp)
        match = (out.float().flatten(1) - ref).abs().mean(dim=1)
        loss = match + alpha * m.abs().sum(dim=(1, 2, 3)) + beta * total_variation(m)
        loss.sum().backward()  # summed: each mask its own gradient, independent of the batch
        opt.step()
    return ((torch.tanh(param) + 1) / 2).detach()


def cd_l1_norms(model: nn.Module, x: torch.Tensor, device: torch.device, opts: CDOptions, *, seed: int,
                tag: str) -> np.ndarray:
    """‖m‖₁ of every image of x (uint8 or float NCHW), optimised `opts.batch_size` at a time."""
    n, c = len(x), x.shape[1]
    colors = torch.rand(opts.steps, n, c, generator=torch_generator(seed, f"cd/colors/{tag}"))  # δ ~ U[0,1]^c
    norms = []
    with frozen(model):
        f = output_fn(model, opts.variant, opts.level, opts.output, opts.temperature)
        start = 0
        for xb in iterate_eval(x, opts.batch_size, device):
            cb = colors[:, start:start + len(xb)].to(device=device, dtype=xb.dtype)
            start += len(xb)
            masks = distill(f, xb, cb, lr=opts.lr, betas=tuple(opts.betas), alpha=opts.alpha, beta=opts.beta,
                            mask_init=opts.mask_init, amp=opts.autocast)
            norms.append(masks.sum(dim=(1, 2, 3)).double().cpu())
    return torch.cat(norms).numpy() if norms else np.zeros(0)


def cd_tags(opts: CDOptions) -> dict:
    return {"variant": opts.variant, "level": opts.level if opts.variant == "feature" else None}


@DEFENSES.register("cd", options=CDOptions, kind=Kind.input_detector, tags=cd_tags)
def build_cd(ctx: DetectorContext, opts: CDOptions):
    """CD on the clean reserve gives μ, σ of ‖m‖₁ for the threshold rule (the authors' code)."""
    ref = cd_l1_norms(ctx.model, ctx.reserve.x, ctx.device, opts, seed=ctx.seed, tag="reserve")
    mu, sigma = float(ref.mean()), float(ref.std(ddof=1)) if len(ref) > 1 else 0.0

    def score(x: torch.Tensor, tag: str) -> DetectorOutput:
        norms = cd_l1_norms(ctx.model, x, ctx.device, opts, seed=ctx.seed, tag=tag)
        extra = {"mask_l1_mean": float(norms.mean()), "reserve_l1_mean": mu, "reserve_l1_std": sigma}
        return DetectorOutput(-norms, norms < mu - opts.threshold_t * sigma, extra)

    return score
