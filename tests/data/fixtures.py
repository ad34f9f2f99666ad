"""Write small datasets in their real file formats: IDX (gzipped or not), CIFAR python batches, image folders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def learnable_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """Images a small net tells apart after crops and flips: class c has horizontal stripes c + 1 rows wide.

    Returns (N, C, size, size) uint8 with noise.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 70, size=(len(labels), channels, size, size), dtype=np.uint8)
    rows = np.arange(size)
    for i, c in enumerate(labels):
        bright = (rows // (int(c) + 1)) % 2 == 0
        images[i, :, bright, :] += 160
    return images


def write_mnist_like(
    root: Path,
    *,
    n_train: int = 200,
    n_test: int = 50,
    classes: int = 10,
    gz: bool = True,
    size: int = 28,
    seed: int = 0,
) -> Path:
    """The four IDX files of MNIST / Fashion-MNIST with learnable content."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % classes).astype(np.uint8)
        rng.shuffle(labels)
        images = learnable_images(labels, size, 1, seed + n)[:, 0]
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz=gz)
    return root


def write_cifar10(root: Path, *, per_batch: int = 20, n_test: int = 20, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, pickled as the real files are."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for i, (name, n) in enumerate([(f"data_batch_{b}", per_batch) for b in range(1, 6)] + [("test_batch", n_test)]):
        labels = (np.arange(n) % 10).astype(np.int64)
        data = learnable_images(labels, 32, 3, seed + i).reshape(n, -1)
        batch = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": data,
            "filenames": [f"img_{k}.png" for k in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_cifar100(root: Path, *, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = (np.arange(n) % 100).astype(np.int64)
        batch = {
            "filenames": [f"{k}.png" for k in range(n)],
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": learnable_images(fine % 10, 32, 3, seed).reshape(n, -1),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        "fine_label_names": [f"class{i}" for i in range(100)],
        "coarse_label_names": [f"super{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_image_folder(
    root: Path,
    *,
    classes=("cat", "dog", "fish"),
    per_class: int = 12,
    size: int = 20,
    split_dirs: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """Class folders of PNG and JPEG images of assorted sizes and modes (RGB, L, RGBA, P)."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA", "P"]
    for split in split_dirs or ("",):
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                s = size + int(rng.integers(0, 8))
                arr = rng.integers(0, 70, size=(s, s, 3), dtype=np.uint8)
                arr[(np.arange(s) // (c + 1)) % 2 == 0] += 160
                image = Image.fromarray(arr).convert(modes[k % len(modes)])
                ext = "jpg" if image.mode in ("RGB", "L") and k % 2 else "png"
                image.save(folder / f"{k}.{ext}")
    return root
