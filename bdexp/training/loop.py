"""The training loop shared by every regime: SGD + step schedule, bf16/channels_last on CUDA.

The optimizer and its learning-rate schedule are one `Optimization` object. A call of
`train_model` trains epochs [done, done + cfg.epochs) of it, so a caller that keeps the object
with its model (ISPL's self-training, whose training set changes every few epochs while the
model, the momentum buffers and the schedule carry on: ISPL App. C) runs one schedule across
several calls. The learning rate is a function of the absolute epoch, not of the step count, so
the segments may have different numbers of steps per epoch.

With a `checkpoint` path the loop saves everything the next epoch depends on (weights, optimizer
state, the loader's shuffling/augmentation generator, torch's global RNG, history) every
`checkpoint_every` epochs, atomically; a run killed mid-way resumes from the last saved epoch
and ends with the same weights an uninterrupted run gets (on the same device).

On SIGINT/SIGTERM (jobs.Interrupted) mid-epoch the last saved checkpoint stands: the weights of
a half-trained epoch cannot be resumed exactly, so they are not saved (with the default
checkpoint_every=1 that is the last completed epoch). A signal that arrives between epochs saves
the state of the completed epochs first; a checkpoint being written is finished before the
signal is acted on (jobs.deferred), so it is never torn.
"""
from __future__ import annotations

from typing import Literal, get_args

import copy
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bdexp.data.loader import DeviceLoader
from bdexp.jobs import Interrupted, deferred
from bdexp.errors import ConfigError, TrainingDiverged
from bdexp.progress import make_progress
from bdexp.training.base import Schedule

log = logging.getLogger(__name__)

# step: cfg.lr, multiplied by cfg.gamma at each milestone; constant: cfg.lr throughout; cosine:
# cfg.lr · (1 + cos(π · epoch / total_epochs)) / 2 per epoch (PyTorch's CosineAnnealingLR with
# T_max = total_epochs, eta_min = 0, stepped once per epoch: what BackdoorBench's defenses use).
ScheduleName = Literal["step", "constant", "cosine"]  # the lr schedules an inner training may follow
SCHEDULES = get_args(ScheduleName)


def milestone_epochs(fractions, total_epochs: int) -> list[int]:
    """The epochs at whose start the rate drops: fractions of `total_epochs` (at least 1, each
    once), so shrinking the epochs (scale=cpu) keeps the shape of the paper's schedule."""
    return sorted({max(1, round(float(f) * int(total_epochs))) for f in fractions})


class Optimization:
    """SGD with momentum and a learning-rate schedule over `total_epochs` epochs (default
    cfg.epochs; `cfg`: a train config or its `Schedule`). `epochs_done` counts the epochs trained
    so far, across `train_model` calls."""

    def __init__(self, model: nn.Module, cfg, total_epochs: int | None = None, schedule: str = "step"):
        if schedule not in SCHEDULES:
            raise ConfigError(f"learning-rate schedule {schedule!r} is unknown; choose one of {list(SCHEDULES)}")
        sched = Schedule.of(cfg)
        self.opt = torch.optim.SGD(
            model.parameters(),
            lr=sched.lr,
            momentum=sched.momentum,
            weight_decay=sched.weight_decay,
            nesterov=sched.nesterov,
        )
        self.schedule = schedule
        self.total_epochs = int(sched.epochs if total_epochs is None else total_epochs)
        self.milestones = milestone_epochs(sched.milestones, self.total_epochs) if schedule == "step" else []
        self.base_lr, self.gamma = sched.lr, sched.gamma
        self.epochs_done = 0

    def lr(self, epoch: int) -> float:
        """The rate during (0-based, absolute) `epoch`."""
        if self.schedule == "cosine":
            return self.base_lr * (1 + math.cos(math.pi * epoch / self.total_epochs)) / 2
        return self.base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def begin_epoch(self, epoch: int) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr(epoch)

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.epochs_done = int(state["epochs_done"])


