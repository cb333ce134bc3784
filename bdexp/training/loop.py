"""The training loop shared by every regime: SGD + step schedule, bf16/channels_last on CUDA."""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

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


def train_model(model: nn.Module, loader: DeviceLoader, regime, cfg, device: torch.device,
                describe: str = "train") -> dict:
    """Train in place; returns a history dict (per-epoch loss/acc, images/s, wall time)."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.get("compile", False) else model
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and cfg.get("amp", True)
                else nullcontext())
    opt, sched = make_optimizer(model, cfg, len(loader))
    history = {"loss": [], "acc": [], "images_per_s": []}
    log_every = max(1, int(cfg.get("log_every", 10)))
    start = time.perf_counter()
    model.train()
    with make_progress() as progress:
        task = progress.add_task(describe, total=cfg.epochs * len(loader), info="")
        for epoch in range(cfg.epochs):
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
