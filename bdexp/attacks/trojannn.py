"""`trojannn`: the trojan trigger of TrojanNN (Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning
Attack on Neural Networks", NDSS 2018; the attack design of its §IV: trojan trigger generation,
then retraining).

x' = (1 − m)⊙x + m⊙b: a square patch b in a corner of the image, whose pixels are optimized
against the clean reference model so that a few chosen internal neurons fire strongly.

1. Neuron selection (§IV): the neurons of the penultimate layer (the `penult` features, the
   input of the model's final linear layer `fc`) with the strongest connections to the next
   layer: ranked by Σ_j |W_fc[j, i]| (the authors'
   code/get_neuron_idx_from_weight.py sums the absolute weights of the *next* layer, fc7, to pick
   neurons of fc6; BackdoorBench's and TrojanZoo's `get_most_connected_neuron_idxes` /
   `get_neuron_idx` do the same on their `linear` / `classifier.fc` layer). The `num_neurons`
   largest are chosen (BackdoorBench `num_neuron: 2`, TrojanZoo `neuron_num=2`).
2. Trigger generation (§IV): minimize Σ_k (|f_k(x_b)| − v)² over the patch pixels,
   with f_k the chosen neurons, v = `target_value` (BackdoorBench `neuron_target_values: 100`,
   TrojanZoo `target_value=100`) and x_b the patch on a black canvas (BackdoorBench's canvas is
   its mask image, black outside the logo; TrojanZoo's is all zeros). The patch is parameterized
   as b = (tanh(w) + 1)/2 so it stays in [0, 1], w starts at seeded N(0, 1) noise, and Adam with
   a cosine-annealed learning rate `lr` = 0.1 runs `steps` = 1000 steps (TrojanZoo's
   `preprocess_mark`: Adam on a tanh-parameterized mark, `neuron_lr=0.1`, `neuron_epoch=1000`;
   BackdoorBench's `mask_update_iters: 1000` sign steps of 0.1). 1000 steps on one image took
   about 7 s on 2 CPU cores for ResNet-18 at width 1/4 on 32×32 inputs, so the default is kept.
3. Poisoning: the patch is stamped on `poison_rate` = 0.1 of the training set, relabelled to the
   target (dirty label, all-to-one: BackdoorBench's config/attack/trojannn/*.yaml, pratio 0.1,
   all2one), and the victim is trained from scratch on that set; the test trigger is the same stamp.

Patch size and place. BackdoorBench's configs give no size: they resize an Apple-logo mask
(resource/trojannn/apple4.png) to the whole image. The authors' code (code/gen_trigger/
act_max.tvd.center_part.py, `filter_part`) optimizes a 44×44 square 20 px from the bottom-right
corner of a 224×224 input, i.e. 44/224 ≈ 19.6 % of the side (3.9 % of the area). bdexp's `size`
null keeps that proportion: round(44/224 · min(H, W)) px (6 px at 32×32, 3 px at 16×16), and puts
the square in the bottom-right corner (`margin` 0, as bdexp's `patched`; the authors' 20/224 of the
side is `margin=3` at 32×32).

Differences from the paper. The paper then *retrains* the model on data reverse-engineered from
it (images stamped with the trigger, relabelled), starting from the released model; bdexp, like
BackdoorBench, trains the victim from scratch on the poisoned training set, so the trigger only
has the reference model's neurons in common with the victim. The authors also denoise the patch
(total-variation, `denoise_tv_bregman`) after every step and start from grey noise; TrojanZoo found
the denoising made no difference and starts from random noise on black, as here. The optimized
layer is always the penultimate one (the authors' code also handles convolutional layers).

What to expect. bdexp's models pool the last feature map globally before `fc`, so a corner patch
reaches the penultimate neurons only through a few positions: on a ResNet-18 at width 1/4 trained
on 2 000 CIFAR-10 images, 200 steps raised the two chosen neurons on the black canvas from 2.53 and
0.41 (the random initial patch) to 2.66 and 0.54, nowhere near 100. The backdoor is then learnt
from the dirty-label poisoning, like a BadNets patch whose pattern was chosen by the reference model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bdexp.attacks.base import ATTACKS, AttackOptions
from bdexp.attacks.optimized import OptimizedTriggerAttack
from bdexp.errors import ConfigError
from bdexp.options import option

# The authors' square: 44 px of their 224-px input (code/gen_trigger/act_max.tvd.center_part.py).
AUTHORS_SIDE_FRACTION = 44 / 224


@dataclass(frozen=True)
class TrojanNNOptions(AttackOptions):
    size: int | None = option(None, lo=1)  # patch side in px; null: round(44/224 · min(H, W))
    margin: int = option(0, lo=0)  # pixels between the patch and the bottom-right corner
    num_neurons: int = option(2, lo=1)  # penultimate neurons the trigger drives
    target_value: float = 100.0  # value v the chosen neurons are driven to
    steps: int = option(1000, lo=0)  # Adam steps on the patch (0: the random initial patch)
    lr: float = option(0.1, lo=0, lo_open=True)  # Adam learning rate (cosine-annealed to 0)


def most_connected_neurons(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k input neurons of a linear layer with the largest Σ_j |W[j, i]| (`weight`
    is (out, in), as nn.Linear stores it), largest first (ties: the lower index)."""
    score = weight.detach().abs().sum(0)
    return torch.sort(score, descending=True, stable=True).indices[:k]


