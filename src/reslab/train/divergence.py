"""Say where a diverged training step went wrong first: which layer's output or gradient turned non-finite.

The trainer stops a step whose loss or gradients are non-finite (or whose loss passes ``max_loss``) before the
optimizer applies it, and calls ``diagnose`` to replay that batch with a probe on every module.
``nonfinite_entries`` is the cheap check run before a checkpoint is saved, so a model whose weights or
BatchNorm statistics hold a NaN is never kept as the best one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from reslab.train.engine import autocast

Kind = Literal["input", "output", "gradient", "loss"]


def nonfinite_entries(model: nn.Module) -> list[str]:
    """Names of the state-dict entries (parameters and buffers such as ``running_var``) holding a NaN or Inf.

    In state-dict order. Integer entries (``num_batches_tracked``) cannot be non-finite and are skipped. One
    pass over the tensors and one device sync per device, so it is cheap enough to run before every save.
    """
    names, flags = [], []
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()) and not value.is_meta:
            names.append(name)
            flags.append(~torch.isfinite(value.detach()).all())
    return [name for name, bad in zip(names, _values(flags), strict=True) if bad]


@dataclass(frozen=True)
class Diagnosis:
    """Where a replayed step first went non-finite.

    Attributes:
        kind: ``"input"`` (the images), ``"output"`` (a module's forward output), ``"gradient"`` (a gradient in
            the backward pass), ``"loss"`` (only the loss is bad: non-finite, or finite but huge), or None when
            the replay found nothing wrong (a finite loss at most ``max_loss``).
        layer: the module's name in ``model.named_modules()`` (``"layer2.1.bn2"``; ``""`` is the model itself),
            or None for kinds ``"input"`` and ``"loss"``.
        module_type: the module's class name (``"BatchNorm2d"``), or None with ``layer``.
        detail: which tensor: ``"output"``; for gradients, ``"input"`` (the gradient the module passes back to
            its input), ``"output"`` (the gradient arriving at its output) or a parameter's name (``"weight"``);
            for ``"input"``, how many values are bad; otherwise ``""``.
        loss: the replayed loss, or None when the replay stopped before computing it.
    """

    kind: Kind | None
    layer: str | None = None
    module_type: str | None = None
    detail: str = ""
    loss: float | None = None

    @property
    def message(self) -> str:
        """One sentence for a log line or an error, e.g. "the output of layer2.1.bn2 (BatchNorm2d) went ..."."""
        where = f"the model ({self.module_type})" if self.layer == "" else f"{self.layer} ({self.module_type})"
        if self.kind == "input":
            return f"the input images hold non-finite values ({self.detail})"
        if self.kind == "output":
            return f"the output of {where} went non-finite first"
        if self.kind == "gradient" and self.detail == "output":
            if self.layer == "":
                return "the loss's gradient with respect to the model's output went non-finite first"
            return f"the gradient arriving at the output of {where} went non-finite first, counting from the loss"
        if self.kind == "gradient":
            part = "the gradient it passes to its input" if self.detail == "input" else f"its {self.detail}"
            return f"the gradient of {where} went non-finite first, counting from the loss (in {part})"
        if self.kind == "loss" and not _finite(self.loss):
            return f"every output is finite; the loss itself is {self.loss}"
        if self.kind == "loss":
            return f"every output and gradient is finite; the loss itself is {self.loss:.3g}"
        return f"every output and gradient is finite and the loss is {self.loss:.3g}: the replay did not go wrong"


def diagnose(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    amp_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
    grad_scale: float = 1.0,
    max_loss: float | None = None,
) -> Diagnosis:
    """Replay one training batch and name the first module whose output, or gradient, went non-finite.

    The forward runs in train mode under the same autocast as training; the first module (in execution order,
    so inner modules before the block holding them) with a NaN or Inf output is named. If every output is
    finite, the backward names the first module, in the order gradients are computed (from the loss back to
    the input), whose input gradient, parameter gradient, or incoming output gradient is non-finite. The model
    is left exactly as found: parameters, buffers (BN running statistics), every ``.grad``, each module's
    train/eval mode, no hooks, and torch's CPU (and CUDA) random state.

    Args:
        model: the plain module (unwrap DDP or ``torch.compile`` first: hooks go on its submodules).
        images: the batch, (B, C, H, W), already on the model's device.
        labels: (B,) class indices.
        loss_fn: ``loss_fn(logits (B, num_classes), labels (B,))`` -> scalar loss, as in training.
        amp_dtype: the training's autocast dtype (``torch.bfloat16``, ``torch.float16``) or None for float32.
        device_type: ``"cpu"`` or ``"cuda"``, for autocast and the random state.
        grad_scale: the GradScaler's scale when training used one, so fp16 gradients overflow as they did.
        max_loss: the trainer's loss limit; a finite replay with a loss at most this is reported as kind None.
    """
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        return Diagnosis("input", detail=f"{bad} of {images.numel()} values are NaN or Inf")
    with _preserved(model, device_type), torch.enable_grad():
        model.train()
        probe = _Probe(model)
        try:
            probe.install(model)
            with autocast(torch.device(device_type), amp_dtype):
                loss = loss_fn(model(images), labels)
            first = probe.first_bad(probe.forward)
            if first is not None:
                return Diagnosis("output", first[0], probe.types[first[0]], "output")
            loss_value = float(loss.detach().float())
            if not _finite(loss_value):
                return Diagnosis("loss", loss=loss_value)
            params = [p for p in model.parameters() if p.requires_grad]
            if loss.requires_grad and params:
                torch.autograd.grad(loss * grad_scale, params, allow_unused=True)  # leaves every .grad untouched
            first = probe.first_bad(probe.backward)
        finally:
            probe.remove()
    if first is not None:
        return Diagnosis("gradient", first[0], probe.types[first[0]], first[1], loss=loss_value)
    quiet = max_loss is not None and loss_value <= max_loss
    return Diagnosis(None if quiet else "loss", loss=loss_value)


class _Probe:
    """Hooks on every module that record, in order, whether each output and gradient holds a NaN or Inf.

    Flags stay 0-d device tensors until ``first_bad``, so a replay on the GPU syncs once, not once per module.
    """

    def __init__(self, model: nn.Module) -> None:
        self.types = {name: type(module).__name__ for name, module in model.named_modules()}
        self.forward: list[tuple[str, str, Tensor]] = []  # (module name, "output", is-bad flag)
        self.backward: list[tuple[str, str, Tensor]] = []  # (module name, "input" | "output" | param name, flag)
        self._watched: Any = WeakIdKeyDictionary()  # tensor -> (its version, handle of our gradient hook)
        self._handles: list[RemovableHandle] = []

    def install(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(partial(self._copy_inputs, name)))
            self._handles.append(module.register_forward_hook(partial(self._check_outputs, name)))
            for param_name, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    self._handles.append(param.register_hook(partial(self._record, name, param_name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def first_bad(self, events: list[tuple[str, str, Tensor]]) -> tuple[str, str] | None:
        """(module name, which tensor) of the first event whose tensor held a NaN or Inf, or None."""
        bad = _values([flag for _, _, flag in events])
        return next(((name, what) for (name, what, _), b in zip(events, bad, strict=True) if b), None)

    def _record(self, name: str, what: str, grad: Tensor) -> None:
        self.backward.append((name, what, ~torch.isfinite(grad.detach()).all()))

    def _watch(self, tensor: Tensor, name: str, what: str) -> None:
        # The same tensor, unchanged, seen again (an nn.Identity's output, a block's output as its stage's):
        # the gradient is the same one, so keep only the outer module's name, which says where it came from.
        previous = self._watched.get(tensor)
        if previous is not None and previous[0] == tensor._version:
            previous[1].remove()
        self._watched[tensor] = (tensor._version, tensor.register_hook(partial(self._record, name, what)))

    def _copy_inputs(self, name: str, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        # A private copy of each input lets a tensor hook see the gradient this module alone sends back (a
        # hook on the shared tensor would see the sum over all its users). A copy, not a view, because
        # modules modify inputs in place (ReLU(inplace=True)), which autograd forbids on hooked views.
        if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
            return None
        copied = tuple(a.clone() if isinstance(a, Tensor) and a.requires_grad else a for a in args)
        for a in copied:
            if isinstance(a, Tensor) and a.requires_grad:
                self._watch(a, name, "input")
        return copied

    def _check_outputs(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        for tensor in _tensors(output):
            if tensor.is_floating_point():
                self.forward.append((name, "output", ~torch.isfinite(tensor.detach()).all()))
                if tensor.requires_grad:
                    self._watch(tensor, name, "output")


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a module's output: a tensor, or tuples, lists and dicts of them."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _values(flags: list[Tensor]) -> list[bool]:
    """The values of 0-d bool tensors, with one device sync per device rather than one per tensor."""
    values = [False] * len(flags)
    by_device: dict[torch.device, list[int]] = {}
    for i, flag in enumerate(flags):
        by_device.setdefault(flag.device, []).append(i)
    for indices in by_device.values():
        for i, value in zip(indices, torch.stack([flags[i] for i in indices]).tolist(), strict=True):
            values[i] = value
    return values


def _finite(value: float | None) -> bool:
    return value is not None and value - value == 0.0  # False for NaN and +-Inf


@contextmanager
def _preserved(model: nn.Module, device_type: str) -> Iterator[None]:
    """Restore parameters, buffers, every ``.grad``, every module's train/eval mode and the random state."""
    # Copies, not references: the train-mode forward updates BN running statistics in place.
    saved = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]
    grads = [(p, p.grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    rng = torch.get_rng_state()  # dropout and drop-path draw from it
    cuda_rng = torch.cuda.get_rng_state_all() if device_type == "cuda" and torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)
        for param, grad in grads:
            param.grad = grad
        for module, training in modes:
            module.training = training
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
