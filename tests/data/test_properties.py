"""Property tests (issue 8): a damaged dataset file gives a ReslabError naming it, or a valid result, never
another exception; any image size and mode reaches the model as a (C, S, S) float32 tensor in range.

Damage is drawn by hypothesis: truncation, bit flips (half of them aimed at headers, pickle opcodes and length
fields, where one flipped bit changes how the rest is read), a span overwritten with random bytes, or random
bytes alone. Every read also runs under tracemalloc: a header that claims gigabytes must be refused by its size,
not by trying to allocate them. Examples are derandomized so CI sees the same ones every run.
"""

from __future__ import annotations

import gzip
import io
import itertools
import pickle
import pickletools
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from reslab import ReslabError
from reslab.cli import main
from reslab.data.datasets import SYSTEM_DATA_DIRS, search_roots
from reslab.data.folder import eval_transform, train_transform
from reslab.data.formats import read_cifar_batch, read_cifar_meta, read_idx, read_idx_pair
from reslab.data.verify import read_image

PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
MEMORY_LIMIT = 64 * 2**20  # bytes; the files here are at most ~1 MB, so any read needing more is trusting a header


def _flip(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def damaged(draw, valid: bytes, hot: list[int]) -> bytes:
    """``valid`` damaged one way; ``hot`` lists byte positions where a flip changes the file's structure."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "random"]))
    if kind == "truncate":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flip":
        any_bit = st.integers(0, 8 * len(valid) - 1)
        hot_bit = st.tuples(st.sampled_from(hot), st.integers(0, 7)).map(lambda p: 8 * p[0] + p[1])
        return _flip(valid, draw(st.lists(st.one_of(hot_bit, any_bit), min_size=1, max_size=6)))
    if kind == "overwrite":
        start = draw(st.one_of(st.sampled_from(hot), st.integers(0, len(valid) - 1)))
        return valid[:start] + draw(st.binary(min_size=1, max_size=16)) + valid[start + 16 :]
    return draw(st.binary(max_size=300))


def _within_memory(read, *args):
    """``read(*args)``, failing the test when it allocated more than MEMORY_LIMIT on the way."""
    tracemalloc.start()
    try:
        return read(*args)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_LIMIT, f"reading allocated {peak / 2**20:.0f} MiB"


def _error_names(err: ReslabError, *paths: Path) -> None:
    assert any(p.name in str(err) for p in paths), f"{err} names none of {[p.name for p in paths]}"


# --- IDX (MNIST, Fashion-MNIST) -----------------------------------------------------------------------------


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


IDX_IMAGES = _idx(np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8))
IDX_LABELS = _idx(np.array([0, 9, 3, 3, 7], dtype=np.uint8))


def _write(path: Path, data: bytes, *, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _check_idx_pair(images_path: Path, labels_path: Path, num_classes: int = 10) -> None:
    try:
        images, labels = _within_memory(read_idx_pair, images_path, labels_path, num_classes)
    except ReslabError as err:
        _error_names(err, images_path, labels_path)
        return
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 1
    assert images.shape[0] > 0 and images.shape[2] > 0 and images.shape[3] > 0
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert int(labels.min()) >= 0 and int(labels.max()) < num_classes


@settings(PROPERTY, max_examples=250)
@given(
    images=damaged(IDX_IMAGES, list(range(16))),
    labels=damaged(IDX_LABELS, list(range(8))),
    which=st.sampled_from(["images", "labels", "both"]),
    gz=st.booleans(),
)
def test_damaged_idx_pair_gives_an_error_or_valid_tensors(tmp_path, images, labels, which, gz):
    images = images if which != "labels" else IDX_IMAGES
    labels = labels if which != "images" else IDX_LABELS
    _check_idx_pair(
        _write(tmp_path / "train-images-idx3-ubyte", images, gz=gz),
        _write(tmp_path / "train-labels-idx1-ubyte", labels, gz=gz),
    )


@settings(PROPERTY, max_examples=150)
@given(gz_bytes=damaged(gzip.compress(IDX_IMAGES, mtime=0), list(range(24))))
def test_damaged_gzip_layer_gives_an_error_or_valid_tensors(tmp_path, gz_bytes):
    (tmp_path / "i.gz").write_bytes(gz_bytes)
    _check_idx_pair(tmp_path / "i.gz", _write(tmp_path / "l", IDX_LABELS, gz=False))


@settings(PROPERTY, max_examples=200)
@given(
    code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]),
    shape=st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1), st.just(2**32 - 1)), max_size=5),
    data=st.binary(max_size=64),
    gz=st.booleans(),
)
@example(code=0x08, shape=[2**32 - 1], data=b"", gz=False)  # 4 GiB claimed by a 8-byte file
@example(code=0x08, shape=[2**32 - 1], data=b"", gz=True)
@example(code=0x08, shape=[65536, 65536, 65536, 65536], data=b"", gz=False)  # 2**64 items: wraps to 0 in int64
@example(code=0x0D, shape=[2], data=b"\x7f\xc0\x00\x00" * 2, gz=False)  # NaN labels
@example(code=0x08, shape=[], data=b"\x01", gz=False)  # no dimensions: a scalar
def test_any_idx_header_gives_an_error_or_the_declared_array(tmp_path, code, shape, data, gz):
    raw = bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data
    path = _write(tmp_path / "x-idx", raw, gz=gz)
    try:
        array = _within_memory(read_idx, path)
    except ReslabError as err:
        _error_names(err, path)
    else:
        assert tuple(array.shape) == tuple(shape) and array.nbytes == len(data)
    _check_idx_pair(_write(tmp_path / "i-idx", IDX_IMAGES, gz=False), path)


# --- CIFAR python batches -----------------------------------------------------------------------------------


def _cifar_batch(n: int, *, bytes_keys: bool) -> bytes:
    """A batch pickled as the real files are (protocol 2), keys as str (Python 2 files) or bytes (re-pickled)."""
    rng = np.random.default_rng(n)
    batch = {
        "batch_label": "training batch 1 of 5",
        "labels": rng.integers(0, 10, n).tolist(),
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [f"img_{k}.png" for k in range(n)],
    }
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    return pickle.dumps(batch, protocol=2)


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the real CIFAR files: str keys (SHORT_BINSTRING), pixels as BINSTRING.

    Python 3 cannot write these opcodes, so they are spelled out here.
    """

    def short(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    dtype = b"cnumpy\ndtype\nq\x04" + short(b"u1") + b"K\x00K\x01\x87Rq\x05(K\x03" + short(b"|")
    dtype += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85" + short(b"b")
    array += b"\x87Rq\x03(K\x01M" + struct.pack("<H", len(data)) + b"M\x00\x0c\x86" + dtype
    array += b"\x89T" + struct.pack("<I", data.nbytes) + data.tobytes() + b"tb"
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}q\x00(" + short(b"data") + array + short(b"labels") + label_list + b"u."


PY2_PIXELS = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)


def _pickle_structure(raw: bytes) -> list[int]:
    """Positions of every opcode and argument, except inside long strings (the pixels): where flips matter."""
    ops = [pos for _, _, pos in pickletools.genops(raw)] + [len(raw)]
    return [p for start, end in itertools.pairwise(ops) for p in range(start, min(end, start + 8))]


# 300 images: enough memoized file names that the pickle uses 4-byte memo indices (LONG_BINPUT).
CIFAR_BATCHES = [
    _cifar_batch(300, bytes_keys=False),
    _cifar_batch(3, bytes_keys=True),
    _python2_batch(PY2_PIXELS, [4, 0, 9]),
]
CIFAR_META = pickle.dumps({"num_cases_per_batch": 3, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, 2)


@settings(PROPERTY, max_examples=120)
@given(data=st.data(), which=st.sampled_from(range(len(CIFAR_BATCHES))))
def test_damaged_cifar_batch_gives_an_error_or_valid_tensors(tmp_path, data, which):
    valid = CIFAR_BATCHES[which]
    path = tmp_path / "data_batch_1"
    path.write_bytes(data.draw(damaged(valid, _pickle_structure(valid))))
    try:
        images, labels = _within_memory(read_cifar_batch, path, "labels", 10)
    except ReslabError as err:
        _error_names(err, path)
        return
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and len(images) > 0
    assert labels.dtype == torch.int64 and labels.shape == (len(images),)
    assert int(labels.min()) >= 0 and int(labels.max()) < 10


@settings(PROPERTY, max_examples=150)
@given(meta=damaged(CIFAR_META, _pickle_structure(CIFAR_META)))
def test_damaged_cifar_meta_gives_an_error_or_class_names(tmp_path, meta):
    path = tmp_path / "batches.meta"
    path.write_bytes(meta)
    try:
        names = _within_memory(read_cifar_meta, path, "label_names")
    except ReslabError as err:
        _error_names(err, path)
        return
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)


def test_every_cifar_batch_flavour_reads_exactly(tmp_path):
    keys = [("data", "labels"), (b"data", b"labels"), ("data", "labels")]
    for raw, (data_key, labels_key) in zip(CIFAR_BATCHES, keys, strict=True):
        (tmp_path / "b").write_bytes(raw)
        images, labels = read_cifar_batch(tmp_path / "b", "labels", 10)
        original = pickle.loads(raw, encoding="latin1")
        assert torch.equal(images.flatten(1), torch.from_numpy(original[data_key]))
        assert labels.tolist() == list(original[labels_key])
    assert torch.equal(images.flatten(1), torch.from_numpy(PY2_PIXELS))  # the Python 2 file, last


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x02]r" + (2**24).to_bytes(4, "little") + b".",  # one list stored at memo index 16 M
        b"\x80\x05\x96" + (2**30).to_bytes(8, "little") + b".",  # BYTEARRAY8 of 1 GiB
        b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.",  # bytes(2**30)
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00matin1\x86R.",  # a codec flipped
        b"\x80\x02X\x01\x00\x00\x00\xff.",  # not UTF-8
        b"\x80\x02\x82\x04.",  # an unregistered extension code
        b"\x80\x02c__builtin__\nbytearray\n",  # a class outside the allow-list
        b"\x80\x02}q\x00(X\x04\x00\x00\x00dataq\x01K\x00u.",  # data is an int
        b"\x80\x02}q\x00X\x0b\x00\x00\x00label_namesq\x01K\x00s.",  # class names are an int
    ],
)
@pytest.mark.parametrize(
    "read",
    [lambda p: read_cifar_batch(p, "labels", 10), lambda p: read_cifar_meta(p, "label_names")],
    ids=["batch", "meta"],
)
def test_crafted_cifar_pickles_are_refused_cheaply(tmp_path, raw, read):
    # The C unpickler sizes its memo table by the largest index: 2**24 costs 256 MiB, 2**31 costs 32 GiB.
    (tmp_path / "test_batch").write_bytes(raw)
    with pytest.raises(ReslabError, match="test_batch"):
        _within_memory(read, tmp_path / "test_batch")


