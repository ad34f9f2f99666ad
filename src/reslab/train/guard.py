"""The divergence check of every training step, kept on the device so the host never waits for a step.

Each step's loss and gradient norms are checked where they are computed: a loss that is not finite or passes
``max_loss``, or a gradient that is not finite, raises a flag on the device. The flag is sticky (once raised
it stays raised) and the fused optimizer reads it as ``found_inf``, so it skips that step and every later one
without a host synchronization. The host reads the flags and losses of the steps since it last looked only
every ``sync_every_steps`` steps (one transfer), and the trainer then stops the run at the first bad step,
whose weights were never changed. On a GPU this keeps the queue of kernels full; on the CPU it gives the same
result as looking after every step (tested).

``DivergenceGuard`` is the run's side of it: it holds the window, and stops the run with the replayed step's
diagnosis (``divergence.py``) or when an epoch's end finds non-finite weights or statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.train.divergence import diagnose, nonfinite_entries
from reslab.train.engine import EvalResult
from reslab.train.runtime import Runtime, all_reduce_sum
from reslab.train.state import TrainState


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


class DivergenceGuard:
    """What a run does when training diverges: it stops, names where it went wrong, and never saves it.

    A diverged step (read from ``window``) is replayed to name the first layer that went non-finite; a
    non-finite weight, BatchNorm statistic or validation loss found at an epoch's end or before a save ends the
    run before anything is written. Either way the error says what is saved and how to start again.

    Args:
        rt: where the run runs.
        max_loss: a finite loss above this counts as divergence.
        loss_fn: the training loss, for the replay.
        train_loader: the run's loader; a step's batch is a function of (seed, epoch, step), so it is rebuilt.
        saved_hint: says where the run's saved work is (``CheckpointWriter.saved_hint``).
    """

    def __init__(
        self,
        *,
        rt: Runtime,
        max_loss: float,
        loss_fn: nn.Module,
        train_loader,
        saved_hint: Callable[[], str],
    ) -> None:
        self.rt, self.max_loss, self.loss_fn = rt, max_loss, loss_fn
        self.train_loader, self.saved_hint = train_loader, saved_hint
        self.window = self.new_window()  # the run's own steps; a budget's probe keeps its own

    def new_window(self) -> StepWindow:
        return StepWindow(self.rt.device, self.max_loss, distributed=self.rt.distributed)

    def check_finite(self, state: TrainState, when: str, loss: float, val_ema: EvalResult | None = None) -> None:
        """Raise a ReslabError if the weights, their average, a BatchNorm statistic, ``loss`` (the validation
        loss) or ``val_ema``'s loss is not finite, naming the first problem and ``when`` it was found."""
        ema = state.ema
        entries = nonfinite_entries(state.model)
        entries += [f"the weight average's {name}" for name in nonfinite_entries(ema.module)] if ema is not None else []
        problems = [f"{name} holds non-finite values" for name in entries]
        if not math.isfinite(loss):
            problems.append(f"the validation loss is {loss}")
        if val_ema is not None and not math.isfinite(val_ema.loss):
            problems.append(f"the weight average's validation loss is {val_ema.loss}")
        if problems:
            raise ReslabError(
                f"training diverged {when}: {problems[0]}; nothing of it was saved. {self.restart_hint()}"
            )

    def stop_at(self, bad: StepRecord, state: TrainState) -> NoReturn:
        """Stop at ``bad``, the first diverged step: its batch is replayed on the weights it saw (the optimizer
        skipped it and every step after it), with its random state, to name the layer that went non-finite."""
        loss = bad.loss
        try:
            self.train_loader.set_epoch(state.epoch, bad.step)
            x, y = next(iter(self.train_loader))
            torch.set_rng_state(bad.rng_state)
            scale = state.scaler.get_scale() if state.scaler is not None else 1.0  # fp16 overflowed at this scale
            found = diagnose(
                state.model,
                x,
                y,
                self.loss_fn,
                amp_dtype=self.rt.amp_dtype,
                device_type=self.rt.device.type,
                grad_scale=scale,
                max_loss=self.max_loss,
            ).message
        except Exception as err:  # the replay itself failed (out of memory, say): the divergence is still the news
            found = f"replaying the batch to find the layer failed ({type(err).__name__})"
        limit = f" (above --max-loss {self.max_loss:.3g})" if math.isfinite(loss) and loss > self.max_loss else ""
        raise ReslabError(
            f"training diverged at step {bad.step + 1} of epoch {state.epoch + 1}: the loss was {loss:.4g}{limit}; "
            f"{found}. {self.restart_hint()}"
        )

    def restart_hint(self) -> str:
        saved = self.saved_hint()
        return (
            f"Lower --lr (or add --warmup-epochs) and start again; {saved}" if saved else "Lower --lr and start again"
        )
