"""The one generic ResNet: every depth, version, stem and shortcut option is an argument, not a class.

Variants are data (see ``registry.py``): ResNet-50 is ``ResNet(block="bottleneck", layers=(3, 4, 6, 3))``,
the paper's CIFAR ResNet-20 is ``ResNet(block="basic", layers=(3, 3, 3), widths=(16, 32, 64), stem="cifar",
shortcut="A", num_classes=10)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from reslab.models.blocks import BLOCKS, ZeroPadShortcut, projection_shortcut, zero_init_

Version = Literal["v1", "v1.5", "v2"]
VERSIONS = ("v1", "v1.5", "v2")
STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B")


class ResNet(nn.Module):
    """A residual network (He et al. 2015) or its pre-activation form (He et al. 2016).

    Attribute names match torchvision (``conv1, bn1, relu, maxpool, layer1..layerN, avgpool, fc``), so a
    v1.5 ImageNet model loads ``torchvision.models.resnet50().state_dict()`` unchanged.

    Args:
        block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1, 3x3, 1x1 with 4x expansion).
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50 or ``(n, n, n)`` for CIFAR 6n+2.
        widths: base width (``planes``) of each stage; a stage outputs ``width * block expansion`` channels.
        stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max pool: /4) or ``"cifar"`` (3x3/1 conv: /1).
        version: ``"v1"`` (bottleneck stride on the first 1x1, the paper), ``"v1.5"`` (stride on the 3x3,
            torchvision) or ``"v2"`` (pre-activation: BN-ReLU before each conv, no ReLU after the sum,
            BN-ReLU before pooling).
        shortcut: where shapes change, ``"A"`` zero-pads channels of a strided identity (no parameters,
            the paper's CIFAR choice) and ``"B"`` uses a 1x1 projection (the paper's ImageNet choice).
        residual: False builds the plain twin (same layers, no shortcuts) of He et al. 2015, Sec. 4.1.
        num_classes: outputs of the classifier.
        in_chans: input channels (1 for grayscale).
        zero_init_residual: start every residual branch at zero so each block is the identity.
        groups, width_per_group: grouped 3x3 convolutions (ResNeXt) and bottleneck width (Wide ResNet).
        drop_path_rate: stochastic depth, rising linearly from 0 in the first block to this in the last.
        stem_width: channels of the stem convolution; defaults to ``widths[0]``.
        dropout: dropout probability between the two convolutions of each pre-activation basic block (Wide
            ResNets, Zagoruyko and Komodakis 2016: 0.3 on CIFAR); 0 leaves it out.
    """

    def __init__(
        self,
        *,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: Literal["imagenet", "cifar"] = "imagenet",
        version: Version = "v1.5",
        shortcut: Literal["A", "B"] = "B",
        residual: bool = True,
        num_classes: int = 1000,
        in_chans: int = 3,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        drop_path_rate: float = 0.0,
        stem_width: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        args = dict(
            block=block,
            layers=layers,
            widths=widths,
            stem=stem,
            version=version,
            shortcut=shortcut,
            residual=residual,
            num_classes=num_classes,
            in_chans=in_chans,
            zero_init_residual=zero_init_residual,
            groups=groups,
            width_per_group=width_per_group,
            drop_path_rate=drop_path_rate,
            stem_width=stem_width,
            dropout=dropout,
        )
        _check_args(**args)
        # Everything needed to rebuild this exact model: ResNet(**model.config). Checkpoints store it.
        self.config: dict[str, Any] = {**args, "layers": list(layers), "widths": list(widths)}
        self.preact = version == "v2"
        block_cls = BLOCKS[(block, self.preact)]
        stem_width = stem_width or widths[0]

        # Stem. Pre-activation nets leave the stem's BN-ReLU to the first block's pre-activation.
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.Identity() if self.preact else nn.BatchNorm2d(stem_width)
        self.relu = nn.Identity() if self.preact else nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        self.num_features = self._add_stages(block_cls, stem_width)
        in_channels = self.num_features

        # v2 ends with the BN-ReLU that no block applied to the last sum (He et al. 2016, Sec. 4).
        self.final_bn = nn.BatchNorm2d(in_channels) if self.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

        self._init_weights(zero_init_residual)
        self.frozen: tuple[str, ...] = ()  # parts kept fixed (``freeze``): no gradient, BatchNorm in eval mode

    def _add_stages(self, block_cls: type[nn.Module], stem_width: int) -> int:
        """``layer1`` .. ``layerN`` from ``self.config``; returns the channels of the last stage's output.

        The first stage keeps the resolution, each later one halves it in its first block.
        """
        cfg = self.config
        layers, widths, residual = cfg["layers"], cfg["widths"], cfg["residual"]
        num_blocks = sum(layers)
        in_channels = stem_width
        block_index = 0
        self.stage_names: list[str] = []
        self.stage_channels: list[int] = []
        for stage, (width, depth) in enumerate(zip(widths, layers, strict=True)):
            blocks = []
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                out_channels = width * block_cls.expansion
                needs_shortcut = residual and (stride != 1 or in_channels != out_channels)
                blocks.append(
                    block_cls(
                        in_channels=in_channels,
                        planes=width,
                        stride=stride,
                        shortcut=self._make_shortcut(in_channels, out_channels, stride, cfg["shortcut"])
                        if needs_shortcut
                        else None,
                        residual=residual,
                        groups=cfg["groups"],
                        base_width=cfg["width_per_group"],
                        stride_in_1x1=cfg["version"] == "v1",
                        drop_path=cfg["drop_path_rate"] * block_index / max(num_blocks - 1, 1),
                        dropout=cfg["dropout"],
                    )
                )
                in_channels = out_channels
                block_index += 1
            name = f"layer{stage + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.stage_channels.append(in_channels)
        return in_channels

    def _make_shortcut(self, in_channels: int, out_channels: int, stride: int, option: str) -> nn.Module:
        if option == "A":
            return ZeroPadShortcut(in_channels=in_channels, out_channels=out_channels, stride=stride)
        return projection_shortcut(in_channels, out_channels, stride=stride, with_norm=not self.preact)

    def _init_weights(self, zero_init_residual: bool) -> None:
        if self.conv1.weight.is_meta:  # shapes only (model tables, summaries): no values to set, and meta
            return  # tensors' random init runs as slow Python (most of the time the 42-model table took)
        # He initialization (He et al. 2015, "Delving Deep into Rectifiers"), as torchvision.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for stage in self.stages():
                for block in stage:
                    zero_init_(block.last_norm_or_conv())

    def stages(self) -> list[nn.Sequential]:
        """The residual stages, ``layer1`` .. ``layerN``, in order."""
        return [getattr(self, name) for name in self.stage_names]

    # --- parts, for fine-tuning: freezing and per-part learning rates --------------------------------------
    @property
    def part_names(self) -> list[str]:
        """The model's parts from input to output: ``stem``, ``layer1`` .. ``layerN``, ``head`` (v2's last BN, fc)."""
        return ["stem", *self.stage_names, "head"]

    def part(self, name: str) -> list[nn.Module]:
        """The modules of the part ``name`` (one of ``part_names``)."""
        if name == "stem":
            return [self.conv1, self.bn1]
        if name == "head":
            return [m for m in (self.final_bn, self.fc) if m is not None]
        return [getattr(self, name)]

    def freeze(self, names: Sequence[str]) -> None:
        """Keep the parts ``names`` fixed and train the others: frozen parameters get no gradient (so no weight
        decay and no optimizer state), and their BatchNorm layers stay in inference mode whatever ``train()``
        says, so their running statistics never move (Keras' ``trainable=False``). ``freeze([])`` unfreezes."""
        unknown = [n for n in names if n not in self.part_names]
        if unknown:
            raise ValueError(f"no part {unknown[0]!r}: the parts are {', '.join(self.part_names)}")
        self.frozen = tuple(n for n in self.part_names if n in names)
        for name in self.part_names:
            for module in self.part(name):
                module.requires_grad_(name not in self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        for name in getattr(self, "frozen", ()):  # () in a ResNet pickled before parts could freeze
            for module in self.part(name):
                module.eval()
        return self

    def forward_stem(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, stem_width, H/4, W/4) (ImageNet stem) or (B, stem_width, H, W) (CIFAR)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature pyramid: each stage's output, e.g. strides 4, 8, 16, 32 for the ImageNet stem.

        (B, in_chans, H, W) -> [(B, stage_channels[i], H_i, W_i) for each stage]. In v2 these are the raw
        sums (not yet normalized): the final BN-ReLU belongs to ``forward_features``.
        """
        x = self.forward_stem(x)
        outputs = []
        for stage in self.stages():
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H/32, W/32): the last feature map, before pooling."""
        x = self.forward_stem(x)
        for stage in self.stages():
            x = stage(x)
        if self.final_bn is not None:
            x = torch.relu(self.final_bn(x))
        return x

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """(B, num_features, h, w) -> (B, num_classes), or the pooled (B, num_features) with pre_logits."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    @property
    def depth(self) -> int:
        """Weighted layers on the main path, as the papers count them (convs + fc: 6n+2, 9n+2, 50, ...)."""
        per_block = 3 if self.config["block"] == "bottleneck" else 2
        return per_block * sum(self.config["layers"]) + 2


def _check_args(
    *,
    block,
    layers,
    widths,
    stem,
    version,
    shortcut,
    residual,
    num_classes,
    in_chans,
    drop_path_rate,
    zero_init_residual,
    dropout,
    **_others,  # groups, width_per_group, stem_width: checked by the blocks and the stem that use them
) -> None:
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck', not {block!r}")
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {', '.join(VERSIONS)}, not {version!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, not {stem!r}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be 'A' (zero-padded identity) or 'B' (projection), not {shortcut!r}")
    if isinstance(layers, str) or not all(isinstance(n, int) for n in layers):
        raise ValueError(f"layers must be a list of positive integers, not {layers!r}")
    if isinstance(widths, str) or not all(isinstance(n, int) for n in widths):
        raise ValueError(f"widths must be a list of positive integers, not {widths!r}")
    if not isinstance(drop_path_rate, (int, float)):
        raise ValueError(f"drop_path_rate must be a number, not {drop_path_rate!r}")
    if len(layers) == 0 or len(layers) != len(widths) or min(layers) < 1:
        raise ValueError(f"layers {list(layers)} and widths {list(widths)} need one positive entry per stage")
    if num_classes < 1 or in_chans < 1:
        raise ValueError(f"num_classes ({num_classes}) and in_chans ({in_chans}) must be at least 1")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), not {drop_path_rate}")
    if zero_init_residual and not residual:
        raise ValueError("zero_init_residual would zero every layer of a plain network (it has no shortcuts)")
    if drop_path_rate > 0 and not residual:
        raise ValueError("drop_path_rate needs residual branches; a plain network has none")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), not {dropout!r}")
    if dropout and not (block == "basic" and version == "v2"):
        raise ValueError("dropout between convolutions is built for pre-activation basic blocks (version v2, basic)")
