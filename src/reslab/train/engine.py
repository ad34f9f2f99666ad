"""A training step in two halves (forward/backward, then the optimizer) and a pass of evaluation.

Metrics stay on the device until the end of an epoch or pass."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.train.runtime import all_reduce_sum


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the forward pass, or nothing for float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    images: int


class EpochMeter:
    """One epoch's summed training loss and correct predictions, kept on the device: no host sync per step.

    Its state goes into mid-epoch checkpoints, so a resumed epoch reports the same numbers as an uninterrupted one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        """``loss``: the batch's mean loss (a scalar); ``logits`` (B, classes); ``labels`` (B,)."""
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.argmax(dim=1) == labels).sum()
        self.seen += len(labels)

    def result(self) -> EpochResult:
        """The epoch's mean loss and accuracy over every rank (a collective under DDP)."""
        local = torch.stack(
            [self.loss_sum.float(), self.correct.float(), torch.tensor(float(self.seen), device=self.device)]
        )
        loss_total, correct_total, n = all_reduce_sum(local).tolist()
        return EpochResult(loss=loss_total / max(n, 1), accuracy=correct_total / max(n, 1), images=int(n))

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen}

    def summed_state(self) -> dict:
        """``state_dict`` of every rank's sums added up (a collective under DDP)."""
        if not dist.is_initialized():
            return self.state_dict()
        seen = all_reduce_sum(torch.tensor(self.seen, device=self.device))
        summed = {"loss_sum": all_reduce_sum(self.loss_sum.clone()), "correct": all_reduce_sum(self.correct.clone())}
        return {**{k: v.cpu() for k, v in summed.items()}, "seen": int(seen)}

    def load_state_dict(self, state: dict, keep: bool = True) -> None:
        """``keep=False``: start from zero (another rank carries these sums)."""
        self.reset()
        if keep:
            self.loss_sum = state["loss_sum"].to(self.device)
            self.correct = state["correct"].to(self.device)
            self.seen = state["seen"]


def forward_backward(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward and backward of one batch, images (B, C, H, W) and labels (B,); returns (loss, logits (B, classes)).

    The optimizer does not step yet: the caller first checks the loss and gradients (a diverging step must
    not reach the weights). With a scaler (fp16) the gradients are unscaled, so their norms are true ones.
    """
    model.train()
    with autocast(device, amp_dtype):
        logits = model(images)
        loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16 needs loss scaling; bf16 has float32's range and does not
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    return loss, logits


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Apply the gradients of ``forward_backward`` and advance the per-batch schedule."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: Tensor  # (num_classes, num_classes): rows are true classes, columns predictions

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp_min(1)
        return (self.confusion.diag() / totals).tolist()


def _shifted(x: Tensor, pixels: int) -> list[Tensor]:
    """``x`` (B, C, H, W) moved ``pixels`` down-right and up-left, the uncovered border filled by reflection."""
    padded = F.pad(x, (pixels, pixels, pixels, pixels), mode="reflect")
    h, w = x.shape[-2:]
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    views = (padded[..., :h, :w], padded[..., 2 * pixels :, 2 * pixels :])
    return [v.contiguous(memory_format=layout) for v in views]


def predict_logits(model: nn.Module, x: Tensor, *, flip: bool = False, translate: int = 0) -> Tensor:
    """Logits (B, classes) in float32 for images (B, C, H, W), averaged over test-time views.

    ``flip`` adds each view's mirror image; ``translate`` adds the image moved that many pixels down-right and
    up-left. The untranslated view weighs as much as the translated ones together (as in airbench), so a
    shift that loses an edge of the object cannot outvote the image itself. Call inside ``autocast``.
    """

    def mirrored(view: Tensor) -> Tensor:
        logits = model(view).float()
        return (logits + model(view.flip(3)).float()) / 2 if flip else logits

    logits = mirrored(x)
    if translate:
        shifted = [mirrored(v) for v in _shifted(x, translate)]
        logits = (logits + sum(shifted) / len(shifted)) / 2
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tta_flip: bool = False,
    tta_translate: int = 0,
) -> EvalResult:
    """Loss, accuracy and confusion matrix over ``batches`` (summed over ranks), with BN running statistics.

    ``tta_flip`` and ``tta_translate`` average the logits over mirrored and shifted views (``predict_logits``).
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = predict_logits(model, x, flip=tta_flip, translate=tta_translate)
        loss_sum += loss_fn(logits, y)
        confusion += torch.bincount(y * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    all_reduce_sum(loss_sum)
    all_reduce_sum(confusion)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalResult(
        loss=loss_sum.item() / max(n, 1), accuracy=confusion.diag().sum().item() / max(n, 1), confusion=confusion
    )
