"""Readers for the standard dataset file formats, verifying what they read.

- IDX (MNIST, Fashion-MNIST): big-endian header ``0 0 dtype ndim`` then ``ndim`` uint32 sizes, then data;
  gzipped or not (Debian's ``dataset-fashion-mnist`` ships ``.gz`` files).
- CIFAR-10/100 "python version": pickled dicts with ``data`` (N, 3072) uint8 rows in CHW order and
  ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). They are read with an unpickler that only builds
  plain containers and numpy arrays, so a tampered batch file cannot run code.

Every problem is a ReslabError that names the file, whatever the damage: a truncated download, a flipped bit,
a header that claims gigabytes (refused by comparing it with the file's size, before anything is allocated).
tests/data/test_properties.py checks this with random damage.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import ClassVar

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
# Deflate turns one compressed byte into at most 1032 (RFC 1951: a 258-byte match per 2-bit code). A gzipped
# IDX file whose header asks for more data than that is damaged; saying so beats allocating what it claims.
_GZIP_MAX_RATIO = 1032
_READ_CHUNK = 1 << 24  # bytes


def _read_upto(f, n: int) -> bytes:
    """At most ``n`` bytes from ``f``, read in chunks: never a buffer of ``n`` bytes before they are there."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_idx_stream(f, path: Path, max_data: int, *, gzipped: bool) -> np.ndarray:
    """Parse an open IDX stream whose data part cannot exceed ``max_data`` bytes."""
    magic = f.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise ReslabError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[magic[2]]), magic[3]
    sizes = f.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise ReslabError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", sizes)
    if ndim == 0 or 0 in shape:
        raise ReslabError(f"{path}: its header declares shape {shape}, which holds no data")
    expected = math.prod(shape) * dtype.itemsize  # Python ints: 2**32-sized dimensions cannot overflow
    if expected > max_data:
        raise ReslabError(f"{path}: its header {shape} says {expected} data bytes, more than the file can hold")
    # A plain file's size bounds ``expected`` exactly; a gzip stream's only loosely, so it is read in chunks.
    data = _read_upto(f, expected) if gzipped else f.read(expected)
    if len(data) < expected:
        raise ReslabError(f"{path} holds {len(data)} data bytes; its header {shape} says {expected}")
    if f.read(1):  # for gzip this also reads to the end, where the CRC is checked
        raise ReslabError(f"{path} holds more than the {expected} data bytes its header {shape} says")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape."""
    try:
        size = path.stat().st_size
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return _read_idx_stream(f, path, _GZIP_MAX_RATIO * size, gzipped=True)
        with open(path, "rb") as f:
            return _read_idx_stream(f, path, size, gzipped=False)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ReslabError(f"cannot read {path}: {err}") from None


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 from an IDX image file and its label file."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ReslabError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ReslabError(f"{labels_path}: expected integer labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ReslabError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    _check_labels(labels, num_classes, labels_path)
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ReslabError(f"{path}: labels range {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode``, as Python 3 pickles bytes in protocol 2; only the latin-1 codec it uses."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _empty_bytes(*args) -> bytes:
    """``bytes()``, as Python 3 pickles ``b""`` in protocol 2; ``bytes(n)`` would allocate n bytes."""
    if args:
        raise pickle.UnpicklingError("refusing bytes() with arguments")
    return b""


class _DataOnlyUnpickler(pickle._Unpickler):
    """Builds only numpy arrays and builtins: what CIFAR batches contain, and nothing that runs code.

    It is the pure-Python unpickler, whose memo is a dict: the C one sizes its memo table by the largest
    index it reads, so one flipped bit in a 4-byte index (LONG_BINPUT) makes it allocate and zero up to
    32 GiB. BYTEARRAY8 (protocol 5, never in CIFAR files) is left out: it allocates its declared length.
    """

    dispatch: ClassVar[dict] = {op: f for op, f in pickle._Unpickler.dispatch.items() if op != pickle.BYTEARRAY8[0]}
    _NUMPY: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )
    _BUILTINS: ClassVar[dict] = {
        ("_codecs", "encode"): _latin1_bytes,
        ("builtins", "bytes"): _empty_bytes,
        ("__builtin__", "bytes"): _empty_bytes,  # the name Python 3 writes in protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._BUILTINS:
            return self._BUILTINS[module, name]
        if (module, name) in self._NUMPY:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


# What a damaged pickle raises on the way (a flipped opcode, length, memo index, codec name or numpy argument):
# none of these can come from anything but the file's bytes.
_UNPICKLING_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,  # UnicodeDecodeError, numpy's shape and dtype checks, unknown protocol or extension code
    TypeError,
    AttributeError,
    KeyError,  # an unknown opcode
    IndexError,  # an empty stack or mark
    LookupError,
    struct.error,
    OverflowError,
    MemoryError,
    RecursionError,
)


def _unpickle_dict(path: Path, what: str) -> tuple[dict, int]:
    """The dict pickled in ``path`` (bytes keys decoded: files re-pickled by Python 3 have them), and its size."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ReslabError(f"cannot read {path}: {err}") from None
    try:
        loaded = _DataOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _UNPICKLING_ERRORS as err:
        raise ReslabError(f"{path} is not a {what}: {type(err).__name__}: {err}") from None
    if not isinstance(loaded, dict):
        raise ReslabError(f"{path} is not a {what} (it holds a {type(loaded).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in loaded.items()}, len(raw)


def _labels_array(labels, path: Path) -> np.ndarray:
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise ReslabError(f"{path}: its labels are not a list of integers ({err})") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ReslabError(f"{path}: its labels should be N integers, got {labels.dtype} {labels.shape}")
    return labels


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR python batch file."""
    batch, file_size = _unpickle_dict(path, "CIFAR python batch")
    if "data" not in batch or label_key not in batch:
        raise ReslabError(f"{path} is not a CIFAR python batch (needs 'data' and '{label_key}')")
    data, labels = batch["data"], batch[label_key]
    for value in (data, labels):
        # An array the file claims but does not hold (a crafted shape or strides): refused before it is copied.
        if isinstance(value, np.ndarray) and value.nbytes > file_size:
            raise ReslabError(f"{path}: an array of {value.nbytes} bytes cannot come from a {file_size}-byte file")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        kind = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ReslabError(f"{path}: 'data' should be uint8 (N, 3072), got {kind}")
    if len(data) == 0:
        raise ReslabError(f"{path} holds no images")
    labels = _labels_array(labels, path)
    if len(labels) != len(data):
        raise ReslabError(f"{path} has {len(data)} images but {len(labels)} labels")
    _check_labels(labels, num_classes, path)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def read_cifar_meta(path: Path, key: str) -> list[str]:
    """Class names from CIFAR's ``batches.meta`` (key ``label_names``) or ``meta`` (``fine_label_names``)."""
    meta, _ = _unpickle_dict(path, "CIFAR meta file")
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (str, bytes)) for n in names):
        raise ReslabError(f"{path} is not a CIFAR meta file (needs '{key}', a list of class names)")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
