"""Optimizers and learning-rate schedules, stepped once per batch.

One ``LambdaLR`` holds every schedule: a linear warmup, then step / cosine / one-cycle / constant. Its only
state is the step count, so checkpoints resume it exactly.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from reslab.train.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv and linear weights only: decaying BN scales and biases only hurts (Goyal et al.)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scaled_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """The learning rate this run uses: ``cfg.lr``, or with ``lr_reference_batch`` set, ``cfg.lr`` scaled
    linearly from that batch size to the global one (Goyal et al. 2017, Sec. 2.1: batch k times larger, lr k
    times larger; their gradual warmup, ``warmup_epochs``, keeps the first steps of a large lr stable)."""
    if not cfg.lr_reference_batch:
        return cfg.lr
    return cfg.lr * cfg.batch_size * world_size / cfg.lr_reference_batch


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, world_size: int = 1):
    """SGD (Nesterov by default), Adam or AdamW over ``param_groups``.

    Fused (one kernel for every parameter) where the device has the fused kernel (CPU, CUDA). Fused optimizers
    also read ``optimizer.found_inf``, a tensor on the device, and skip the whole step when it is nonzero:
    the trainer sets it to its divergence flag, so a bad step never reaches the weights without the host
    having to look at the flag first.
    """
    lr = scaled_lr(cfg, world_size)
    if cfg.optimizer == "sgd":
        kind = partial(torch.optim.SGD, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    else:
        kind = partial(torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW, betas=(cfg.momentum, 0.999))
    if device.type in ("cpu", "cuda"):
        try:  # fresh groups each try: a failed constructor may have filled in the first ones
            return kind(param_groups(model, cfg.weight_decay), lr=lr, fused=True)
        except (RuntimeError, TypeError):  # an older torch without this fused kernel: the host checks each step
            pass
    return kind(param_groups(model, cfg.weight_decay), lr=lr)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    # onecycle after warmup: linear decay to zero (the warmup is the "up" half; default 30% when unset).
    return 1.0 - progress


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps in the whole run: ``cfg.steps`` (set by hand or by a budget), else ``epochs`` epochs' worth."""
    return cfg.steps or cfg.epochs * steps_per_epoch


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """The schedule over ``total_steps``: cosine and one-cycle reach zero exactly after the last step."""
    total = total_steps(cfg, steps_per_epoch)
    if cfg.warmup_fraction:
        warmup = round(cfg.warmup_fraction * total)
    elif cfg.warmup_epochs or cfg.schedule != "onecycle":
        warmup = round(cfg.warmup_epochs * steps_per_epoch)
    else:  # one-cycle without a warmup given: 30% of the run (its "up" half)
        warmup = round(0.3 * total)
    warmup = min(warmup, max(total - 1, 0))  # a run shorter than its warmup still decays to zero at its end

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, warmup_steps=warmup, steps_per_epoch=steps_per_epoch, cfg=cfg)

    return LambdaLR(optimizer, factor)
