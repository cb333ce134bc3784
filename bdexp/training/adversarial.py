"""`train=adversarial`: PGD adversarial training (Madry et al. 2018; ISCP §4.4).

Every step trains on x_adv = PGD(x) instead of x (Madry et al. eq. 2.1: min over θ of the
expected max over ‖δ‖∞ ≤ ε of the loss): a uniform random start in the ε-ball, then `steps`
signed-gradient ascent steps on the cross-entropy, each followed by projection onto the ε-ball
around x and onto the image range [0, 1] (batch.x is in [0, 1]: data/loader.py). Defaults:
ℓ∞ ε = 8/255, step 2/255, 10 steps (ISCP §4.4). Everything the loop measures (loss,
accuracy) is then on adversarial examples.

Model mode during the attack (`pgd_model_mode`): `eval` by default, as in the TRADES / MART
reference code and most PyTorch adversarial-training code: BatchNorm uses its running
statistics while the 10 attack forwards run, so they neither update those statistics nor see
batch statistics that the attack itself perturbs; the training forward on x_adv is then in
train mode. `train` keeps train mode throughout (Madry et al.'s TF code, Rice et al. 2020).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.data.loader import Batch
from bdexp.errors import ConfigError
from bdexp.training.base import REGIMES, Regime

MODEL_MODES = ("eval", "train")


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

    def __init__(self, cfg, attack=None):
        super().__init__(cfg, attack=attack)
        self.eps = float(cfg.get("epsilon", 8)) / 255
        self.step = float(cfg.get("step_size", 2)) / 255
        self.steps = int(cfg.get("steps", 10))
        self.random_start = bool(cfg.get("random_start", True))
        self.model_mode = str(cfg.get("pgd_model_mode", "eval"))
        if not self.eps >= 0 or not self.step > 0 or self.steps < 0:
            raise ConfigError(f"train=adversarial: need epsilon >= 0, step_size > 0 and steps >= 0 (pixel levels, "
                              f"x/255); got epsilon={cfg.get('epsilon')}, step_size={cfg.get('step_size')}, "
                              f"steps={cfg.get('steps')}")
        if self.model_mode not in MODEL_MODES:
            raise ConfigError(f"train.pgd_model_mode={self.model_mode!r}; choose one of {list(MODEL_MODES)}")

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
