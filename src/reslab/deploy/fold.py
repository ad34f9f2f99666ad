"""Fold each BatchNorm into the convolution before it: an inference copy with the same outputs and fewer layers.

In inference a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``.
When ``x`` is a convolution's output and nothing else reads it, the map can move into that convolution's weights
and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``), and the BatchNorm becomes the identity.

The pairs are found on the traced graph (``torch.fx``), not from a list of attribute names, so each fold is
proven safe by the data flow itself:
- v1 and v1.5 fold every BatchNorm (stem, branches and projection shortcuts);
- pre-activation v2 folds the BatchNorms that follow a convolution inside a branch. Each block's first
  BatchNorm reads the block's input (a residual sum, or a stem convolution whose output the identity path
  also reads), and ``final_bn`` reads the last sum: those stay, and ``fold_plan`` says why.
ReLUs are never fused: the one ReLU module a torchvision-style block calls twice, once on the residual sum, is
what breaks ``torch.ao.quantization.fuse_modules`` (pytorch#118829); folding BatchNorm alone cannot.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_NORMS = (nn.BatchNorm2d,)


@dataclass
class FoldPlan:
    """What ``fold_bn`` does to a model: the (convolution, BatchNorm) pairs it folds and the BatchNorms it keeps."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv name, BatchNorm name)
    kept: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> why it cannot fold


def _source(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[object, bool]:
    """The node that computes ``node``'s input, seen through ``nn.Identity`` modules (a v2 stem's missing
    BatchNorm and ReLU), and whether every value on the way is read by one node alone."""
    source, single_use = node.args[0], True
    while (
        isinstance(source, fx.Node) and source.op == "call_module" and isinstance(modules[source.target], nn.Identity)
    ):
        single_use &= len(source.users) == 1
        source = source.args[0]
    return source, single_use


def _why_kept(node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> str | None:
    """None when the BatchNorm ``node`` can fold into the convolution before it; otherwise why it cannot."""
    source, single_use = _source(node, modules)
    if not (isinstance(source, fx.Node) and source.op == "call_module"):
        return "its input is not a convolution's output (e.g. a residual sum)"
    if not isinstance(modules[source.target], nn.Conv2d):
        return f"its input comes from {type(modules[source.target]).__name__}, not a convolution"
    if len(source.users) > 1 or not single_use:
        return f"{source.target}'s output is also read elsewhere (the identity path)"
    if calls[source.target] > 1 or calls[node.target] > 1:
        return "the convolution or the BatchNorm is called more than once"
    return None


def fold_plan(model: nn.Module) -> FoldPlan:
    """Which BatchNorms of ``model`` fold into the convolution before them, and why the others cannot."""
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    plan = FoldPlan()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _NORMS):
            continue
        reason = _why_kept(node, modules, calls)
        if reason is None:
            plan.folded.append((_source(node, modules)[0].target, node.target))
        else:
            plan.kept[node.target] = reason
    return plan


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def fold_bn(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with each foldable BatchNorm folded into its convolution (see ``fold_plan``).

    The copy is the same class with the same attributes (a ``ResNet`` stays a ``ResNet``): folded convolutions
    gain a bias and their BatchNorms become ``nn.Identity``. Outputs match the eval-mode original up to float
    rounding (about 1e-6 relative). ``model`` is left unchanged.

    Raises:
        ValueError: ``model`` is in training mode, where BatchNorm uses batch statistics and cannot fold.
    """
    if model.training:
        raise ValueError(
            "fold_bn needs a model in eval mode: call model.eval() first (training BatchNorm uses "
            "each batch's own statistics, which no fixed weights can reproduce)"
        )
    plan = fold_plan(model)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for conv_name, norm_name in plan.folded:
            conv = fuse_conv_bn_eval(folded.get_submodule(conv_name), folded.get_submodule(norm_name))
            _replace(folded, conv_name, conv)
            _replace(folded, norm_name, nn.Identity())
    return folded.eval()
