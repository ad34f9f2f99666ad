"""Optimizers and learning-rate schedules, stepped once per batch.

One ``LambdaLR`` holds every schedule: a linear warmup, then step / cosine / one-cycle / constant. Its only
state is the step count, so checkpoints resume it exactly.
"""

from __future__ import annotations

import math

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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    betas = (cfg.momentum, 0.999)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup_epochs = cfg.warmup_epochs if (cfg.warmup_epochs or cfg.schedule != "onecycle") else 0.3 * cfg.epochs
    warmup = round(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total, warmup_steps=warmup, steps_per_epoch=steps_per_epoch, cfg=cfg)

    return LambdaLR(optimizer, factor)
