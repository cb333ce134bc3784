"""`clbd`: the clean-label backdoor of Turner et al. (2018/2019) as used by ISPL (§4, App. B).

Which class is perturbed. In a clean-label attack the poisoned images keep their true label, so
they must belong to the class the backdoor sends inputs TO: the *target*. Turner et al.'s code
(`generate_poisoned_dataset.py`) says so directly: "a proportion of the target class will now be
replaced with harder-to-classify images and have the selected trigger applied", with
`poisoning_proportion` = "what proportion of the target class to poison". ISPL calls that class
the "source": "Each attack first strongly perturbs each image of the source class ... then
inserts several patches (without changing the label); the attacker's objective is to make the
learner misclassify an image from any non-source class as the source class" (ISPL §4), and
Table 6: "The T column lists the target class (i.e., all poisoned images have label T). ε refers
to the percentage of the target class which is poisoned." ISPL's "source class" is therefore
bdexp's *target*: the class whose training images are perturbed.

What is measured. ISPL §4 (opening): "the attacker's objective is to make the learner misclassify an
image from any non-source class as the source class by applying the patches", i.e. every
non-target test image stamped: `mode: all_to_one` is the default (its `source` stays null). The
poisoned training set is the same in every mode; one_to_one only narrows the backdoor test set
to one source class.

Construction (ISPL App. B): "each image is perturbed independently to maximize the loss with
respect to a reference model trained on clean data; the perturbation size is bounded by the
respective norm ... a 3x3 checkerboard patch is then placed in each of the 4 corners of the
image. The label of the image is not changed. At test time, only the checkerboard patches are
placed on the image." So x_poison = stamp(PGD(x)); ``apply_trigger`` is the stamp alone.

`poison_rate` is the fraction of the target class perturbed and stamped (Turner's
`poisoning_proportion`, ISPL's ε), in every mode: the base class's `budget: class` rule for clean
labels, the only budget clbd accepts. The attack needs a clean reference model: it asks the
pipeline's `AttackServices` for one (`attach`), which trains or loads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from bdexp.attacks.base import ATTACKS, AttackServices, LabelMode, Mode, PoisonedTrainSet
from bdexp.attacks.scenarios import ScenarioAttack, ScenarioOptions
from bdexp.errors import ConfigError
from bdexp.options import option
from bdexp.seeding import derive_seed

# ε when `pgd_eps` is null. ℓ∞: 8/255 (Turner et al.'s `inf_8`). ℓ2: 300/255, Turner et al.'s
# `two_300` dataset (their ℓ2 bound 300 is on the 0..255 pixel scale; here images are in [0, 1]).
DEFAULT_EPS = {"linf": 8 / 255, "l2": 300 / 255}
# Step size when `pgd_step_size` is null: 2.5·ε/steps (Madry et al.'s rule of thumb), which gives
# exactly train=adversarial's PGD step 2/255 for ℓ∞ ε = 8/255 and 10 steps (Madry et al.'s CIFAR-10 setting).
STEP_FACTOR = 2.5
_PGD_BATCH = 256  # images per PGD forward/backward; the result does not depend on it (eval mode)


@dataclass(frozen=True)
class ClbdOptions(ScenarioOptions):
    mode: Mode = "all_to_one"  # ISPL §4 (opening): "misclassify an image from any non-source class"
    label_mode: LabelMode = "clean"  # must be clean (checked in build, with the reason)
    size: int = option(3, lo=1)  # side of each corner checkerboard (ISPL App. B: 3x3)
    pgd_norm: Literal["linf", "l2"] = "linf"
    pgd_eps: float | None = option(None, lo=0)  # null: DEFAULT_EPS of the norm
    pgd_steps: int = option(10, lo=0)  # 0 = stamp only
    pgd_step_size: float | None = option(None, lo=0)  # null: STEP_FACTOR * eps / steps
    pgd_random_start: bool = True


@ATTACKS.register("clbd")
class CleanLabelBackdoor(ScenarioAttack):
    name = "clbd"
    Options = ClbdOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        o = self.opts
        if self.label_mode != "clean":
            raise ConfigError(
                "attack.label_mode must be clean for clbd (Turner et al.'s attack keeps every label); "
                "use attack=dlbd or attack=patched for a dirty-label backdoor"
            )
        if self.budget != "class":
            raise ConfigError(
                f"attack.budget={self.budget!r}: clbd's poison_rate is always a fraction of the target class "
                "(Turner et al.'s `poisoning_proportion`, ISPL Table 6); set attack.budget=class"
            )
        size, steps = o.size, o.pgd_steps
        if 2 * size > min(h, w):
            raise ConfigError(
                f"attack.size={size} is not allowed: use at most {min(h, w) // 2}, so that the 4 size×size "
                f"corner patches of a {h}×{w} image do not overlap"
            )
        eps = DEFAULT_EPS[o.pgd_norm] if o.pgd_eps is None else o.pgd_eps
        step = STEP_FACTOR * eps / max(steps, 1) if o.pgd_step_size is None else o.pgd_step_size
        self.size, self.eps, self.step_size, self.steps = size, eps, step, steps

        # The stamp: a size×size checkerboard in each corner, white where the distance (in rows +
        # columns) from the image corner is even, so every corner pixel is white and the four
        # patches are mirror images (for the 3×3 default they are all the same checkerboard).
        rows, cols = torch.arange(h), torch.arange(w)
        di = torch.minimum(rows, h - 1 - rows)[:, None]  # distance to the nearer horizontal edge
        dj = torch.minimum(cols, w - 1 - cols)[None, :]
        self.mask = (di < size) & (dj < size)
        self.pattern = ((di + dj) % 2 == 0).float().expand(c, h, w) * self.mask
        self._model: nn.Module | None = None
        self._device = torch.device("cpu")

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The stamp only (used on the test set and after PGD on the training set)."""
        mask = self.mask.to(x.device)
        return torch.where(mask, self.pattern.to(x.device, x.dtype), x)

    def trigger_mask(self) -> torch.Tensor:
        return self.mask.clone()

    # ---------------------------------------------------------------- reference model
    def attach(self, services: AttackServices) -> None:
        self.set_reference_model(services.clean_model(), services.device())

    def set_reference_model(self, model: nn.Module, device: torch.device | str) -> None:
        """The clean model PGD attacks (ISPL App. B: "a reference model trained on clean data")."""
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD that maximises the reference model's cross-entropy on the true labels `y`
        (Madry et al. 2018; Turner et al.): the images become hard to classify, so a model trained
        on them leans on the trigger. Float NCHW in [0, 1] in and out, on x's device."""
        if self._model is None:
            raise RuntimeError(
                "clbd needs a clean reference model for its PGD perturbation: call "
                "attack.set_reference_model(model, device) before poison_train "
                "(bdexp.pipeline.prepare does this through Attack.attach)"
            )
        if len(x) == 0 or self.steps == 0 or self.eps == 0:
            return x.clone()
        # Random start drawn on the CPU from a seeded generator: the same on every device.
        g = torch.Generator().manual_seed(derive_seed(self.seed, "clbd/pgd_start"))
        start = self._random_start(x.shape, g) if self.opts.pgd_random_start else torch.zeros(x.shape)
        out = [self._pgd(xb, yb, sb) for xb, yb, sb in zip(x.split(_PGD_BATCH), y.split(_PGD_BATCH),
                                                           start.split(_PGD_BATCH))]
        return torch.cat(out).to(x.device, x.dtype)

    def _random_start(self, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
        if self.opts.pgd_norm == "linf":  # uniform in the ε-cube
            return (torch.rand(shape, generator=g) * 2 - 1) * self.eps
        # ℓ2: a uniformly random direction at a radius uniform in [0, ε]
        d = torch.randn(shape, generator=g)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return d * self.eps * torch.rand(shape[0], 1, 1, 1, generator=g)

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        if self.opts.pgd_norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return delta * (self.eps / norm.clamp_min(1e-12)).clamp(max=1.0)

    def _pgd(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        assert self._model is not None
        dev = self._device
        x, y = x.to(dev, torch.float32), y.to(dev).long()
        x_adv = (x + self._project(start.to(dev))).clamp(0, 1)
        with torch.enable_grad():
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                loss = nn.functional.cross_entropy(self._model(x_adv), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    if self.opts.pgd_norm == "linf":
                        step = grad.sign()
                    else:  # ℓ2: a step along the per-image unit gradient
                        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = self._project(x_adv + self.step_size * step - x)
                    x_adv = (x + delta).clamp(0, 1).detach()
        return x_adv

    # ---------------------------------------------------------------- poisoning
    def poison_train(self, x: torch.Tensor, y: torch.Tensor) -> PoisonedTrainSet:
        """x_poison = stamp(PGD(x)) for the chosen target-class samples; labels kept."""
        self._check_images(x, y)
        idx = self.select(y.long().cpu()).to(y.device)
        x_pgd = x.clone()
        x_pgd[idx] = self.perturb(x[idx], y[idx])
        # The base class picks the same rows (same seeded `select`) and stamps them.
        out = super().poison_train(x_pgd, y)
        if self.inject == "append":  # the originals stay clean; only the appended copies carry PGD
            out.x[: len(x)] = x
        return out
