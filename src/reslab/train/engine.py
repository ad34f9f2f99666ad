"""One epoch of training and one pass of evaluation. Metrics stay on the device until the end of a pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
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
    seconds: float = 0.0


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> EpochResult:
    """Train for one pass over ``batches`` of (images (B, C, H, W), labels (B,)); scheduler steps per batch.

    ``on_step(step, images, loss)`` is called after each optimizer step (progress, gradient norms).
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(batches):
        with autocast(device, amp_dtype):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 needs loss scaling; bf16 has float32's range and does not
            scaler.scale(loss).backward()
            if on_step is not None:
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
        if on_step is not None:
            on_step(step, x, loss)
    totals = all_reduce_sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]))
    loss_total, correct_total, n = totals.tolist()
    return EpochResult(loss=loss_total / max(n, 1), accuracy=correct_total / max(n, 1), images=int(n))


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: Tensor  # (num_classes, num_classes): rows are true classes, columns predictions

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp_min(1)
        return (self.confusion.diag() / totals).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tta_flip: bool = False,
) -> EvalResult:
    """Loss, accuracy and confusion matrix over ``batches`` (summed over ranks), with BN running statistics.

    ``tta_flip`` averages the logits of each image and its mirror image (test-time augmentation).
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    for x, y in batches:
        with autocast(device, amp_dtype):
            logits = model(x).float()
            if tta_flip:
                logits = (logits + model(x.flip(3)).float()) / 2
        loss_sum += loss_fn(logits, y)
        confusion += torch.bincount(y * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    all_reduce_sum(loss_sum)
    all_reduce_sum(confusion)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalResult(
        loss=loss_sum.item() / max(n, 1), accuracy=confusion.diag().sum().item() / max(n, 1), confusion=confusion
    )
