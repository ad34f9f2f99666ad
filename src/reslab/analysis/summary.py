"""The papers' architecture tables as data: each stage's output shape, parameters and multiply-accumulates.

FLOPs are counted by ``torch.utils.flop_counter`` on the real forward pass (no hand-written formulas), on
the ``meta`` device, so even ResNet-1202 is summarized in a moment without allocating its tensors. As in
the papers and torchvision's tables, only convolutions and the classifier count; one multiply-accumulate
(MAC) is two FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from reslab.models.registry import create_model
from reslab.models.resnet import ResNet


@dataclass(frozen=True)
class StageRow:
    """One row of the table: a part of the network and what it costs."""

    name: str
    output_shape: tuple[int, ...]  # (C, H, W) for feature maps, (num_classes,) for the head
    params: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_shape: tuple[int, int, int]
    rows: list[StageRow]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)


def _parts(model: ResNet) -> list[tuple[str, list[nn.Module]]]:
    stem = [model.conv1, model.bn1, model.relu, model.maxpool]
    head = [m for m in (model.final_bn, model.avgpool, model.fc) if m is not None]
    return [("stem", stem), *[(n, [getattr(model, n)]) for n in model.stage_names], ("head", head)]


def summarize(model: ResNet | str, input_size: tuple[int, int, int] = (3, 224, 224), **overrides) -> ModelSummary:
    """Summarize a model (an instance, or a registered name built on the meta device).

    Args:
        model: a ``ResNet`` or a name for ``create_model``.
        input_size: (C, H, W) of one input image.
        **overrides: ``create_model`` options when ``model`` is a name (e.g. ``num_classes=10``).
    """
    if isinstance(model, str):
        name = model
        with torch.device("meta"):
            model = create_model(name, **overrides)
    else:
        name = getattr(model, "name", type(model).__name__)
    device = next(model.parameters()).device
    x = torch.zeros((1, *input_size), device=device)

    parts = _parts(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        modules[-1].register_forward_hook(lambda _m, _i, out, key=key: shapes.__setitem__(key, tuple(out.shape[1:])))
        for key, modules in parts
    ]
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()

    flops_by_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__
    rows = []
    for key, modules in parts:
        fqn = {id(m): n for n, m in model.named_modules()}
        flops = sum(flops_by_module.get(f"{root}.{fqn[id(m)]}", 0) for m in modules)
        params = sum(p.numel() for m in modules for p in m.parameters())
        rows.append(StageRow(name=key, output_shape=shapes[key], params=params, macs=flops // 2))
    return ModelSummary(name=name, input_shape=tuple(input_size), rows=rows)
