"""Readers for the standard dataset file formats, verifying what they read.

- IDX (MNIST, Fashion-MNIST): big-endian header ``0 0 dtype ndim`` then ``ndim`` uint32 sizes, then data;
  gzipped or not (Debian's ``dataset-fashion-mnist`` ships ``.gz`` files).
- CIFAR-10/100 "python version": pickled dicts with ``data`` (N, 3072) uint8 rows in CHW order and
  ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). They are read with an unpickler that only builds
  plain containers and numpy arrays, so a tampered batch file cannot run code.

Every problem is a ReslabError that names the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from reslab.errors import ReslabError

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ReslabError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ReslabError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ReslabError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ReslabError(f"{path} holds {len(raw) - header} data bytes; its header {shape} says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an IDX image file and its label file."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ReslabError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise ReslabError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(images) != len(labels):
        raise ReslabError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    _check_labels(labels, num_classes, labels_path)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ReslabError(f"{path}: labels range {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")


class _DataOnlyUnpickler(pickle.Unpickler):
    """Builds only numpy arrays and builtins: what CIFAR batches contain, and nothing that runs code."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("builtins", "bytes"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR python batch file."""
    try:
        batch = _DataOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except OSError as err:
        raise ReslabError(f"cannot read {path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ReslabError(f"{path} is not a CIFAR python batch: {err}") from None
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise ReslabError(f"{path} is not a CIFAR python batch (needs 'data' and '{label_key}')")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ReslabError(f"{path}: 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if len(labels) != len(data):
        raise ReslabError(f"{path} has {len(data)} images but {len(labels)} labels")
    _check_labels(labels, num_classes, path)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def read_cifar_meta(path: Path, key: str) -> list[str]:
    """Class names from CIFAR's ``batches.meta`` (key ``label_names``) or ``meta`` (``fine_label_names``)."""
    try:
        meta = _DataOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
        return [str(n) for n in meta[key]]
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
        raise ReslabError(f"{path} is not a CIFAR meta file: {err}") from None
