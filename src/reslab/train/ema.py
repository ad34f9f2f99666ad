"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

Averaging the weights of the last few hundred steps smooths out the noise of the last ones (Polyak and
Juditsky 1992); short, high-learning-rate runs gain the most. The trainer evaluates the average beside the
raw weights at each epoch's end and keeps whichever validates better (``TrainConfig.ema_decay``).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class ModelEma:
    """``ema = d * ema + (1 - d) * weights`` after each step, for every floating-point parameter and buffer.

    BatchNorm's running statistics are averaged like the weights, so the average is a complete model to
    evaluate; integer buffers (``num_batches_tracked``) are copied. The decay warms up as
    ``d_t = min(decay, (1 + t) / (10 + t))`` for the ``t``-th update (as in TensorFlow's
    ExponentialMovingAverage with ``num_updates``): early on the average follows the weights closely instead
    of remembering the random initialization for thousands of steps.

    Args:
        model: the raw model (not its DDP or compiled wrapper); the average starts as a copy of it.
        decay: the decay once warmed up, in (0, 1); the average spans about ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._cached_for: nn.Module | None = None

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (counted from 0)."""
        return min(self.decay, (1 + updates) / (10 + updates))

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """(average, model) tensors of the floating-point entries, then of the others, in state-dict order.

        State-dict tensors share storage with the modules, and loading a state dict copies into them, so the
        lists stay valid for the same model: they are built once, not at every step.
        """
        if self._cached_for is not model:
            mine, theirs = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in mine.items() if v.is_floating_point()]
            others = [k for k in mine if k not in floats]
            self._cached = tuple([d[k] for k in keys] for keys in (floats, others) for d in (mine, theirs))
            self._cached_for = model
        return self._cached

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights now. On the device, with no host synchronization."""
        ema_floats, floats, ema_others, others = self._pairs(model)
        torch._foreach_lerp_(ema_floats, floats, 1.0 - self.decay_at(self.updates))
        if ema_others:
            torch._foreach_copy_(ema_others, others)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
