"""Residual blocks: BasicBlock and Bottleneck, their pre-activation (v2) forms, and the shortcuts.

Every block computes ``y = merge(F(x), shortcut(x))``, where ``F`` is the residual branch: ``paths`` returns
the two, ``merge`` adds them (then ReLU in v1). With ``residual=False`` the merge drops the shortcut and the
block becomes a layer of the "plain" twin network used in He et al. 2015, Sec. 4.1, to show the degradation
problem.

Parameter names follow torchvision (``conv1``, ``bn1``, ..., ``downsample.0`` / ``downsample.1``) so that
state dicts move between the two libraries unchanged.

Padding: every convolution here has an odd kernel (1 or 3) and uses ``padding=k // 2``. For odd ``k`` this
is exactly TensorFlow's "fixed padding" used by the reference ResNet code (pad ``(k - 1) // 2`` before and
the rest after, then a VALID convolution): both give ``ceil(n / stride)`` outputs for any input size ``n``,
odd or even, and the same numbers (see ``tests/models/test_shapes.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, *, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias (a BatchNorm follows or precedes it), padding 1."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut option A of He et al. 2015 (Sec. 4.2, CIFAR): parameter-free identity.

    Subsamples space with stride ``stride`` and pads the new channels with zeros:
    (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot reduce channels ({in_channels} -> {out_channels})")
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pairs are (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


def projection_shortcut(in_channels: int, out_channels: int, *, stride: int, with_norm: bool) -> nn.Sequential:
    """Shortcut option B: a strided 1x1 projection, followed by BN in v1 (not in pre-activation v2).

    Returned as ``nn.Sequential`` so its keys are torchvision's ``downsample.0`` / ``downsample.1``.
    """
    layers: list[nn.Module] = [conv1x1(in_channels, out_channels, stride=stride)]
    if with_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops a sample's whole residual branch with probability ``p``.

    Kept branches are scaled by 1 / (1 - p) so the expected output matches inference, where it is a no-op.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _Block(nn.Module):
    """What all four blocks share: the constructor, the shortcut, the join and stochastic depth.

    Args:
        in_channels: channels of the block's input.
        planes: the block's base width; it outputs ``planes * expansion`` channels.
        stride: spatial stride of the block (2 in the first block of stages 2, 3, 4).
        shortcut: module mapping the input to the output's shape, or None for the identity.
        residual: False builds the plain (no-shortcut) twin.
        groups, base_width: grouped convolution (ResNeXt) and width per group (Wide ResNet).
        stride_in_1x1: v1 puts a bottleneck's stride on its first 1x1, v1.5 on the 3x3.
        drop_path: stochastic-depth probability of dropping this block's branch while training.
        dropout: probability of dropout between the two 3x3 convolutions of a pre-activation basic block
            (Wide ResNets, Zagoruyko and Komodakis 2016, Sec. 2.3); the other blocks do not take it.
    """

    expansion: int = 1
    preact: bool = False
    takes_dropout: bool = False

    def __init__(
        self,
        *,
        in_channels: int,
        planes: int,
        stride: int = 1,
        shortcut: nn.Module | None = None,
        residual: bool = True,
        groups: int = 1,
        base_width: int = 64,
        stride_in_1x1: bool = False,
        drop_path: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not residual and (shortcut is not None or drop_path > 0):
            raise ValueError("a plain block has no shortcut and no stochastic depth")
        if dropout and not self.takes_dropout:
            name = type(self).__name__
            raise ValueError(f"dropout between convolutions is built for pre-activation basic blocks, not {name}")
        self.residual = residual
        self._build_branch(
            in_channels=in_channels,
            planes=planes,
            stride=stride,
            groups=groups,
            base_width=base_width,
            stride_in_1x1=stride_in_1x1,
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.downsample = shortcut  # torchvision's name for the shortcut module
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _build_branch(
        self, *, in_channels: int, planes: int, stride: int, groups: int, base_width: int, stride_in_1x1: bool
    ) -> None:
        raise NotImplementedError

    def _shortcut(self, x: Tensor, preactivated: Tensor | None = None) -> Tensor:
        # Pre-activation (v2): a projection sees the pre-activated input, like the branch does; an identity
        # carries the raw input so the signal path from block to block stays a pure sum (He et al. 2016).
        if self.downsample is None:
            return x
        if preactivated is not None and isinstance(self.downsample, nn.Sequential):
            return self.downsample(preactivated)
        return self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        branch, identity = self.paths(x)
        return self.merge(branch, identity)

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The two paths of ``y = merge(F(x), shortcut(x))``: (F(x), shortcut(x)); None for a plain block.

        Kept apart so ``reslab.explain`` can measure, and lesion, each path of a real block.
        """
        raise NotImplementedError

    def merge(self, branch: Tensor, identity: Tensor | None) -> Tensor:
        """The join: ``F(x) + shortcut(x)`` (just ``F(x)`` in a plain block), then ReLU in v1 (not in v2)."""
        out = branch if identity is None else self.drop_path(branch) + identity
        return out if self.preact else self.relu(out)

    def last_norm_or_conv(self) -> nn.Module:
        """The module zeroed by ``zero_init_residual`` so the block starts as the identity."""
        raise NotImplementedError