def save_checkpoint(path: Path, optim: Optimization, model: nn.Module, loader: DeviceLoader,
                    history: dict, attack=None) -> None:
    from bdexp.cache import atomic_torch_save

    # `key`: the model the checkpoint belongs to (its file name under the cache, bdexp/cache.py), so
    # a checkpoint copied over another model's is refused on resume instead of continued
    state = {"key": path.stem, "epoch": optim.epochs_done, "model": model.state_dict(), "optim": optim.state_dict(),
             "loader_rng": loader.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "history": history}
    if attack is not None:  # a co-trained attack's networks and optimizers (bdexp/attacks/cotrained.py)
        state["attack"] = attack.training_state()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    with deferred():
        atomic_torch_save(state, path)


def load_checkpoint(path: Path, model: nn.Module, optim: Optimization, loader: DeviceLoader, attack=None) -> dict:
    """Restore a save_checkpoint file into model, optim (epochs_done included), loader and a
    co-trained `attack`; returns the history. All or nothing: PyTorch copies the matching tensors
    before it raises on a mismatch, so on any error the model, optimizer, attack and RNG states are
    put back as they were and the error re-raised (the caller then trains from its fresh, seeded
    initialization)."""
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(optim.state_dict()),
              loader.generator.get_state(), torch.get_rng_state(),
              copy.deepcopy(attack.training_state()) if attack is not None else None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("key") != path.stem:
            raise ValueError(f"it is a checkpoint of model {state.get('key')}, not of {path.stem}")
        if (attack is not None) != ("attack" in state):
            raise ValueError("it does not hold the co-trained attack's state" if attack is not None
                             else "it holds a co-trained attack's state this training does not have")
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        if attack is not None:
            attack.load_training_state(state["attack"])
        loader.generator.set_state(state["loader_rng"])  # a CPU ByteTensor for CPU and CUDA generators
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["history"]
    except Exception:
        model.load_state_dict(before[0])
        optim.load_state_dict(before[1])
        loader.generator.set_state(before[2])
        torch.set_rng_state(before[3])
        if attack is not None:
            attack.load_training_state(before[4])
        raise


