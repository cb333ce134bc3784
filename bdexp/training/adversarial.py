"""`train=adversarial`: PGD adversarial training (Madry et al. 2018), the regime of ISCP §4.4.

Every step trains on x_adv = PGD(x) instead of x (Madry et al. eq. 2.1: min over θ of the
expected max over ‖δ‖∞ ≤ ε of the loss): a uniform random start in the ε-ball, then `steps`
signed-gradient ascent steps on the cross-entropy, each followed by projection onto the ε-ball
around x and onto the image range [0, 1] (batch.x is in [0, 1]: data/loader.py). Defaults:
ℓ∞ ε = 8/255, step 2/255, 10 steps: our choice, Madry et al.'s CIFAR-10 setting (ISCP §4.4 gives none). Everything the loop measures (loss,
accuracy) is then on adversarial examples.

Model mode during the attack (`pgd_model_mode`): `eval` by default, as in the TRADES / MART
reference code and most PyTorch adversarial-training code: BatchNorm uses its running
statistics while the 10 attack forwards run, so they neither update those statistics nor see
batch statistics that the attack itself perturbs; the training forward on x_adv is then in
train mode. `train` keeps train mode throughout (Madry et al.'s TF code, Rice et al. 2020).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.data.loader import Batch
from bdexp.options import option
from bdexp.training.base import REGIMES, Regime, Schedule


@dataclass(frozen=True)
class AdversarialOptions(Schedule):
    """PGD (Madry et al.'s CIFAR-10 setting; ISCP §4.4 gives none), in pixel levels: the radius is epsilon/255 on [0, 1] images."""

    epsilon: float = option(8, lo=0)  # l_inf radius 8/255
    step_size: float = option(2, lo=0, lo_open=True)  # signed-gradient step 2/255
    steps: int = option(10, lo=0)  # PGD iterations
    random_start: bool = True  # uniform start in the eps-ball (Madry et al. §2)
    pgd_model_mode: Literal["eval", "train"] = "eval"  # model mode while attacking (module docstring)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int,
        random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """ℓ∞ PGD on the cross-entropy (Madry et al. §2): x_adv ∈ [x − ε, x + ε] ∩ [0, 1]."""
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x_adv = x.clone()
    for _ in range(int(steps)):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])  # input gradient only: no parameter .grad
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@REGIMES.register("adversarial")
class Adversarial(Regime):
    """Cross-entropy on PGD adversarial examples of the batch (module docstring)."""

    Options = AdversarialOptions
    opts: AdversarialOptions

    def __init__(self, cfg, attack=None):
        super().__init__(cfg, attack=attack)
        self.eps = self.opts.epsilon / 255
        self.step = self.opts.step_size / 255
        self.steps = self.opts.steps
        self.random_start = self.opts.random_start
        self.model_mode = self.opts.pgd_model_mode

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD examples of (x, y), the model in `pgd_model_mode` meanwhile and restored after."""
        was_training = model.training
        model.train(self.model_mode == "train")
        try:
            return pgd(model, x, y, self.eps, self.step, self.steps, self.random_start)
        finally:
            model.train(was_training)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.adversarial(model, batch.x, batch.y))
        return F.cross_entropy(logits.float(), batch.y), logits
