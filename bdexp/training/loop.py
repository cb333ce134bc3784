"""The training loop shared by every regime: SGD + step schedule, bf16/channels_last on CUDA.

With a `checkpoint` path the loop saves everything the next epoch depends on (weights, optimizer
and schedule state, the loader's shuffling/augmentation generator, torch's global RNG, history)
every `checkpoint_every` epochs, atomically; a run killed mid-way resumes from the last saved
epoch and ends with the same weights an uninterrupted run gets (on the same device).
"""
from __future__ import annotations

import collections
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bdexp.data.loader import DeviceLoader
from bdexp.errors import TrainingDiverged
from bdexp.progress import make_progress

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg, steps_per_epoch: int):
    """SGD with momentum and a step schedule; milestones are fractions of `cfg.epochs`
    so shrinking the epochs (scale=cpu) keeps the shape of the paper's schedule."""
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=bool(cfg.get("nesterov", False)),
    )
    milestones = sorted({max(1, round(f * cfg.epochs)) * steps_per_epoch for f in cfg.milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.gamma)
    return opt, sched


def save_checkpoint(path: Path, epoch: int, model: nn.Module, opt, sched, loader: DeviceLoader,
                    history: dict) -> None:
    from bdexp.cache import atomic_torch_save

    sched_state = sched.state_dict()
    sched_state["milestones"] = dict(sched_state["milestones"])  # Counter is not weights_only-safe
    state = {"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(), "sched": sched_state,
             "loader_rng": loader.generator.get_state(), "torch_rng": torch.get_rng_state(),
             "history": history}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    atomic_torch_save(state, path)


def load_checkpoint(path: Path, model: nn.Module, opt, sched, loader: DeviceLoader) -> tuple[int, dict]:
    """Restore a save_checkpoint file; returns (epochs done, history)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    state["sched"]["milestones"] = collections.Counter(state["sched"]["milestones"])
    sched.load_state_dict(state["sched"])
    loader.generator.set_state(state["loader_rng"])  # a CPU ByteTensor for CPU and CUDA generators
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["epoch"]), state["history"]


def train_model(model: nn.Module, loader: DeviceLoader, regime, cfg, device: torch.device,
                describe: str = "train", checkpoint: Path | None = None, checkpoint_every: int = 1) -> dict:
    """Train in place; returns a history dict (per-epoch loss/acc, images/s, wall time).
    `checkpoint`: resume from this file if it exists and save to it every `checkpoint_every`
    epochs (the caller deletes it once the finished model is stored)."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.get("compile", False) else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and cfg.get("amp", True)
                else nullcontext())
    opt, sched = make_optimizer(model, cfg, len(loader))
    history = {"loss": [], "acc": [], "images_per_s": [], "wall_s": 0.0}
    first_epoch = 0
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            first_epoch, history = load_checkpoint(Path(checkpoint), model, opt, sched, loader)
            log.info("%s: resumed from %s after epoch %d of %d", describe, checkpoint, first_epoch, cfg.epochs)
        except Exception as err:  # a checkpoint of another shape/version: start over, do not crash
            log.warning("%s: cannot resume from %s (%s); training from scratch", describe, checkpoint, err)
    log_every = max(1, int(cfg.get("log_every", 10)))
    start = time.perf_counter() - float(history.get("wall_s", 0.0))
    model.train()
    with make_progress() as progress:
        task = progress.add_task(describe, total=cfg.epochs * len(loader), info="",
                                 completed=first_epoch * len(loader))
        for epoch in range(first_epoch, cfg.epochs):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for step, batch in enumerate(loader):
                if on_cuda:
                    batch.x = batch.x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss, logits = regime.loss(step_model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach().float() * len(batch.y)
                correct += (logits.detach().argmax(1) == batch.y).sum()
                seen += len(batch.y)
                if step % log_every == 0 or step == len(loader) - 1:
                    mean_loss = loss_sum.item() / seen
                    _check_finite(mean_loss, epoch, step, cfg)
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    progress.update(task, info=f"ep {epoch + 1}/{cfg.epochs} loss {mean_loss:.3f} "
                                    f"acc {correct.item() / seen:.3f} {rate:,.0f} img/s")
                progress.advance(task)
            epoch_loss = loss_sum.item() / seen
            _check_finite(epoch_loss, epoch, len(loader) - 1, cfg)
            history["loss"].append(epoch_loss)
            history["acc"].append(correct.item() / seen)
            history["images_per_s"].append(seen / max(time.perf_counter() - t0, 1e-9))
            history["wall_s"] = time.perf_counter() - start
            if (checkpoint is not None and checkpoint_every > 0 and (epoch + 1) % checkpoint_every == 0
                    and epoch + 1 < cfg.epochs):
                save_checkpoint(Path(checkpoint), epoch + 1, model, opt, sched, loader, history)
    model.eval()
    history["wall_s"] = time.perf_counter() - start
    history["epochs"] = cfg.epochs
    log.info("%s: %d epochs in %.1fs, final loss %.4f acc %.4f, %.0f img/s", describe, cfg.epochs,
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