def train_model(model: nn.Module, loader: DeviceLoader, regime, cfg, device: torch.device,
                describe: str = "train", checkpoint: Path | None = None, checkpoint_every: int = 1,
                optimization: Optimization | None = None, attack=None) -> dict:
    """Train in place for cfg.epochs epochs; returns a history dict (per-epoch loss/acc/lr,
    images/s, wall time). `optimization`: continue this optimizer and schedule (epochs
    [optimization.epochs_done, + cfg.epochs) of it); None = a fresh cfg.epochs-epoch step schedule.
    `checkpoint`: resume from this file if it exists and save to it every `checkpoint_every`
    epochs (the caller deletes it once the finished model is stored). `cfg`: a train config or
    its `Schedule`. `attack`: a co-trained attack (bdexp/attacks/cotrained.py) whose networks train
    beside the model: it poisons each batch, adds its loss term, steps its optimizers and is
    saved in the checkpoints; its `start_training` must have been called."""
    cfg = Schedule.of(cfg)
    on_cuda = device.type == "cuda"
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and cfg.amp else nullcontext()
    optim = optimization if optimization is not None else Optimization(model, cfg)
    first_epoch = optim.epochs_done
    end_epoch = first_epoch + cfg.epochs
    history = {"loss": [], "acc": [], "lr": [], "images_per_s": [], "wall_s": 0.0}
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            history = load_checkpoint(Path(checkpoint), model, optim, loader, attack)
            log.info("%s: resumed from %s after epoch %d of %d", describe, checkpoint, optim.epochs_done, end_epoch)
        except Exception as err:  # a checkpoint of another shape/version: start over, do not crash
            log.warning("%s: cannot resume from %s (%s); training from scratch", describe, checkpoint, err)
            optim.epochs_done = first_epoch
    resumed = optim.epochs_done - first_epoch
    history.setdefault("lr", [])
    log_every = cfg.log_every
    start = time.perf_counter() - float(history.get("wall_s", 0.0))
    if attack is not None and not attack.pretrained:  # IAD's mask network, before the classifier
        try:
            attack.pretrain(loader, device)
        except Interrupted as err:
            err.where = err.where or f"{describe}: the attack's pre-training ({attack.name})"
            raise
        history["wall_s"] = time.perf_counter() - start
        if checkpoint is not None and checkpoint_every > 0:  # a resume starts after it
            save_checkpoint(Path(checkpoint), optim, model, loader, history, attack)
    model.train()
    saved = optim.epochs_done if resumed else None  # the epoch the checkpoint on disk holds
    between_epochs = True
    try:
        with make_progress() as progress:
            task = progress.add_task(describe, total=cfg.epochs * len(loader), info="",
                                     completed=resumed * len(loader))
            for epoch in range(optim.epochs_done, end_epoch):
                between_epochs = False
                t0 = time.perf_counter()
                optim.begin_epoch(epoch)
                regime.begin_epoch()
                if attack is not None:
                    attack.begin_epoch(epoch)
                loss_sum = torch.zeros((), device=device)
                extra_sum = torch.zeros((), device=device)
                correct = torch.zeros((), device=device, dtype=torch.long)
                seen = 0
                for step, batch in enumerate(loader):
                    if on_cuda:
                        batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                    extra = None
                    if attack is not None:
                        batch, extra = attack.poison_batch(step_model, batch)
                    with autocast:
                        loss, logits = regime.loss(step_model, batch)
                    objective = loss if extra is None else loss + extra
                    optim.opt.zero_grad(set_to_none=True)
                    if attack is not None:
                        attack.zero_grad()
                    objective.backward()
                    optim.opt.step()
                    if attack is not None:
                        attack.step()
                    # the history's loss is the regime's; a co-trained attack's own term is kept apart
                    loss_sum += loss.detach().float() * len(batch.y)
                    if extra is not None:
                        extra_sum += extra.detach().float() * len(batch.y)
                    correct += (logits.detach().argmax(1) == batch.y).sum()
                    seen += len(batch.y)
                    if step % log_every == 0 or step == len(loader) - 1:
                        mean_loss = loss_sum.item() / seen
                        _check_finite(mean_loss, epoch, step, cfg)
                        rate = seen / max(time.perf_counter() - t0, 1e-9)
                        progress.update(task, info=f"ep {epoch + 1}/{optim.total_epochs} loss {mean_loss:.3f} "
                                        f"acc {correct.item() / seen:.3f} {rate:,.0f} img/s")
                    progress.advance(task)
                epoch_loss = loss_sum.item() / seen
                _check_finite(epoch_loss, epoch, len(loader) - 1, cfg)
                optim.epochs_done = epoch + 1
                history["loss"].append(epoch_loss)
                history["acc"].append(correct.item() / seen)
                history["lr"].append(optim.lr(epoch))
                history["images_per_s"].append(seen / max(time.perf_counter() - t0, 1e-9))
                history["wall_s"] = time.perf_counter() - start
                for key, value in regime.epoch_stats().items():
                    history.setdefault(key, []).append(value)
                if attack is not None:  # e.g. IAD's diversity loss (eq. 5), per image
                    history.setdefault("attack_loss", []).append(extra_sum.item() / seen)
                between_epochs = True
                if (checkpoint is not None and checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0
                        and epoch + 1 < end_epoch):
                    save_checkpoint(Path(checkpoint), optim, model, loader, history, attack)
                    saved = optim.epochs_done
    except Interrupted as err:
        if (checkpoint is not None and checkpoint_every > 0 and between_epochs and saved != optim.epochs_done
                and first_epoch < optim.epochs_done < end_epoch):
            save_checkpoint(Path(checkpoint), optim, model, loader, history, attack)
        what = "training" if describe == "train" else f"training ({describe})"
        err.where = err.where or f"{what} at epoch {min(optim.epochs_done + 1, optim.total_epochs)}/{optim.total_epochs}"
        raise
    model.eval()
    if attack is not None:
        attack.end_training()
    history["wall_s"] = time.perf_counter() - start
    history["epochs"] = cfg.epochs
    log.info("%s: %d epoch%s in %.1fs, final loss %.4f acc %.4f, %.0f img/s", describe, cfg.epochs,
             "" if cfg.epochs == 1 else "s",
             history["wall_s"], history["loss"][-1], history["acc"][-1],
             sum(history["images_per_s"]) / len(history["images_per_s"]))
    return history


def _check_finite(value: float, epoch: int, step: int, cfg) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"training loss became {value} at epoch {epoch + 1}, step {step + 1} "
            f"(train.lr={cfg.lr}); lower the learning rate (e.g. train.lr={cfg.lr / 10:g}) "
            "or check the data and attack settings"
        )
