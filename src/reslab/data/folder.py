"""Image folders: a directory of class folders of JPEG/PNG images, read by torchvision's ImageFolder.

Layouts:
- ``root/{train,val,test}/<class>/*.png``: the given splits (``val`` and ``test`` optional; a missing
  ``val`` is carved from ``train`` with ``val_ratio``).
- ``root/<class>/*.png``: one pool, split into train / val / test (``val_ratio`` each for val and test,
  stratified and seeded).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from reslab.data.augment import ERASE_AREA
from reslab.data.types import DataBundle, DatasetInfo, Preprocessing, stratified_split
from reslab.data.verify import DEFAULT_MAX_IMAGE_PIXELS, BadImageError, check_images, read_image
from reslab.errors import ReslabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class BadSample:
    """What a dataset returns for a file that went bad after the check (deleted, truncated, replaced).

    Returned, not raised: an exception in a DataLoader worker reaches the user as a worker traceback that does
    not name the file. The loader's collate passes the marker on and the main process reports it on one line.
    """

    path: str
    reason: str


class TransformSubset(Dataset):
    """A subset of an ImageFolder with its own transform (train and val share files, not augmentation)."""

    def __init__(self, folder: ImageFolder, indices: list[int] | None, transform) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.folder)

    def __getitem__(self, i: int):
        """``(image (C, H, W) float, class index)``, or a ``BadSample`` when the file cannot be read."""
        path, target = self.folder.samples[self.indices[i] if self.indices is not None else i]
        try:
            return self.transform(self.folder.loader(path)), target
        except BadImageError as err:
            return BadSample(path, err.reason)
        except Exception as err:  # any other failure on this file: still name the file, not a worker traceback
            return BadSample(path, f"{type(err).__name__}: {err}")

    @property
    def targets(self) -> list[int]:
        idx = self.indices if self.indices is not None else range(len(self.folder))
        return [self.folder.targets[i] for i in idx]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


class ConvertMode:
    """Any PIL mode (L, RGB, RGBA, P, I;16, ...) -> "L" for one channel or "RGB" for three."""

    def __init__(self, in_chans: int) -> None:
        self.mode = "L" if in_chans == 1 else "RGB"

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float images: PIL's convert would clip to 255 (all white); scale to 8 bits instead.
            pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))  # a float TIFF may hold NaN: black
            top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
            image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).round().astype(np.uint8))
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # palette transparency is lost by a direct convert
        if image.mode in ("LAB", "La"):  # PIL converts these to L / RGB only through RGB / LA (TIFF can hold them)
            image = image.convert("RGB" if image.mode == "LAB" else "LA")
        return image.convert(self.mode)


def _image_folder(path: Path, max_pixels: int) -> ImageFolder:
    # read_image keeps every mode (ImageFolder's default loader converts to RGB first, clipping 16-bit images)
    # and refuses images above max_pixels as the check did; a partial pickles into loader workers.
    try:
        return ImageFolder(str(path), is_valid_file=_is_image, loader=partial(read_image, max_pixels=max_pixels))
    except (FileNotFoundError, RuntimeError) as err:
        raise ReslabError(f"{path}: not an image folder ({err}); expected class folders of JPEG/PNG images") from None


def _resized(image_size: int, resize: int, interpolation: str) -> list:
    """Resize the whole image to ``image_size``; or (``resize`` > 0) its shorter side to ``resize``, then crop."""
    mode = transforms.InterpolationMode(interpolation)
    if not resize:
        return [transforms.Resize((image_size, image_size), interpolation=mode)]
    return [transforms.Resize(resize, interpolation=mode), transforms.CenterCrop(image_size)]


def eval_transform(
    image_size: int, in_chans: int, mean, std, *, resize: int = 0, interpolation: str = "bilinear"
) -> transforms.Compose:
    """PIL image of any mode and size -> (in_chans, image_size, image_size) normalized float tensor."""
    steps = [ConvertMode(in_chans), *_resized(image_size, resize, interpolation)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])


def info_transform(info) -> transforms.Compose:
    """The evaluation transform a checkpoint's ``DatasetInfo`` records (what eval, predict and export apply)."""
    return eval_transform(
        info.image_size[0], info.channels, info.mean, info.std, resize=info.resize, interpolation=info.interpolation
    )