@ATTACKS.register("trojannn")
class TrojanNNAttack(OptimizedTriggerAttack):
    name = "trojannn"
    Options = TrojanNNOptions

    def build(self, generator: torch.Generator) -> None:
        c, h, w = self.image_shape
        o = self.opts
        size = o.size if o.size is not None else max(1, round(AUTHORS_SIDE_FRACTION * min(h, w)))
        if size + o.margin > min(h, w):
            raise ConfigError(f"attack.size + attack.margin = {size + o.margin} does not fit a {h}×{w} image; "
                              f"use at most {min(h, w)} in all")
        self.size = size
        self.top, self.left = h - size - o.margin, w - size - o.margin
        self.mask = torch.zeros(h, w, dtype=torch.bool)
        self.mask[self.top : self.top + size, self.left : self.left + size] = True

    # ---------------------------------------------------------------- optimization
    def optimization_data(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """None: the patch is optimized on a black canvas, never on training images."""
        return x[:0], y[:0]

    def initial_param(self, generator: torch.Generator) -> torch.Tensor:
        """w at the start (b = (tanh(w) + 1)/2): seeded N(0, 1), as TrojanZoo's random init."""
        return torch.randn((self.image_shape[0], self.size, self.size), generator=generator)

    def stamp(self, x: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """x with the patch's pixels in the mask (out of place; differentiable in `patch`)."""
        s = self.size
        out = x.clone()
        out[:, :, self.top : self.top + s, self.left : self.left + s] = patch
        return out

    def canvas(self, patch: torch.Tensor) -> torch.Tensor:
        """The patch on a black image, (1, C, H, W): what the neurons are optimized on."""
        return self.stamp(torch.zeros((1, *self.image_shape), device=patch.device, dtype=patch.dtype), patch)

    def neuron_values(self, model: torch.nn.Module, patch: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """The chosen penultimate neurons on the patch's canvas, (k,)."""
        _, feats = model(self.canvas(patch), features=True)
        return feats["penult"][0, neurons.to(patch.device)]

    def select_neurons(self, model: torch.nn.Module) -> torch.Tensor:
        fc = getattr(model, "fc", None)
        if not isinstance(fc, torch.nn.Linear):
            raise TypeError("attack 'trojannn' needs a bdexp FeatureModel (final linear layer `fc`), "
                            f"got {type(model).__name__}")
        k, dim = self.opts.num_neurons, fc.in_features
        if k > dim:
            raise ConfigError(f"attack.num_neurons={k} is more than the {dim} penultimate neurons of the "
                              f"reference model; use at most {dim}")
        return most_connected_neurons(fc.weight, k)

    def optimize(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The patch that drives the chosen neurons to `target_value` (module docstring)."""
        o = self.opts
        neurons = self.select_neurons(model)
        w = self.initial_param(generator).to(device).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=o.lr)
        for step in range(o.steps):
            lr = 0.5 * o.lr * (1 + math.cos(math.pi * step / o.steps))  # CosineAnnealingLR(T_max=steps)
            for group in opt.param_groups:
                group["lr"] = lr
            values = self.neuron_values(model, (torch.tanh(w) + 1) / 2, neurons)
            loss = ((values.abs() - o.target_value) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, w)
            w.grad = grad
            opt.step()
        patch = ((torch.tanh(w) + 1) / 2).detach()
        return {"patch": patch, "neurons": neurons.float()}

    # ---------------------------------------------------------------- the trigger
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.stamp(x, self.require_trigger()["patch"].to(x.device, x.dtype))

    def trigger_mask(self) -> torch.Tensor:
        return self.mask.clone()

    def state_images(self) -> dict[str, torch.Tensor]:
        """The optimized patch on a black image."""
        return {"trigger": self.canvas(self.require_trigger()["patch"])[0]}

    def state_record(self) -> dict:
        trig = self.require_trigger()
        return {**super().state_record(), "neurons": [int(i) for i in trig["neurons"].tolist()],
                "patch_size": self.size}
