"""The divergence check of every training step, kept on the device so the host never waits for a step.

Each step's loss and gradient norms are checked where they are computed: a loss that is not finite or passes
``max_loss``, or a gradient that is not finite, raises a flag on the device. The flag is sticky (once raised
it stays raised) and the fused optimizer reads it as ``found_inf``, so it skips that step and every later one
without a host synchronization. The host reads the flags and losses of the steps since it last looked only
every ``sync_every_steps`` steps (one transfer), and the trainer then stops the run at the first bad step,
whose weights were never changed. On a GPU this keeps the queue of kernels full; on the CPU it gives the same
result as looking after every step (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reslab.train.runtime import all_reduce_sum


@dataclass(frozen=True)
class StepRecord:
    """What the host learns of one step when it reads the window."""

    step: int  # the step's index in its epoch
    loss: float
    bad: bool
    rng_state: Tensor  # torch's CPU random state before the step, to replay its drop-path masks


class StepWindow:
    """The steps since the host last looked: losses and divergence flags stay on the device until ``read``.

    Args:
        device: where the model trains.
        max_loss: a finite loss above this counts as divergence.
        distributed: under DDP a step that is bad on any rank is bad on every rank (one all-reduce on the
            device, which does not block the host on NCCL), so all ranks skip the same steps.
    """

    def __init__(self, device: torch.device, max_loss: float, *, distributed: bool = False) -> None:
        self.max_loss, self.distributed = max_loss, distributed
        self.diverged = torch.zeros((), device=device)  # 1.0 once any step went bad: the optimizer's found_inf
        self._steps: list[int] = []
        self._losses: list[Tensor] = []
        self._flags: list[Tensor] = []
        self._rng_states: list[Tensor] = []

    def __len__(self) -> int:
        return len(self._steps)

    def check(self, step: int, loss: Tensor, grad_norms: Tensor | None, rng_state: Tensor) -> Tensor:
        """Flag step ``step`` on the device; returns the sticky flag for the optimizer's ``found_inf``.

        ``loss``: the batch's mean loss (a scalar); ``grad_norms``: each parameter's gradient norm
        (num_params,), or None where gradients are not checked (fp16, whose loss scaler skips overflowing
        steps by design).
        """
        loss = loss.detach().float()
        bad = ~torch.isfinite(loss) | (loss > self.max_loss)
        if grad_norms is not None:
            bad = bad | ~torch.isfinite(grad_norms.sum())
        bad = bad.float()
        if self.distributed:
            bad = all_reduce_sum(bad).clamp(max=1.0)
        self.diverged = torch.maximum(self.diverged, bad)
        self._steps.append(step)
        self._losses.append(loss)
        self._flags.append(bad)
        self._rng_states.append(rng_state)
        return self.diverged

    def read(self) -> list[StepRecord]:
        """The window's steps, read with one host synchronization; the window is empty afterwards."""
        if not self._steps:
            return []
        values = torch.stack([torch.stack(self._losses), torch.stack(self._flags)]).tolist()
        records = [
            StepRecord(step, loss, bool(bad), rng)
            for step, loss, bad, rng in zip(self._steps, values[0], values[1], self._rng_states, strict=True)
        ]
        self._steps, self._losses, self._flags, self._rng_states = [], [], [], []
        return records
