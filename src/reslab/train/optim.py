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

# --finetune without --layer-decay: each part's lr half the next one's, so the stem of a 4-stage ResNet learns at
# 1/32 of the head's lr (fastai's fine_tune spreads lr/100 .. lr over its groups; timm's layer decay is 0.65-0.75
# over 12 or more blocks).
FINETUNE_LAYER_DECAY = 0.5


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float = 0.0) -> list[dict]:
    """The trainable parameters in groups: weight decay on conv and linear weights only (decaying BN scales and
    biases only hurts, Goyal et al.); with ``layer_decay`` D, each of the model's parts (``part_names``) learns
    at D times the lr of the part after it, the head at ``lr`` (timm's layer-wise lr decay, by stage)."""
    parts = getattr(model, "part_names", None) if layer_decay else None
    if not parts:
        sets = [(lr, list(model.parameters()))]
    else:
        sets = [
            (lr * layer_decay ** (len(parts) - 1 - i), [p for m in model.part(name) for p in m.parameters()])
            for i, name in enumerate(parts)
        ]
    groups = []
    for part_lr, params in sets:
        params = [p for p in params if p.requires_grad]  # frozen parts: no state, no decay
        decay, no_decay = [p for p in params if p.ndim > 1], [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr": part_lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": part_lr},
        ]
    return [g for g in groups if g["params"]]


def layer_decay(cfg: TrainConfig) -> float:
    """The per-part lr decay this run uses: ``cfg.layer_decay``, or FINETUNE_LAYER_DECAY with ``--finetune``."""
    return cfg.layer_decay or (FINETUNE_LAYER_DECAY if cfg.finetune else 0.0)


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

    def groups() -> list[dict]:  # fresh groups each try: a failed constructor may have filled in the first ones
        return param_groups(model, cfg.weight_decay, lr, layer_decay(cfg))

    if device.type in ("cpu", "cuda"):
        try:
            return kind(groups(), lr=lr, fused=True)
        except (RuntimeError, TypeError):  # an older torch without this fused kernel: the host checks each step
            pass
    return kind(groups(), lr=lr)


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