# --- images -------------------------------------------------------------------------------------------------

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "WEBP": "webp"}
MODES = ["1", "L", "P", "P+transparency", "RGB", "RGBA", "LA", "PA", "I;16", "I;16B", "I", "F", "CMYK", "YCbCr", "LAB"]
BYTES_PER_PIXEL = {"I;16": 2, "I;16B": 2, "I": 4, "F": 4}


def _make_image(mode: str, width: int, height: int, seed: int | None, fill: int) -> Image.Image:
    """An image of ``mode`` with random bytes as pixels (``seed``) or every byte ``fill`` (extremes: NaN, 65535)."""
    pil_mode = mode.split("+")[0]
    if pil_mode == "1":
        size = (width + 7) // 8 * height
    else:
        size = width * height * BYTES_PER_PIXEL.get(pil_mode, len(Image.new(pil_mode, (1, 1)).getbands()))
    raw = np.random.default_rng(seed).bytes(size) if seed is not None else bytes([fill]) * size
    image = Image.frombytes(pil_mode, (width, height), raw)
    if mode == "P+transparency":
        image.info["transparency"] = raw[0]
    return image


def _savable(mode: str, fmt: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _make_image(mode, 3, 2, 0, 0).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


SAVABLE = [(mode, fmt) for mode in MODES for fmt in IMAGE_FORMATS if _savable(mode, fmt)]


def _check_pixels(x: torch.Tensor, in_chans: int, image_size: int, low: float, high: float) -> None:
    assert x.dtype == torch.float32 and tuple(x.shape) == (in_chans, image_size, image_size)
    assert torch.isfinite(x).all() and low - 1e-5 <= float(x.min()) and float(x.max()) <= high + 1e-5


@settings(PROPERTY, max_examples=200)
@given(
    mode_format=st.sampled_from(SAVABLE),
    width=st.one_of(st.integers(1, 64), st.just(1)),
    height=st.one_of(st.integers(1, 64), st.just(1)),
    seed=st.one_of(st.integers(0, 2**32 - 1), st.none()),
    fill=st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]),
    in_chans=st.sampled_from([1, 3]),
    image_size=st.sampled_from([1, 7, 32]),
    normalized=st.booleans(),
    crop_padding=st.sampled_from([0, 4]),
)
def test_any_image_reaches_the_model_in_shape_and_range(
    tmp_path, mode_format, width, height, seed, fill, in_chans, image_size, normalized, crop_padding
):
    mode, fmt = mode_format
    path = tmp_path / f"image.{IMAGE_FORMATS[fmt]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns when a format drops part of a mode (alpha, 16 bits)
        _make_image(mode, width, height, seed, fill).save(path, format=fmt)
    mean, std = ([0.5] * in_chans, [0.25] * in_chans) if normalized else ([0.0] * in_chans, [1.0] * in_chans)
    low, high = ((0 - 0.5) / 0.25, (1 - 0.5) / 0.25) if normalized else (0.0, 1.0)
    image = read_image(str(path))  # the image folder's loader
    _check_pixels(eval_transform(image_size, in_chans, mean, std)(image), in_chans, image_size, low, high)
    augment = train_transform(image_size, in_chans, mean, std, crop_padding=crop_padding, flip=True)
    _check_pixels(augment(image), in_chans, image_size, low, high)