def _bottleneck_width(planes: int, base_width: int, groups: int) -> int:
    return int(planes * (base_width / 64.0)) * groups  # torchvision's ResNeXt / Wide ResNet formula


def _no_groups(name: str, groups: int, base_width: int) -> None:
    if groups != 1 or base_width != 64:
        raise ValueError(f"{name} supports only groups=1 and width_per_group=64")


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR family), post-activation (v1).

    (B, C_in, H, W) -> (B, planes, H / stride, W / stride). v1 and v1.5 are the same here (no 1x1).
    """

    expansion = 1

    def _build_branch(self, *, in_channels, planes, stride, groups, base_width, stride_in_1x1) -> None:
        _no_groups("BasicBlock", groups, base_width)
        self.conv1 = conv3x3(in_channels, planes, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        identity = self._shortcut(x) if self.residual else None
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)), identity

    def last_norm_or_conv(self) -> nn.Module:
        return self.bn2


class Bottleneck(_Block):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50 and deeper), post-activation (v1 / v1.5).

    ``stride_in_1x1=True`` is the paper's v1 (stride on the first 1x1); ``False`` is v1.5, torchvision's
    choice, which puts the stride on the 3x3 so no input pixel is skipped by a strided 1x1 (about +0.5%
    top-1 on ImageNet, per NVIDIA's ResNet-50 v1.5 notes).

    (B, C_in, H, W) -> (B, planes * 4, H / stride, W / stride)
    """

    expansion = 4

    def _build_branch(self, *, in_channels, planes, stride, groups, base_width, stride_in_1x1) -> None:
        width = _bottleneck_width(planes, base_width, groups)
        self.conv1 = conv1x1(in_channels, width, stride=stride if stride_in_1x1 else 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride=1 if stride_in_1x1 else stride, groups=groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        identity = self._shortcut(x) if self.residual else None
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)), identity

    def last_norm_or_conv(self) -> nn.Module:
        return self.bn3


class PreActBasicBlock(_Block):
    """Pre-activation BasicBlock (He et al. 2016, "Identity Mappings in Deep Residual Networks", Fig. 4e).

    BN-ReLU-conv, BN-ReLU-conv, then the sum, with no ReLU after it: the identity path stays clean.
    """

    expansion = 1
    preact = True
    takes_dropout = True  # the wide basic block of Wide ResNets: BN-ReLU-conv, BN-ReLU-dropout-conv

    def _build_branch(self, *, in_channels, planes, stride, groups, base_width, stride_in_1x1) -> None:
        _no_groups("PreActBasicBlock", groups, base_width)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, planes, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=False)  # the raw input x is still needed by the identity path

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        pre = self.relu(self.bn1(x))
        identity = self._shortcut(x, pre) if self.residual else None
        out = self.conv1(pre)
        return self.conv2(self.dropout(self.relu(self.bn2(out)))), identity

    def last_norm_or_conv(self) -> nn.Module:
        return self.conv2


class PreActBottleneck(_Block):
    """Pre-activation Bottleneck (He et al. 2016): BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1, sum."""

    expansion = 4
    preact = True

    def _build_branch(self, *, in_channels, planes, stride, groups, base_width, stride_in_1x1) -> None:
        width = _bottleneck_width(planes, base_width, groups)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, width, stride=stride if stride_in_1x1 else 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride=1 if stride_in_1x1 else stride, groups=groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)

    def paths(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        pre = self.relu(self.bn1(x))
        identity = self._shortcut(x, pre) if self.residual else None
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.relu(self.bn3(out))), identity

    def last_norm_or_conv(self) -> nn.Module:
        return self.conv3


BLOCKS: dict[tuple[str, bool], type[_Block]] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}


def zero_init_(module: nn.Module) -> None:
    """Zero a block's last BN scale (v1) or last conv (v2) so the block starts as the identity.

    From Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 5.1: improves large-batch training.
    """
    with torch.no_grad():
        module.weight.zero_()
