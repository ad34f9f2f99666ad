"""One forward and backward of a net, measured block by block, for ``reslab explain gradients``.

``gradient_norms`` records each block's two paths while the net runs (``recording_paths``), then splits the
gradient at each block's input between them (``split``, He et al. 2016, eq. 5) and reports every norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.explain.common import residual_blocks
from reslab.models import ResNet


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and fc, in the order they are registered (the forward order in these nets)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@contextmanager
def recording_paths(model: ResNet) -> Iterator[list[tuple[Tensor, Tensor, Tensor | None]]]:
    """While open, each block's forward records ``(x, F(x), shortcut(x))`` with their gradients retained.

    The real ``block.paths`` runs; ``merge`` gets a copy of ``F(x)`` so that the plain block's in-place ReLU
    leaves the recorded ``F(x)`` (and its ``.grad``, the gradient at the sum) as it was before the merge.
    """
    record: list[tuple[Tensor, Tensor, Tensor | None]] = []
    blocks = [block for _, block in residual_blocks(model)]

    def recorder(paths):
        def recording(x: Tensor) -> tuple[Tensor, Tensor | None]:
            branch, identity = paths(x)
            x.retain_grad()
            branch.retain_grad()
            record.append((x, branch, identity))
            return branch.clone(), identity

        return recording

    for block in blocks:
        block.paths = recorder(block.paths)  # an instance attribute shadows the method until deleted
    try:
        yield record
    finally:
        for block in blocks:
            del block.paths


def split(x: Tensor, branch: Tensor, identity: Tensor | None, at_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 5 of He et al. 2016, one block: the gradient reaching ``x`` through the shortcut and through ``F``.

    Both paths receive ``at_sum``, the gradient at their sum (before the ReLU in v1); each path's
    vector-Jacobian product carries it back to ``x``. (B, C, H, W) each; the shortcut's is zero in a plain block.
    """
    (through_branch,) = torch.autograd.grad(branch, x, at_sum, retain_graph=True)
    if identity is None:
        return torch.zeros_like(x), through_branch
    if identity is x:  # the identity shortcut: the "1" of eq. 5
        return at_sum, through_branch
    (through_skip,) = torch.autograd.grad(identity, x, at_sum, retain_graph=True)
    return through_skip, through_branch


def gradient_norms(model: ResNet, x: Tensor, y: Tensor) -> dict[str, Any]:
    """One forward and backward in train mode on (B, C, H, W) images ``x`` and (B,) labels ``y``.

    Returns the loss and L2 norms: ``stem_weight_grad`` (conv1), ``block_input_grad`` (one per block, the
    first is the stem's output), ``skip_grad`` / ``branch_grad`` (each block's split), ``weight_grad`` and
    ``weight_norm`` (every conv and fc) and ``split_error``, the largest ``|skip + branch - dL/dx| / |dL/dx|``
    over the blocks.
    """
    model.train()  # BatchNorm with batch statistics, as in training
    model.zero_grad(set_to_none=True)
    with recording_paths(model) as record:
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)  # kept for the per-block vector-Jacobian products below
    # Copied now: autograd.grad below also feeds the retained .grad of the tensors it passes through.
    totals = [block_input.grad.clone() for block_input, _, _ in record]
    at_sums = [branch.grad.clone() for _, branch, _ in record]
    inputs, skips, branches, errors = [], [], [], []
    for (block_input, branch, identity), total, at_sum in zip(record, totals, at_sums, strict=True):
        through_skip, through_branch = split(block_input, branch, identity, at_sum)
        inputs.append(total.norm().item())
        skips.append(through_skip.norm().item())
        branches.append(through_branch.norm().item())
        errors.append(((through_skip + through_branch - total).norm() / total.norm()).item())
    loss_value = loss.item()
    del record, loss  # frees the retained graph
    return {
        "loss": loss_value,
        "stem_weight_grad": model.conv1.weight.grad.norm().item(),
        "stem_output_grad": inputs[0],
        "block_input_grad": inputs,
        "skip_grad": skips,
        "branch_grad": branches,
        "split_error": max(errors),
        "weight_grad": [m.weight.grad.norm().item() for _, m in weighted_layers(model)],
        "weight_norm": [m.weight.norm().item() for _, m in weighted_layers(model)],
    }