def _valid_image(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


VALID_IMAGES = {fmt: _valid_image(fmt) for fmt in IMAGE_FORMATS}


@settings(PROPERTY, max_examples=200)
@given(data=st.data(), fmt=st.sampled_from(sorted(IMAGE_FORMATS)))
def test_damaged_image_gives_an_error_or_a_usable_image(tmp_path, data, fmt):
    valid = VALID_IMAGES[fmt]
    path = tmp_path / f"image.{IMAGE_FORMATS[fmt]}"
    path.write_bytes(data.draw(damaged(valid, list(range(min(64, len(valid)))))))
    try:
        image = read_image(str(path), max_pixels=64 * 64)
    except ReslabError as err:
        _error_names(err, path)
        return
    for in_chans in (1, 3):
        x = eval_transform(8, in_chans, [0.0] * in_chans, [1.0] * in_chans)(image)
        _check_pixels(x, in_chans, 8, 0.0, 1.0)


# --- paths --------------------------------------------------------------------------------------------------


def test_search_roots_order(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "env"))
    assert search_roots(tmp_path) == [tmp_path, tmp_path / "env", *SYSTEM_DATA_DIRS]
    monkeypatch.delenv("RESLAB_DATA")
    assert search_roots(None) == list(SYSTEM_DATA_DIRS)


def test_missing_data_dir_is_an_error_not_a_fall_through(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path))  # holds nothing, but a fall-through would pass it
    with pytest.raises(ReslabError, match=r"--data-dir .*nope does not exist"):
        search_roots(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReslabError, match=r"--data-dir .*file is a file, not a folder"):
        search_roots(tmp_path / "file")


def test_missing_reslab_data_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path / "gone"))
    with pytest.raises(ReslabError, match=r"RESLAB_DATA=.*gone does not exist"):
        search_roots(None)


@pytest.mark.parametrize("target", ["nope", "file"])
def test_cli_missing_data_dir_is_one_line(tmp_path, monkeypatch, capsys, target):
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    (tmp_path / "file").write_text("x")
    argv = ["samples", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / target), "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--data-dir {tmp_path / target} " in err