def train_transform(
    image_size: int,
    in_chans: int,
    mean,
    std,
    *,
    crop_padding: int,
    flip: bool,
    erase: float = 0.0,
    resize: int = 0,
    interpolation: str = "bilinear",
):
    """The training augmentation: random crop with padding and horizontal flip, then normalize, then random
    erasing with probability ``erase`` (torchvision's RandomErasing, filling with random values). With
    ``resize``, the shorter side is resized first and the crop is a random ``image_size`` square of it."""
    steps = [ConvertMode(in_chans)]
    if resize:
        mode = transforms.InterpolationMode(interpolation)
        steps += [transforms.Resize(resize, interpolation=mode), transforms.RandomCrop(image_size)]
    else:
        steps += _resized(image_size, 0, interpolation)
    if crop_padding:
        steps.append(transforms.RandomCrop(image_size, padding=crop_padding))
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if erase > 0:
        steps.append(transforms.RandomErasing(p=erase, scale=ERASE_AREA, ratio=(0.3, 1 / 0.3), value="random"))
    return transforms.Compose(steps)


def _estimate_stats(folder: ImageFolder, indices: list[int], image_size: int, in_chans: int, seed: int):
    """Per-channel mean / std from up to 500 training images (reading all of a large folder would be slow)."""
    g = torch.Generator().manual_seed(seed)
    pick = [indices[i] for i in torch.randperm(len(indices), generator=g)[:500].tolist()]
    to_tensor = eval_transform(image_size, in_chans, [0.0] * in_chans, [1.0] * in_chans)
    pixels = torch.stack([to_tensor(folder.loader(folder.samples[i][0])) for i in pick])
    x = pixels.transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def _bad_list(bad: dict[str, str], shown: int = 3) -> str:
    """The first ``shown`` bad files as ``path (reason); ...``, then how many more."""
    text = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:shown])
    return text + (f"; and {len(bad) - shown} more" if len(bad) > shown else "")


def _drop_bad_images(folders: list[ImageFolder], on_bad_image: str, max_pixels: int) -> list[tuple[str, str]]:
    """Check every file of ``folders``, then remove the bad ones from them ("skip") or raise ("fail").

    Returns the removed files as (path, reason). A class left without a good image is an error either way.
    """
    paths = [path for folder in folders for path, _ in folder.samples]
    bad = check_images(paths, max_pixels=max_pixels)
    if bad and on_bad_image == "fail":
        raise ReslabError(
            f"{len(bad)} of {len(paths)} images are bad: {_bad_list(bad)}. Fix or remove them, "
            "or pass --on-bad-image skip to train without them"
        )
    for folder in folders:
        before = folder.samples
        # ImageFolder keeps the same list as samples and imgs, and its labels as targets: all three change.
        folder.samples = [(path, target) for path, target in before if path not in bad]
        folder.imgs, folder.targets = folder.samples, [target for _, target in folder.samples]
        if not folder.samples:
            theirs = {path: bad[path] for path, _ in before}
            raise ReslabError(f"{folder.root}: no good image left, all {len(before)} are bad: {_bad_list(theirs)}")
        emptied = sorted(set(range(len(folder.classes))) - set(folder.targets))
        if emptied:
            theirs = {path: bad[path] for path, target in before if target == emptied[0]}
            raise ReslabError(
                f"{folder.root}: every image of class {folder.classes[emptied[0]]!r} is bad: {_bad_list(theirs)}. "
                "Fix or remove them, or remove the class folder"
            )
    return list(bad.items())


def _splits(folders: dict[str, ImageFolder], val_ratio: float, seed: int) -> tuple:
    """(train, val, test): each (folder, indices into it or None for all of it), or None when absent."""
    if "all" in folders:  # one pool of class folders: stratified train / val / test
        folder = folders["all"]
        labels = torch.tensor(folder.targets)
        rest, test_idx = stratified_split(labels, val_ratio, seed + 1)
        t, v = stratified_split(labels[rest], val_ratio / (1 - val_ratio), seed)
        return (folder, rest[t].tolist()), (folder, rest[v].tolist()), (folder, test_idx.tolist())
    train_folder = folders["train"]
    train = (train_folder, None)
    val = (folders["val"], None) if "val" in folders else None
    test = (folders["test"], None) if "test" in folders else None
    if val is None and val_ratio > 0:
        t, v = stratified_split(torch.tensor(train_folder.targets), val_ratio, seed)
        train, val = (train_folder, t.tolist()), (train_folder, v.tolist())
    return train, val, test


