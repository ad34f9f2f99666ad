"""Datasets by name, found on disk, verified, and split into train / validation / test.

Files are looked for, in order, under ``--data-dir``, ``$RESLAB_DATA``, and the system folder where Debian's
``dataset-fashion-mnist`` installs Fashion-MNIST (``/usr/share/datasets``); then, only if allowed, torchvision
downloads them. When nothing works, one ReslabError lists the places tried and the ways to fix it.

In-memory datasets (MNIST family, CIFAR, synthetic) are returned as uint8 tensors; image folders as
torchvision ``ImageFolder`` subsets, read by a DataLoader with workers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from reslab.data.formats import read_cifar_batch, read_cifar_meta, read_idx_pair
from reslab.data.types import DataBundle, DatasetInfo, Preprocessing, TensorSplit, stratified_split
from reslab.errors import ReslabError

SYSTEM_DATA_DIRS = (Path("/usr/share/datasets"),)  # Debian: dataset-fashion-mnist installs here
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _existing_folder(path: Path, given_as: str) -> Path:
    """``path``, or a ReslabError when it is missing or a file (``given_as``: how the user gave it)."""
    if path.is_file():
        raise ReslabError(f"{given_as} is a file, not a folder")
    if not path.is_dir():
        raise ReslabError(f"{given_as} does not exist")
    return path


def recorded_data_dir(data_dir: str | None) -> str | None:
    """A checkpoint's own ``data_dir`` while it still exists, else None (the usual search order then applies):
    a run's data moved since training must not turn ``eval`` or ``report`` into a missing-folder error."""
    return data_dir if data_dir and Path(data_dir).is_dir() else None


def search_roots(data_dir: str | Path | None) -> list[Path]:
    """Where dataset files are looked for, in order: ``data_dir``, ``$RESLAB_DATA``, the system folders.

    A given ``data_dir`` or a set ``$RESLAB_DATA`` must be an existing folder: a typo is an error, not a silent
    fall-through to the next place (which may hold another copy of the data, or start a download).
    """
    roots = []
    if data_dir:
        roots.append(_existing_folder(Path(data_dir), f"--data-dir {data_dir}"))
    if os.environ.get("RESLAB_DATA"):
        env = os.environ["RESLAB_DATA"]
        roots.append(_existing_folder(Path(env), f"RESLAB_DATA={env}"))
    roots.extend(SYSTEM_DATA_DIRS)
    return roots


def _find(roots: list[Path], subdirs: tuple[str, ...], required: list[str]) -> Path | None:
    """The first ``root/subdir`` holding every required file (each also accepted gzipped)."""
    for root in roots:
        for sub in subdirs:
            folder = root / sub if sub else root
            if all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in required):
                return folder
    return None


