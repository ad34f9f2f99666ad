"""One registry of named models: ``create_model(name, **overrides)`` and ``list_models(pattern)``.

Every entry is data: the arguments of ``ResNet`` that define the variant. Depths and widths come from
He et al. 2015 (Table 1 for ImageNet, Sec. 4.2 for CIFAR), He et al. 2016 (pre-activation), and
torchvision for ResNeXt / Wide ResNet.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.models.resnet import ResNet


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, a one-line description and the ``ResNet`` arguments that define it."""

    name: str
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    depth: int | None = None  # the depth its paper names it by, where that counts differently from ResNet.depth

    @property
    def family(self) -> str:
        return "cifar" if self.kwargs.get("stem") == "cifar" else "imagenet"


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, description: str, *, depth: int | None = None, **kwargs: Any) -> None:
    """Add a model to the registry (names are unique)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelSpec(name=name, description=description, kwargs=kwargs, depth=depth)


# --- ImageNet family (He et al. 2015, Table 1); v1.5 by default, as torchvision -----------------------------
IMAGENET_LAYERS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),  # He et al. 2016, Table 5
}
for _depth, (_block, _layers) in IMAGENET_LAYERS.items():
    register(f"resnet{_depth}", f"ResNet-{_depth}, ImageNet, v1.5", block=_block, layers=_layers)
    if _block == "bottleneck":
        register(
            f"resnet{_depth}_v1",
            f"ResNet-{_depth}, ImageNet, v1 (stride on the first 1x1)",
            block=_block,
            layers=_layers,
            version="v1",
        )
    register(
        f"preact_resnet{_depth}",
        f"Pre-activation ResNet-{_depth} (v2), ImageNet",
        block=_block,
        layers=_layers,
        version="v2",
    )
    register(
        f"plain_resnet{_depth}",
        f"Plain {_depth}-layer twin of ResNet-{_depth} (no shortcuts)",
        block=_block,
        layers=_layers,
        residual=False,
    )

# ResNeXt (Xie et al. 2017) and Wide ResNet-50/101 as torchvision defines them: wider grouped 3x3s.
register("resnext50_32x4d", "ResNeXt-50 32x4d", block="bottleneck", layers=(3, 4, 6, 3), groups=32, width_per_group=4)
register(
    "resnext101_32x8d", "ResNeXt-101 32x8d", block="bottleneck", layers=(3, 4, 23, 3), groups=32, width_per_group=8
)
register(
    "resnext101_64x4d", "ResNeXt-101 64x4d", block="bottleneck", layers=(3, 4, 23, 3), groups=64, width_per_group=4
)
register(
    "wide_resnet50_2",
    "Wide ResNet-50-2 (2x bottleneck width)",
    block="bottleneck",
    layers=(3, 4, 6, 3),
    width_per_group=128,
)
register(
    "wide_resnet101_2",
    "Wide ResNet-101-2 (2x bottleneck width)",
    block="bottleneck",
    layers=(3, 4, 23, 3),
    width_per_group=128,
)

# --- CIFAR family (He et al. 2015, Sec. 4.2): 6n+2 layers, 16/32/64 channels, option A shortcuts ----------
CIFAR = dict(widths=(16, 32, 64), stem="cifar", version="v1", num_classes=10)
for _n in (3, 5, 7, 9, 18, 200):
    _depth = 6 * _n + 2
    register(
        f"resnet{_depth}",
        f"ResNet-{_depth}, CIFAR (6n+2, n={_n}), shortcut A",
        block="basic",
        layers=(_n,) * 3,
        shortcut="A",
        **CIFAR,
    )
    register(
        f"plain{_depth}",
        f"Plain {_depth}-layer CIFAR twin of ResNet-{_depth} (no shortcuts)",
        block="basic",
        layers=(_n,) * 3,
        residual=False,
        **CIFAR,
    )

# Pre-activation CIFAR nets (He et al. 2016, Table 2): 110 with basic blocks; 164 and 1001 with bottlenecks
# (9n+2 layers, 64/128/256 output channels). Projection shortcuts where shapes change, as in the paper's code.
_PREACT_CIFAR = dict(CIFAR, version="v2", shortcut="B")
register("preact_resnet110", "Pre-activation ResNet-110 (v2), CIFAR", block="basic", layers=(18,) * 3, **_PREACT_CIFAR)
register(
    "preact_resnet164",
    "Pre-activation ResNet-164 (v2), CIFAR, bottleneck",
    block="bottleneck",
    layers=(18,) * 3,
    **_PREACT_CIFAR,
)
register(
    "preact_resnet1001",
    "Pre-activation ResNet-1001 (v2), CIFAR, bottleneck",
    block="bottleneck",
    layers=(111,) * 3,
    **_PREACT_CIFAR,
)


# Wide ResNets for small images (Zagoruyko and Komodakis 2016): pre-activation basic blocks ("wide basic"),
# depth 6n+4 (the paper's count: 6n convolutions in the stages, the stem, the classifier and two of the
# projection shortcuts; ``ResNet.depth`` counts 6n+2 for the same net), widths 16k, 32k, 64k after a
# 16-channel stem. Projections wherever the shape changes, the first stage included (16 -> 16k channels).
# ``dropout`` (the paper's 0.3) is an option: create_model("wrn28_10", dropout=0.3).
WIDE = dict(block="basic", stem="cifar", version="v2", shortcut="B", stem_width=16, num_classes=10)
for _depth, _k in ((16, 4), (16, 8), (28, 10), (40, 4)):
    _n = (_depth - 4) // 6
    register(
        f"wrn{_depth}_{_k}",
        f"Wide ResNet-{_depth}-{_k} (n={_n}, widths x{_k}), CIFAR",
        depth=_depth,
        layers=(_n,) * 3,
        widths=(16 * _k, 32 * _k, 64 * _k),
        **WIDE,
    )


def list_models(pattern: str | None = None) -> list[str]:
    """Names of registered models in registration order, filtered by a glob pattern like ``"*resnet5*"``."""
    names = list(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a ReslabError naming the closest names when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `reslab models` lists them all"
        raise ReslabError(f"unknown model {name!r}{hint}") from None


_RESNET_ARGS = set(inspect.signature(ResNet.__init__).parameters) - {"self"}


def create_model(
    name: str, *, weights: str | Path | None = None, force_weights: bool = False, **overrides: Any
) -> ResNet:
    """Build a registered model, e.g. ``create_model("resnet20", num_classes=100, in_chans=1)``.

    Args:
        name: a name from ``list_models()``.
        weights: start from these weights: a ``.pth`` / ``.safetensors`` state dict, a reslab checkpoint, or
            ``"imagenet"`` (torchvision's, from the torch hub cache). A classifier of another size than
            ``num_classes`` is re-initialized and a stem of another ``in_chans`` adapted (both printed); every
            other tensor must fit (``reslab.models.pretrained``).
        force_weights: load weights of another network whose tensors fit (v1.5 weights into a v1 model).
        **overrides: any ``ResNet`` argument (``num_classes``, ``in_chans``, ``version``, ``shortcut``,
            ``zero_init_residual``, ``drop_path_rate``, ...), replacing the registry's value.

    Returns:
        The model, with ``model.config`` (its full ``ResNet`` arguments) and ``model.name`` set.
    """
    spec = get_spec(name)
    unknown = sorted(set(overrides) - _RESNET_ARGS)
    if unknown:
        raise ReslabError(
            f"unknown model option(s) {', '.join(unknown)}; options are {', '.join(sorted(_RESNET_ARGS))}"
        )
    try:
        model = ResNet(**{**spec.kwargs, **overrides})
    except (ValueError, TypeError) as err:
        if isinstance(err, TypeError) and not overrides:
            raise  # the registry's own arguments: a bug, not a user's mistake
        raise ReslabError(f"{name}: {err}") from None  # e.g. layers="abc" or drop_path_rate="x" from a command line
    model.name = name
    if weights is not None:
        from reslab.models.pretrained import load_pretrained, read_pretrained

        load_pretrained(model, read_pretrained(weights, name), force=force_weights)
    return model
