"""What every data module shares: the split types, a dataset's description, and the stratified split.

Kept apart from ``datasets`` (finding and reading files) and ``folder`` (image folders) so that neither
imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reslab.errors import ReslabError


@dataclass
class TensorSplit:
    """A split held in memory: images (N, C, H, W) uint8 and labels (N,) int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.labels[index])


@dataclass
class DatasetInfo:
    """What a model and a prediction need to know about the data; saved in every checkpoint."""

    name: str
    classes: list[str]
    channels: int
    image_size: tuple[int, int]  # (H, W) the model is trained on
    mean: tuple[float, ...] = field(default=())  # per channel, of the training split, on the 0..1 scale
    std: tuple[float, ...] = field(default=())
    # Image files: resize the shorter side to this, then crop the centre to image_size (torchvision's weights are
    # evaluated so: 256 or 232 -> 224); 0 resizes the whole image to image_size.
    resize: int = 0
    interpolation: str = "bilinear"  # of that resize: bilinear | bicubic | nearest

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> DatasetInfo:
        """The info a checkpoint, a manifest or a JSON file saved as a dict (``dataclasses.asdict``; JSON and
        torch.save keep tuples as lists): the one place a saved DatasetInfo is rebuilt."""
        tuples = ("image_size", "mean", "std")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in saved.items()})


@dataclass
class DataBundle:
    """Train / validation / test splits of one dataset (test may be None) and its info."""

    info: DatasetInfo
    train: TensorSplit | torch.utils.data.Dataset
    val: TensorSplit | torch.utils.data.Dataset | None
    test: TensorSplit | torch.utils.data.Dataset | None
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # image folders: (path, reason) left out

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorSplit)


def stratified_split(labels: Tensor, val_ratio: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (train, val): ``val_ratio`` of each class goes to validation, chosen by ``seed``.

    Each class contributes ``round(n_c * val_ratio)`` samples, so class proportions are kept in both parts.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ReslabError(f"--val-ratio must be in [0, 1), not {val_ratio}")
    g = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_ratio)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def subset_of_train(bundle: DataBundle, count: int, seed: int):
    """``count`` images of ``bundle.train``, the same share of each class, chosen by ``seed`` (a smaller training
    set that a short run can fit; the validation and test splits are untouched)."""
    train = bundle.train
    labels = train.labels if isinstance(train, TensorSplit) else torch.tensor(train.targets)
    if count >= len(labels):
        raise ReslabError(f"train_subset must be below the training split's {len(labels)} images, not {count}")
    _, chosen = stratified_split(labels, count / len(labels), seed)
    if isinstance(train, TensorSplit):
        return train.subset(chosen)
    indices = [train.indices[i] if train.indices is not None else i for i in chosen.tolist()]
    return type(train)(train.folder, indices, train.transform)


@dataclass(frozen=True)
class Preprocessing:
    """How pretrained weights expect their input, to replace what a dataset would choose for itself: mean and std
    (0..1 scale), image size, the resize before the centre crop, its interpolation. ``None``: the dataset's own."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: int | None = None
    resize: int | None = None
    interpolation: str | None = None

    def applied_to(self, info: DatasetInfo) -> DatasetInfo:
        """``info`` with every field this sets replaced (the channel count decides how a mean is spread)."""
        import dataclasses

        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for key in ("mean", "std"):
            if key in changes:
                changes[key] = _per_channel(changes[key], info.channels, key)
        if "image_size" in changes:
            changes["image_size"] = (changes["image_size"], changes["image_size"])
        return dataclasses.replace(info, **changes)


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> tuple[float, ...]:
    """Statistics of other channels than the images': RGB's for a grayscale input become their average (the stem
    is adapted by a sum); other counts cycle over the channels, as the stem's filters do."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ReslabError(f"{name} needs a value per channel")
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(channels))