def _pick(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.is_file() else folder / f"{name}.gz"


def _not_found(name: str, roots: list[Path], looked_for: str, download_error: str | None) -> ReslabError:
    tried = ", ".join(str(r) for r in roots)
    extra = f"; download failed: {download_error}" if download_error else "; downloading is off"
    hint = " (or `apt-get install dataset-fashion-mnist`)" if name == "fashion-mnist" else ""
    return ReslabError(
        f"{name}: {looked_for} not found under {tried}{extra}. Pass --data-dir DIR or set RESLAB_DATA{hint}"
    )


def _download(torchvision_cls: Callable, roots: list[Path], allow: bool) -> str | None:
    """Let torchvision download into the first root (or ./data); returns an error message, None on success."""
    if not allow:
        return None
    target = roots[0] if roots and roots[0] not in SYSTEM_DATA_DIRS else Path("data")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network should fail in seconds, not hang
    try:
        for train in (True, False):
            torchvision_cls(root=str(target), train=train, download=True)
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _load_idx_dataset(
    name: str, tv_folder: str, classes: list[str], roots: list[Path], download: bool, torchvision_cls: Callable
):
    subdirs = ("", name, tv_folder, f"{tv_folder}/raw")
    required = [f for pair in IDX_FILES.values() for f in pair]
    folder = _find(roots, subdirs, required)
    download_error = None
    if folder is None:
        download_error = _download(torchvision_cls, roots, download)
        folder = _find([*roots, Path("data")], subdirs, required) if download else None
    if folder is None:
        raise _not_found(name, roots, "IDX files (train-images-idx3-ubyte[.gz], ...)", download_error)
    splits = {
        split: TensorSplit(*read_idx_pair(_pick(folder, img), _pick(folder, lab), len(classes)))
        for split, (img, lab) in IDX_FILES.items()
    }
    return classes, splits["train"], splits["test"]


def load_fashion_mnist(roots: list[Path], download: bool):
    import torchvision

    return _load_idx_dataset(
        "fashion-mnist", "FashionMNIST", FASHION_CLASSES, roots, download, torchvision.datasets.FashionMNIST
    )


def load_mnist(roots: list[Path], download: bool):
    import torchvision

    return _load_idx_dataset("mnist", "MNIST", [str(d) for d in range(10)], roots, download, torchvision.datasets.MNIST)


def _load_cifar(
    name: str,
    folder_name: str,
    train_files: list[str],
    test_file: str,
    meta: tuple[str, str],
    label_key: str,
    num_classes: int,
    roots: list[Path],
    download: bool,
    torchvision_cls: Callable,
):
    required = [*train_files, test_file, meta[0]]
    folder = _find(roots, (folder_name, ""), required)
    download_error = None
    if folder is None:
        download_error = _download(torchvision_cls, roots, download)
        folder = _find([*roots, Path("data")], (folder_name,), required) if download else None
    if folder is None:
        raise _not_found(name, roots, f"{folder_name}/ with {', '.join(required)}", download_error)
    classes = read_cifar_meta(folder / meta[0], meta[1])
    if len(classes) != num_classes:
        raise ReslabError(f"{folder / meta[0]} lists {len(classes)} classes, expected {num_classes}")
    parts = [read_cifar_batch(folder / f, label_key, num_classes) for f in train_files]
    train = TensorSplit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = TensorSplit(*read_cifar_batch(folder / test_file, label_key, num_classes))
    return classes, train, test


def load_cifar10(roots: list[Path], download: bool):
    import torchvision

    return _load_cifar(
        "cifar10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        ("batches.meta", "label_names"),
        "labels",
        10,
        roots,
        download,
        torchvision.datasets.CIFAR10,
    )


def load_cifar100(roots: list[Path], download: bool):
    import torchvision

    return _load_cifar(
        "cifar100",
        "cifar-100-python",
        ["train"],
        "test",
        ("meta", "fine_label_names"),
        "fine_labels",
        100,
        roots,
        download,
        torchvision.datasets.CIFAR100,
    )


def load_synthetic(num_train: int = 2048, num_test: int = 512, shape=(3, 32, 32), num_classes: int = 10):
    """Random images and labels, for benchmarks and smoke tests only: nothing here can be learned."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> TensorSplit:
        return TensorSplit(
            torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g),
            torch.randint(0, num_classes, (n,), generator=g),
        )

    return [f"class{i}" for i in range(num_classes)], make(num_train), make(num_test)


IN_MEMORY_LOADERS = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
DATASETS = (*IN_MEMORY_LOADERS, "imagefolder", "synthetic")


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the 0..1 scale."""
    x = images.float().div_(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def save_samples(
    split: TensorSplit, info: DatasetInfo, out_dir: str | Path, *, count: int = 8, seed: int = 0
) -> list[Path]:
    """Save ``count`` random images of an in-memory split as PNG files named ``<index>_<class>.png``."""
    from PIL import Image

    if not isinstance(split, TensorSplit):
        raise ReslabError("samples are saved from in-memory datasets (an image folder already is PNG/JPEG files)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in torch.randperm(len(split), generator=g)[:count].tolist():
        image = split.images[i].permute(1, 2, 0).squeeze(2).numpy()  # (H, W) or (H, W, 3)
        name = info.classes[int(split.labels[i])].replace("/", "-").replace(" ", "_")
        path = out / f"{i:05d}_{name}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    val_ratio: float = 0.2,
    seed: int = 0,
    download: bool = True,
    image_size: int | None = None,
    in_chans: int | None = None,
    on_bad_image: str = "skip",
    max_image_pixels: int = 89_478_485,
    preprocessing: Preprocessing | None = None,
) -> DataBundle:
    """Load ``name`` and split its training set into train / validation (stratified, seeded).

    Args:
        name: one of ``DATASETS``.
        data_dir: a folder to look in first (for ``imagefolder``: the folder itself).
        val_ratio: fraction of each class of the training set held out for validation.
        seed: chooses the validation samples.
        download: let torchvision download the files when they are nowhere on disk.
        image_size: ``imagefolder`` only: images are resized to this square size (default 224).
        in_chans: ``imagefolder`` only: 1 reads images as grayscale, 3 (default) as RGB.
        on_bad_image: ``imagefolder`` only: "skip" leaves unreadable images out (``bundle.bad_files``), "fail"
            stops with the first few.
        max_image_pixels: ``imagefolder`` only: larger images are bad (decompression bombs), refused unread.
        preprocessing: pretrained weights' input statistics and sizes, in place of the dataset's own (in memory,
            only mean and std apply: the images keep their size).
    """
    if name == "imagefolder":
        from reslab.data.folder import load_image_folder

        return load_image_folder(
            data_dir,
            val_ratio=val_ratio,
            seed=seed,
            image_size=image_size or (preprocessing and preprocessing.image_size) or 224,
            in_chans=in_chans or 3,
            on_bad_image=on_bad_image,
            max_image_pixels=max_image_pixels,
            preprocessing=preprocessing,
        )
    if name == "synthetic":
        classes, train, test = load_synthetic()
    elif name in IN_MEMORY_LOADERS:
        classes, train, test = IN_MEMORY_LOADERS[name](search_roots(data_dir), download)
    else:
        raise ReslabError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if val_ratio > 0:
        train_idx, val_idx = stratified_split(train.labels, val_ratio, seed)
        if len(val_idx) == 0:
            raise ReslabError(f"--val-ratio {val_ratio} leaves no validation image; use a larger one or 0")
        train, val = train.subset(train_idx), train.subset(val_idx)
    else:
        val = None
    mean, std = channel_stats(train.images)
    info = DatasetInfo(
        name=name,
        classes=classes,
        channels=train.images.shape[1],
        image_size=tuple(train.images.shape[2:]),
        mean=mean,
        std=std,
    )
    if preprocessing is not None:
        info = Preprocessing(mean=preprocessing.mean, std=preprocessing.std).applied_to(info)
    return DataBundle(info=info, train=train, val=val, test=test)