def load_image_folder(
    root,
    *,
    val_ratio: float,
    seed: int,
    image_size: int,
    in_chans: int,
    on_bad_image: str = "skip",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    preprocessing: Preprocessing | None = None,
) -> DataBundle:
    """Build train / val / test splits of an image folder (see the module docstring for layouts).

    ``preprocessing`` (pretrained weights'): their mean, std, size and resize replace the folder's own.

    Every image of every split folder is checked first (``verify.check_images``: in parallel, cached), so no
    bad file is met halfway through training. With ``on_bad_image="skip"`` bad files are left out before
    splitting (the splits depend only on the good files) and listed in ``bundle.bad_files`` as (path, reason);
    with ``"fail"`` a ReslabError names the first few. Images above ``max_image_pixels`` count as bad.
    """
    if on_bad_image not in ("skip", "fail"):
        raise ReslabError(f"--on-bad-image must be skip or fail, not {on_bad_image!r}")
    if root is None:
        raise ReslabError("imagefolder needs --data-dir pointing at a folder of class folders")
    root = Path(root)
    if not root.is_dir():
        raise ReslabError(f"image folder not found: {root}")
    if (root / "train").is_dir():
        folders = {
            name: _image_folder(root / name, max_image_pixels)
            for name in ("train", "val", "test")
            if (root / name).is_dir()
        }
        for other in folders.values():
            if other.classes != folders["train"].classes:
                raise ReslabError(f"{other.root} has classes {other.classes}, train has {folders['train'].classes}")
    else:
        if not 0.0 < val_ratio < 0.5:
            raise ReslabError(
                "a folder without train/ is split into train, val and test: --val-ratio must be in (0, 0.5)"
            )
        folders = {"all": _image_folder(root, max_image_pixels)}
    bad_files = _drop_bad_images(list(folders.values()), on_bad_image, max_image_pixels)
    train, val, test = _splits(folders, val_ratio, seed)
    train_folder = train[0]
    train_idx = train[1] if train[1] is not None else list(range(len(train_folder)))
    preprocessing = preprocessing or Preprocessing()
    if preprocessing.mean is None or preprocessing.std is None:
        mean, std = _estimate_stats(train_folder, train_idx, image_size, in_chans, seed)
    else:
        mean, std = preprocessing.mean, preprocessing.std
    info = DatasetInfo(
        name="imagefolder",
        classes=list(train_folder.classes),
        channels=in_chans,
        image_size=(image_size, image_size),
        mean=mean,
        std=std,
    )
    info = preprocessing.applied_to(info)
    evaluate = info_transform(info)

    def as_dataset(split):
        return None if split is None else TransformSubset(split[0], split[1], evaluate)

    # Every split starts with the evaluation transform; the training loader swaps in the augmentation.
    return DataBundle(
        info=info, train=as_dataset(train), val=as_dataset(val), test=as_dataset(test), bad_files=bad_files
    )


def whole_image_folder(
    root: str | Path, classes: list[str], *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> TransformSubset:
    """Every image of ``root/test`` (when it exists) or ``root``, for evaluating a trained model on it.

    Its classes must be the model's. The caller sets ``transform`` (the model's normalization). Every image
    is checked first: a score over "every image" cannot leave some out, so a bad one is an error here.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReslabError(f"image folder not found: {root}")
    folder = _image_folder(root / "test" if (root / "test").is_dir() else root, max_image_pixels)
    if folder.classes != classes:
        raise ReslabError(f"{folder.root} has classes {folder.classes}; the model was trained on {classes}")
    bad = check_images([path for path, _ in folder.samples], max_pixels=max_image_pixels)
    if bad:
        raise ReslabError(
            f"{len(bad)} of {len(folder.samples)} images in {folder.root} are bad: {_bad_list(bad)}. "
            "Fix or remove them to evaluate this folder"
        )
    return TransformSubset(folder, None, transform=None)
