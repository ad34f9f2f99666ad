"""Image folders: a directory of class folders of JPEG/PNG images, read by torchvision's ImageFolder.

Layouts:
- ``root/{train,val,test}/<class>/*.png``: the given splits (``val`` and ``test`` optional; a missing
  ``val`` is carved from ``train`` with ``val_ratio``).
- ``root/<class>/*.png``: one pool, split into train / val / test (``val_ratio`` each for val and test,
  stratified and seeded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from reslab.data.types import DataBundle, DatasetInfo, stratified_split
from reslab.errors import ReslabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class TransformSubset(Dataset):
    """A subset of an ImageFolder with its own transform (train and val share files, not augmentation)."""

    def __init__(self, folder: ImageFolder, indices: list[int] | None, transform) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.folder)

    def __getitem__(self, i: int):
        path, target = self.folder.samples[self.indices[i] if self.indices is not None else i]
        return self.transform(self.folder.loader(path)), target

    @property
    def targets(self) -> list[int]:
        idx = self.indices if self.indices is not None else range(len(self.folder))
        return [self.folder.targets[i] for i in idx]


def _open_image(path: str) -> Image.Image:
    """Open an image as it is (ImageFolder's default loader converts to RGB first, clipping 16-bit images)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
        return image


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


class ConvertMode:
    """Any PIL mode (L, RGB, RGBA, P, I;16, ...) -> "L" for one channel or "RGB" for three."""

    def __init__(self, in_chans: int) -> None:
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float images: PIL's convert would clip to 255 (all white); scale to 8 bits instead.
            pixels = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
            image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).round().astype(np.uint8))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # palette transparency is lost by a direct convert
        return image.convert(self.mode)


def _image_folder(path: Path) -> ImageFolder:
    try:
        return ImageFolder(str(path), is_valid_file=_is_image, loader=_open_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise ReslabError(f"{path}: not an image folder ({err}); expected class folders of JPEG/PNG images") from None


def eval_transform(image_size: int, in_chans: int, mean, std) -> transforms.Compose:
    """PIL image of any mode and size -> (in_chans, image_size, image_size) normalized float tensor."""
    return transforms.Compose(
        [
            ConvertMode(in_chans),
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_transform(image_size: int, in_chans: int, mean, std, *, crop_padding: int, flip: bool):
    """The training augmentation: random crop with padding and horizontal flip, then normalize."""
    steps = [
        ConvertMode(in_chans),
        transforms.Resize((image_size, image_size)),
    ]
    if crop_padding:
        steps.append(transforms.RandomCrop(image_size, padding=crop_padding))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def _estimate_stats(folder: ImageFolder, indices: list[int], image_size: int, in_chans: int, seed: int):
    """Per-channel mean / std from up to 500 training images (reading all of a large folder would be slow)."""
    g = torch.Generator().manual_seed(seed)
    pick = [indices[i] for i in torch.randperm(len(indices), generator=g)[:500].tolist()]
    to_tensor = eval_transform(image_size, in_chans, [0.0] * in_chans, [1.0] * in_chans)
    pixels = torch.stack([to_tensor(folder.loader(folder.samples[i][0])) for i in pick])
    x = pixels.transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def load_image_folder(root, *, val_ratio: float, seed: int, image_size: int, in_chans: int) -> DataBundle:
    """Build train / val / test splits of an image folder (see the module docstring for layouts)."""
    if root is None:
        raise ReslabError("imagefolder needs --data-dir pointing at a folder of class folders")
    root = Path(root)
    if not root.is_dir():
        raise ReslabError(f"image folder not found: {root}")
    # Each split is (folder, indices into it or None for all of it), or None when absent.
    if (root / "train").is_dir():
        train_folder = _image_folder(root / "train")
        train = (train_folder, None)
        val = (_image_folder(root / "val"), None) if (root / "val").is_dir() else None
        test = (_image_folder(root / "test"), None) if (root / "test").is_dir() else None
        for other in (val, test):
            if other is not None and other[0].classes != train_folder.classes:
                raise ReslabError(f"{other[0].root} has classes {other[0].classes}, train has {train_folder.classes}")
        if val is None and val_ratio > 0:
            t, v = stratified_split(torch.tensor(train_folder.targets), val_ratio, seed)
            train, val = (train_folder, t.tolist()), (train_folder, v.tolist())
    else:
        if not 0.0 < val_ratio < 0.5:
            raise ReslabError(
                "a folder without train/ is split into train, val and test: --val-ratio must be in (0, 0.5)"
            )
        train_folder = _image_folder(root)
        labels = torch.tensor(train_folder.targets)
        rest, test_idx = stratified_split(labels, val_ratio, seed + 1)
        t, v = stratified_split(labels[rest], val_ratio / (1 - val_ratio), seed)
        train = (train_folder, rest[t].tolist())
        val, test = (train_folder, rest[v].tolist()), (train_folder, test_idx.tolist())
    train_idx = train[1] if train[1] is not None else list(range(len(train_folder)))
    mean, std = _estimate_stats(train_folder, train_idx, image_size, in_chans, seed)
    info = DatasetInfo(
        name="imagefolder",
        classes=list(train_folder.classes),
        channels=in_chans,
        image_size=(image_size, image_size),
        mean=mean,
        std=std,
    )
    evaluate = eval_transform(image_size, in_chans, mean, std)

    def as_dataset(split):
        return None if split is None else TransformSubset(split[0], split[1], evaluate)

    # Every split starts with the evaluation transform; the training loader swaps in the augmentation.
    return DataBundle(info=info, train=as_dataset(train), val=as_dataset(val), test=as_dataset(test))


def whole_image_folder(root: str | Path, classes: list[str]) -> TransformSubset:
    """Every image of ``root/test`` (when it exists) or ``root``, for evaluating a trained model on it.

    Its classes must be the model's. The caller sets ``transform`` (the model's normalization).
    """
    root = Path(root)
    if not root.is_dir():
        raise ReslabError(f"image folder not found: {root}")
    folder = _image_folder(root / "test" if (root / "test").is_dir() else root)
    if folder.classes != classes:
        raise ReslabError(f"{folder.root} has classes {folder.classes}; the model was trained on {classes}")
    return TransformSubset(folder, None, transform=None)
