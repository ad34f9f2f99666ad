"""Start a model from pretrained weights: read them from a file or torchvision's registry, adapt what must be
adapted (a classifier of another size, a stem of another channel count), refuse everything else by name.

Sources:
    - a file: a torchvision or timm state dict (``.pth``, ``.safetensors``), or a reslab checkpoint (``best.pt``,
      ``last.pt``), whose own preprocessing and architecture come with it;
    - ``"imagenet"``: torchvision's published weights for the same architecture, found through torchvision's
      weight registry in the torch hub cache (downloaded there by torchvision where allowed and online).

The failures users of other tools report, made impossible here: ``strict=False`` silently loading nothing,
``module.`` prefixes (stripped), a head of the wrong size (re-initialized, and said), the wrong mean and std for
the weights (they travel with them), and v1.5 weights in a v1 network (refused unless forced).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.models.weights import read_state_dict, read_weights_file, unwrap

# Input statistics of ImageNet (torchvision's weights): what a plain state dict file is assumed to expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD = ("fc.weight", "fc.bias")
STEM = "conv1.weight"
# What decides the network a weight file fits, beyond its tensors' shapes (num_classes and in_chans adapt).
ARCHITECTURE_KEYS = (
    "block", "layers", "widths", "stem", "version", "shortcut", "residual", "groups", "width_per_group",
)  # fmt: skip


@dataclass
class Pretrained:
    """Weights to start from: the tensors, where they came from, the input they expect, and (reslab checkpoints)
    the architecture that trained them."""

    state: dict[str, Tensor]
    origin: str  # for messages: "torchvision's resnet18 IMAGENET1K_V1 weights (~/.cache/...)"
    preprocessing: dict[str, Any] = field(default_factory=dict)  # mean, std, image_size, resize, interpolation
    model_config: dict[str, Any] | None = None  # a reslab checkpoint's ResNet arguments
    plain_state_dict: bool = False  # a file that says nothing of its network (torchvision, timm, a state dict)


def read_pretrained(source: str | Path, model_name: str, *, download: bool = False) -> Pretrained:
    """The weights ``source`` names for a model registered as ``model_name``: a file or ``"imagenet"``."""
    if str(source) == "imagenet":
        return _torchvision(model_name, download=download)
    path = Path(source)
    if not path.is_file():
        raise ReslabError(f"weights file not found: {path} (give a .pth, .safetensors or reslab .pt file, or imagenet)")
    stored = read_weights_file(path)  # read once: a torchvision file is 45 to 240 MB
    checkpoint = stored if _is_reslab_checkpoint(stored) else None
    if checkpoint is not None:
        info = checkpoint["dataset"]
        keys = ("mean", "std", "resize", "interpolation")
        preprocessing = {k: info[k] for k in keys if k in info} | {"image_size": info["image_size"][0]}
        return Pretrained(
            state=dict(checkpoint["model"]),
            origin=f"the reslab checkpoint {path} ({checkpoint['model_name']} on {info['name']})",
            preprocessing=preprocessing,
            model_config=checkpoint["model_config"],
        )
    preprocessing = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224, "resize": 256}
    state = stored if path.suffix == ".safetensors" else unwrap(stored, path)
    return Pretrained(state, f"{path}", preprocessing | {"interpolation": "bilinear"}, None, True)


def _is_reslab_checkpoint(obj: object) -> bool:
    """A reslab training checkpoint (``reslab.checkpoint.FORMAT``), which records its model and data."""
    return isinstance(obj, dict) and str(obj.get("format", "")).startswith("reslab-checkpoint")


def torchvision_names() -> list[str]:
    """reslab models for which torchvision publishes ImageNet weights (the same network, the same names)."""
    import torchvision

    from reslab.models.registry import list_models

    published = set(torchvision.models.list_models(module=torchvision.models))
    return [name for name in list_models() if name in published]


def _torchvision(model_name: str, *, download: bool) -> Pretrained:
    import torchvision

    names = torchvision_names()
    if model_name not in names:
        hint = ""
        if model_name.endswith("_v1") and model_name[: -len("_v1")] in names:
            hint = (
                f" (its weights would be {model_name[:-3]}'s, v1.5, whose stride sits on the 3x3 conv, not on the "
                "first 1x1: train that model, or give the file with --weights FILE --force-weights)"
            )
        raise ReslabError(
            f"torchvision publishes no ImageNet weights for {model_name}{hint}; it does for {', '.join(names)}"
        )
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        if not download:
            raise ReslabError(
                f"torchvision's {model_name} weights are not in the torch hub cache and downloading is off: "
                f"put {weights.url} at {cached}"
            )
        try:
            torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
        except Exception as err:  # offline, a proxy, a bad hash: say which file goes where
            raise ReslabError(
                f"could not download torchvision's {model_name} weights ({type(err).__name__}): "
                f"put {weights.url} at {cached}"
            ) from None
    transform = weights.transforms()
    preprocessing = {
        "mean": tuple(transform.mean),
        "std": tuple(transform.std),
        "image_size": transform.crop_size[0],
        "resize": transform.resize_size[0],
        "interpolation": transform.interpolation.value,
    }
    origin = f"torchvision's {model_name} {weights.name} weights ({cached})"
    # plain_state_dict: the file says nothing of its network; torchvision's are v1.5 (refused in a v1 model)
    return Pretrained(read_state_dict(cached), origin, preprocessing, None, plain_state_dict=True)


def load_pretrained(
    model: nn.Module, pretrained: Pretrained, *, force: bool = False, say: Callable[[str], None] = print
) -> None:
    """Load ``pretrained`` into ``model``, every step said through ``say``: a classifier of another size is
    re-initialized, a stem of another channel count adapted; every other tensor must load, or a ReslabError
    names the first that does not. Weights from another network whose tensors happen to fit are refused
    unless ``force``."""
    state, own = dict(pretrained.state), model.state_dict()
    for key in HEAD:
        if key in state and key in own and state[key].shape != own[key].shape:
            say(f"{key} re-initialized: {tuple(state[key].shape)} in the weights, {tuple(own[key].shape)} here")
            state[key] = own[key]
    if STEM in state and STEM in own and state[STEM].shape[1] != own[STEM].shape[1]:
        before, after = state[STEM].shape[1], own[STEM].shape[1]
        state[STEM] = adapt_input_channels(state[STEM], after)
        how = "summed over its input channels" if after == 1 else "cycled over the new channels and rescaled"
        say(f"{STEM} adapted from {before} to {after} input channel(s) ({how})")
    _check_fits(state, own, pretrained.origin)
    _check_architecture(model, pretrained, force)  # tensors that fit, from another network
    model.load_state_dict(state)
    say(f"loaded {len(state)} tensors from {pretrained.origin}")


def adapt_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A first convolution's weight (O, C, k, k) for ``channels`` inputs: with 1, the sum over C (a gray image
    repeated over C channels gives the same output); otherwise C's filters repeated cyclically and scaled by
    C / channels, so that the output's scale stays that of the original on images of equal channels."""
    source = weight.shape[1]
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(channels / source)
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (source / channels)


