"""The lesions of ``reslab explain lesion``, made in place and always undone: blocks deleted or swapped.

``lesioned`` replaces ``block.forward`` for the duration of a ``with`` block and puts it back on exit; the model
is never copied. ``predictions`` runs many lesions on the same images, sharing the blocks they leave untouched.
What a deleted block computes, residual or plain, is set out in ``reslab.explain.lesion``'s docstring.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from reslab.explain.common import residual_blocks
from reslab.models.blocks import ZeroPadShortcut

BATCH_SIZE = 250  # images per forward: large enough for the CPU's convolutions, small enough to keep memory low

Lesion = dict[str, Any]  # {"delete": [block names], "swap": [(name, name), ...]}


# --- the lesion itself ---------------------------------------------------------------------------------------


def _geometry(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of a block's residual branch (its convolutions, in order)."""
    convs = [m for name, m in block.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith("downsample")]
    return convs[0].in_channels, convs[-1].out_channels, math.prod(c.stride[0] for c in convs)


def keeps_shape(block: nn.Module) -> bool:
    """Whether ``block``'s output has its input's shape (as many channels, stride 1): only such blocks swap."""
    in_channels, out_channels, stride = _geometry(block)
    return in_channels == out_channels and stride == 1


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """shortcut(x) without computing the residual branch, so a deleted block costs (almost) nothing."""
    if block.downsample is None:
        return x
    if block.preact and not isinstance(block.downsample, ZeroPadShortcut):
        return block.paths(x)[1]  # a v2 projection sees BN-ReLU(x), which only paths() computes
    return block.downsample(x)


def _deleted_forward(block: nn.Module):
    """The forward of ``block`` with its residual branch set to zero (what that means: ``lesion``'s docstring)."""
    if block.residual:

        def forward(x: Tensor) -> Tensor:
            identity = _shortcut(block, x)
            return block.merge(torch.zeros_like(identity), identity)

        return forward
    in_channels, out_channels, stride = _geometry(block)
    if in_channels == out_channels and stride == 1:
        return lambda x: x
    # No identity to fall back on: use the residual twin's option-A map, so both nets lose the same thing.
    return ZeroPadShortcut(in_channels=in_channels, out_channels=out_channels, stride=stride).forward


@contextmanager
def lesioned(
    model: nn.Module, *, delete: Sequence[str] = (), swap: Sequence[tuple[str, str]] = ()
) -> Iterator[nn.Module]:
    """Within the ``with`` block, the blocks named in ``delete`` are deleted and each pair in ``swap`` runs in
    exchanged places (both blocks must keep their input's shape). Every ``forward`` is restored on exit, even
    on an error.

    Names are ``residual_blocks``' (``layer1.0``, ...).
    """
    blocks = dict(residual_blocks(model))
    unknown = [n for n in [*delete, *(n for pair in swap for n in pair)] if n not in blocks]
    if unknown:
        raise ValueError(f"no block named {unknown[0]!r}; the blocks are {', '.join(blocks)}")
    saved: list[tuple[nn.Module, Any]] = []  # (block, the instance's own forward before, or None)

    def set_forward(block: nn.Module, forward) -> None:
        saved.append((block, block.__dict__.get("forward")))
        block.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's

    try:
        for name in delete:
            set_forward(blocks[name], _deleted_forward(blocks[name]))
        for a, b in swap:
            if not (keeps_shape(blocks[a]) and keeps_shape(blocks[b])):
                raise ValueError(f"{a} and {b} cannot be swapped: a block that changes shape has one place")
            forward_a, forward_b = blocks[a].forward, blocks[b].forward
            set_forward(blocks[a], forward_b)
            set_forward(blocks[b], forward_a)
        yield model
    finally:
        for block, previous in reversed(saved):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


# --- measuring many lesions on the same images ----------------------------------------------------------------


def run_from(model: nn.Module, blocks: list[nn.Module], start: int, h: Tensor) -> Tensor:
    """Blocks ``start, start + 1, ...`` then the head, as ``model.forward`` runs them:
    (B, C, H, W), the input of block ``start`` -> logits (B, num_classes)."""
    for block in blocks[start:]:
        h = block(h)
    if model.final_bn is not None:  # v2's last BN-ReLU (ResNet.forward_features)
        h = torch.relu(model.final_bn(h))
    return model.forward_head(h)


@torch.inference_mode()
def predictions(model: nn.Module, x: Tensor, lesions: list[Lesion], batch_size: int = BATCH_SIZE) -> Tensor:
    """The class the model predicts for each image under each lesion: (L, N) int64 for x (N, C, H, W).

    Blocks before the first one a lesion touches compute what the intact model computes, so lesions are
    visited in order of that block and share one pass through the untouched blocks (about halving the cost).
    """
    names = [name for name, _ in residual_blocks(model)]
    blocks = [block for _, block in residual_blocks(model)]
    index = {name: i for i, name in enumerate(names)}
    starts = [
        min(
            [index[n] for n in lesion.get("delete", ())] + [index[n] for p in lesion.get("swap", ()) for n in p],
            default=len(blocks),
        )
        for lesion in lesions
    ]
    predicted = torch.empty(len(lesions), len(x), dtype=torch.long)
    for offset in range(0, len(x), batch_size):
        h, at = model.forward_stem(x[offset : offset + batch_size]), 0
        for j in sorted(range(len(lesions)), key=starts.__getitem__):
            for block in blocks[at : starts[j]]:
                h = block(h)
            at = max(at, starts[j])
            with lesioned(model, **lesions[j]):
                logits = run_from(model, blocks, at, h)
            predicted[j, offset : offset + len(logits)] = logits.argmax(1).cpu()
    return predicted
