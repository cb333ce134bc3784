"""NAD: Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li, Ma, ICLR 2021).

Two stages on the defender's clean data (docs/defenses.md, "NAD"):

1. Teacher: a copy of the suspect model fine-tuned with cross-entropy (§3, "the teacher network can
   be obtained by an independent finetuning process on the same clean subset"); `te_epochs`.
2. Student: the suspect model itself, trained with cross-entropy plus the attention-distillation
   loss towards the frozen teacher (§3):

       L = CE(S(x), y) + Σ_l β_l · L_AT(F_S^l(x), F_T^l(x))

   over the feature levels s1, s2, s3 (bdexp's three stages, where the paper takes the outputs of
   WRN-16-1's three residual groups). The attention map of an activation F (C×H×W) is
   A(F) = Σ_c |F_c|^p (§3, "attention operator", p = 2), flattened over H×W and divided by its L2
   norm (+1e-6, the authors' at.py). The distance between the student's and the teacher's
   normalized maps Â_S, Â_T is, by `at_distance`:
     - "mse": the mean of (Â_S − Â_T)² over the batch and the H·W positions: the authors' code
       (at.py, F.mse_loss) and BackdoorBench's `AT`, the form their β (500/1000/1000) are tuned for;
     - "l2": the batch mean of ||Â_S − Â_T||₂, the NAD loss as the paper writes it (§3). Per image
       it is ||d|| where "mse" is ||d||²/(H·W): far larger at a fine-tune's small differences, so β
       must be lowered with it.

The teacher is frozen while the student trains: eval mode (BatchNorm running statistics, as the
authors' `teacher.eval()`), no gradients, its maps computed under no_grad.

Defaults and where they come from:
- te_epochs 10: BackdoorBench (config/defense/nad/config.yaml `te_epochs`); the authors' README
  fine-tunes the teacher "for 5~10 epochs".
- epochs 20: the authors' code (config.py `--epochs 20`). BackdoorBench trains the student for
  `te_epochs` (10) epochs too (its `epochs: 100` only sets the teacher's cosine length): epochs=10.
- lr 0.01, schedule constant: BackdoorBench (lr 0.01; its per-epoch rule keeps 0.01 throughout).
  The authors' code starts at 0.1 and drops to 0.01 after 2 of 20 epochs: lr=0.1, schedule=step,
  milestones=[0.1] (with the run's train.gamma = 0.1). The teacher is fine-tuned with the same
  settings (the authors fine-tune it with the same script, β = 0; BackdoorBench's teacher runs at
  lr 0.01 under a cosine over 100 epochs, ≈ constant over its 10).
- weight_decay 1e-4, momentum: the run's (0.9): the authors' config and BackdoorBench.
- batch_size 256: BackdoorBench (the authors: 64).
- betas [500, 1000, 1000] for s1, s2, s3, p = 2: the authors' config.py (first release) and
  BackdoorBench (beta1..3, p). The authors' current config.py distils only the last group
  (β = [0, 0, 5000]).
- clean data: 5 % of the training set (MitigationOptions; the paper's and BackdoorBench's ratio).

Where bdexp departs: BackdoorBench's preactresnet18 branch takes its "third" activation after the
average pool (a 1×1 map, whose normalized attention is constant: that term is always 0); bdexp
uses the three stages' (N, C, H, W) maps (`FeatureModel.feature_maps`) for every model family.
Epoch counts are scaled by the run's schedule length (`Repairer.scaled_epochs`). Cost: te_epochs +
epochs model-epochs (the teacher's forward pass during distillation is not counted).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bdexp.defenses import DEFENSES
from bdexp.defenses.contexts import Kind
from bdexp.defenses.mitigation import MitigationContext, MitigationOptions
from bdexp.defenses.repair import Repair
from bdexp.options import option
from bdexp.results import record
from bdexp.training.loop import ScheduleName

NAD_LEVELS = ("s1", "s2", "s3")  # the levels `betas` weight, in order

AtDistance = Literal["mse", "l2"]


@dataclass(frozen=True)
class NADOptions(MitigationOptions):
    te_epochs: float = option(10, lo=0, lo_open=True)  # teacher fine-tuning, paper epochs (BackdoorBench te_epochs)
    epochs: float = option(20, lo=0, lo_open=True)  # distillation, paper epochs (the authors' config.py)
    lr: float = option(0.01, lo=0, lo_open=True)  # BackdoorBench; the authors: 0.1, then 0.01 after 2 epochs
    schedule: ScheduleName = "constant"  # training/loop.py; the authors' code: step with milestones [0.1]
    milestones: tuple[float, ...] = option([0.1], lo=0, hi=1)  # fractions of the epochs (schedule=step only)
    weight_decay: float = option(1.0e-4, lo=0)  # the authors' config.py and BackdoorBench
    batch_size: int = option(256, lo=1)  # BackdoorBench (the authors: 64)
    betas: tuple[float, float, float] = option([500.0, 1000.0, 1000.0], lo=0)  # β for s1, s2, s3
    p: float = option(2.0, lo=0, lo_open=True)  # the attention operator's power (§3)
    at_distance: AtDistance = "mse"  # mse: the authors' code / BackdoorBench | l2: the paper's equation


def attention_map(fm: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """NAD's attention map of (N, C, H, W) activations: Σ_c |F_c|^p, flattened to (N, H·W) and
    divided by its L2 norm + `eps` (computed in float32 whatever the activations' dtype)."""
    if fm.dim() != 4:
        raise ValueError(f"attention_map expects (N, C, H, W) activations, got shape {tuple(fm.shape)}")
    am = fm.float().abs().pow(p).sum(dim=1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + eps)


def attention_loss(fm_s: torch.Tensor, fm_t: torch.Tensor, p: float = 2.0, distance: AtDistance = "mse") -> torch.Tensor:
    """The distance between the normalized attention maps of student and teacher activations
    (module docstring: "mse" the authors' code, "l2" the paper's equation)."""
    a_s, a_t = attention_map(fm_s, p), attention_map(fm_t, p)
    if distance == "mse":
        return F.mse_loss(a_s, a_t)
    if distance == "l2":
        return (a_s - a_t).norm(dim=1).mean()
    raise ValueError(f"unknown attention distance {distance!r}; choose mse or l2")


class AttentionDistillation:
    """The student's loss: cross-entropy plus Σ β_l · attention_loss towards a frozen teacher
    (a loss object for `Repairer.finetune`: `loss(model, batch) -> (loss, logits)`)."""

    def __init__(self, teacher: nn.Module, betas: dict[str, float], p: float = 2.0, distance: AtDistance = "mse"):
        self.teacher = teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.betas = {level: float(b) for level, b in betas.items() if float(b) != 0.0}
        self.p, self.distance = float(p), distance
        self.begin_epoch()

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, maps = model.feature_maps(batch.x)
        ce = F.cross_entropy(logits, batch.y)
        if not self.betas:
            return ce, logits
        self.teacher.eval()  # frozen: its BatchNorm statistics never move
        with torch.no_grad():
            _, teacher_maps = self.teacher.feature_maps(batch.x)
        at = sum(beta * attention_loss(maps[level], teacher_maps[level].detach(), self.p, self.distance)
                 for level, beta in self.betas.items())
        self._at_sum = self._at_sum + at.detach().float() * len(batch.y)  # tensors: no device sync per step
        self._ce_sum = self._ce_sum + ce.detach().float() * len(batch.y)
        self._n += len(batch.y)
        return ce + at, logits

    def begin_epoch(self) -> None:
        self._at_sum, self._ce_sum, self._n = 0.0, 0.0, 0

    def epoch_stats(self) -> dict[str, float]:
        n = max(self._n, 1)
        return {"at_loss": float(self._at_sum) / n, "ce_loss": float(self._ce_sum) / n}


@DEFENSES.register("nad", options=NADOptions, kind=Kind.mitigation)
def neural_attention_distillation(ctx: MitigationContext, opts: NADOptions) -> Repair:
    te_epochs, epochs = ctx.scaled_epochs(opts.te_epochs), ctx.scaled_epochs(opts.epochs)
    train = dict(lr=opts.lr, batch_size=opts.batch_size, schedule=opts.schedule, weight_decay=opts.weight_decay,
                 milestones=opts.milestones)
    teacher = copy.deepcopy(ctx.model)
    ctx.finetune(teacher, te_epochs, "nad/teacher", **train)
    teacher_acc = ctx.accuracy(teacher)
    loss = AttentionDistillation(teacher, dict(zip(NAD_LEVELS, opts.betas)), opts.p, opts.at_distance)
    history = ctx.finetune(ctx.model, epochs, "nad/student", loss=loss, **train)
    records = [record("nad_teacher_acc", teacher_acc)]  # on the defender's clean data (it trained on)
    if history.get("at_loss"):
        records.append(record("nad_at_loss", history["at_loss"][-1]))
    return Repair(ctx.model, model_epochs=float(te_epochs + epochs), records=records)