def _check_fits(state: dict[str, Tensor], own: dict[str, Tensor], origin: str) -> None:
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ReslabError(
            f"{origin} does not fit the model: {len(mismatched)} tensor(s) of another shape, first {k}: "
            f"{tuple(state[k].shape)} in the weights, {tuple(own[k].shape)} here (weights of another architecture?)"
        )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (first: {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (first: {unexpected[0]})"] if unexpected else []
        raise ReslabError(f"{origin} does not fit the model: keys {'; '.join(parts)} (another architecture?)")


def _check_architecture(model: nn.Module, pretrained: Pretrained, force: bool) -> None:
    config = getattr(model, "config", {})
    if pretrained.model_config is not None:
        differs = [k for k in ARCHITECTURE_KEYS if pretrained.model_config.get(k) != config.get(k)]
        why = ", ".join(f"{k} {pretrained.model_config.get(k)!r} there, {config.get(k)!r} here" for k in differs)
    elif pretrained.plain_state_dict and config.get("version") == "v1" and config.get("block") == "bottleneck":
        differs = ["version"]
        why = (
            "a plain state dict does not say its version, and torchvision's and timm's bottleneck ResNets are "
            "v1.5 (stride on the 3x3 conv), this model is v1 (stride on the first 1x1)"
        )
    else:
        return
    if differs and not force:
        raise ReslabError(
            f"{pretrained.origin} was trained as another network ({why}): its tensors may fit, its function "
            "would not; pass --force-weights (force=True) to load them anyway"
        )
