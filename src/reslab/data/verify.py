"""Check every image of a folder before training, so that a bad file is found in seconds, not after an epoch.

A file is bad when it is empty, unreadable, not an image, truncated or otherwise undecodable, or larger than
``--max-image-pixels`` (a decompression bomb: a small file whose header promises gigabytes of pixels). The
size is read from the header and compared before any pixel is decoded. Results are cached by (path, size,
mtime) so that a second run checks only new or changed files (issue 8).

Imports only the standard library and PIL: the process pool's workers start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from reslab.errors import ReslabError

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default limit (a quarter gigabyte of RGB pixels)
PARALLEL_MIN_FILES = 256  # fewer files are checked in this process: starting workers would cost more
CACHE_VERSION = 1


class BadImageError(ReslabError):
    """An image that cannot be used, with a short ``reason`` ("empty file (0 bytes)", "truncated: ...")."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):  # picklable across processes despite the two-argument constructor
        return type(self), (self.path, self.reason)


@contextmanager
def _pil_pixel_limit(limit: int | None) -> Iterator[None]:
    """PIL's own bomb check set to ``limit`` pixels, its warning (above 1x the limit) raised as an error.

    PIL warns above ``Image.MAX_IMAGE_PIXELS`` and raises above twice that; a warning would print in every
    loader worker, so both become exceptions here, and the process's setting is restored afterwards. PIL's
    other remarks on a file it still reads (corrupt EXIF, skipped TIFF tags) are silenced: they would repeat
    for every read of the file, and a file either decodes (good) or not (bad).
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _decode_failure(err: Exception) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too large: {text}"
    if isinstance(err, EOFError) or "truncated" in text.lower():
        return f"truncated: {text}"
    return f"corrupt: {type(err).__name__}: {text}"


# How the formats ImageFolder accepts begin: a file that starts like one but is not identified is damaged.
SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _unidentified(head: bytes) -> str:
    """Why PIL found no format: a known format's header cut short or damaged, or not an image at all."""
    for magic, name in SIGNATURES.items():
        if head.startswith(magic):
            return f"corrupt: a {name} file whose header cannot be read (cut short?)"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "corrupt: a WEBP file whose header cannot be read (cut short?)"
    return f"not an image: unknown format, starts with {head[:8]!r}"


def read_image(path: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image as it is (any mode), or raise ``BadImageError`` saying why not.

    Images above ``max_pixels`` are refused from their header, before any pixel is decoded.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; PIL reads from it until load() ends)
    except OSError as err:
        raise BadImageError(path, f"unreadable: {err.strerror or err}") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        try:
            # PIL's limit is off while reading the header, so the check below reports the dimensions.
            with _pil_pixel_limit(None):
                image = Image.open(f)
        except UnidentifiedImageError:
            f.seek(0)
            raise BadImageError(path, _unidentified(f.read(16))) from None
        except Exception as err:
            raise BadImageError(path, _decode_failure(err)) from None
        width, height = image.size
        if width * height > max_pixels:
            raise BadImageError(path, f"too large: {width}x{height} pixels is above --max-image-pixels {max_pixels}")
        try:
            with _pil_pixel_limit(max_pixels):  # frames and tiles checked during decoding too (GIF, TIFF)
                image.load()
        except Exception as err:
            raise BadImageError(path, _decode_failure(err)) from None
    return image


def _check_file(path: str, max_pixels: int) -> str | None:
    """The reason ``path`` is bad, or None when it decodes."""
    try:
        read_image(path, max_pixels=max_pixels).close()
    except BadImageError as err:
        return err.reason
    return None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/reslab/image-check``, or ``~/.cache/reslab/image-check``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reslab" / "image-check"


def _cache_path(cache_dir: Path, root: str) -> Path:
    return cache_dir / f"{hashlib.sha256(root.encode()).hexdigest()[:20]}.json"


def _valid_entry(entry) -> bool:
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and all(isinstance(n, int) for n in entry[:2])
        and (entry[2] is None or isinstance(entry[2], str))
    )


def _read_cache(path: Path, root: str, max_pixels: int) -> dict[str, list]:
    """{path relative to root: [size, mtime_ns, reason or None]}; empty when missing, stale or corrupt."""
    try:
        data = json.loads(path.read_text())
        if data["version"] == CACHE_VERSION and data["root"] == root and data["max_pixels"] == max_pixels:
            return {k: v for k, v in data["files"].items() if _valid_entry(v)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # a cache is only a shortcut: anything wrong with it means checking again
    return {}


def _write_cache(path: Path, root: str, max_pixels: int, files: dict[str, list]) -> None:
    """Replace the cache file atomically (ranks of a distributed run write it at once); never fails the run."""
    data = {"version": CACHE_VERSION, "root": root, "max_pixels": max_pixels, "files": files}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError:  # a read-only or full home: the next run checks again
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)


def _default_signals() -> None:
    """Pool workers forked during training would inherit its stop-after-the-step handlers: give them the defaults."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts the pool down
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _check_all(paths: list[str], max_pixels: int, workers: int | None) -> list[str | None]:
    """Reasons for ``paths`` in order: in a process pool when there are many, else in this process."""
    if workers is None:
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    check = partial(_check_file, max_pixels=max_pixels)
    if workers > 1 and len(paths) >= PARALLEL_MIN_FILES:
        chunk = max(1, min(64, len(paths) // (workers * 4)))
        try:
            with ProcessPoolExecutor(max_workers=workers, initializer=_default_signals) as pool:
                return list(pool.map(check, paths, chunksize=chunk))
        except (OSError, RuntimeError):  # no processes allowed here (a sandbox, a broken pool): check in order
            pass
    return [check(p) for p in paths]


def check_images(
    paths: list[str], *, max_pixels: int, workers: int | None = None, cache_dir: Path | None = None
) -> dict[str, str]:
    """Every bad file among ``paths``, mapped to why it is bad (in the order given); good files are left out.

    Args:
        paths: image files, usually every file of one image folder.
        max_pixels: width x height above which an image is refused without being decoded.
        workers: processes for the check (default: the usable CPUs, at most 8); 1 checks in this process.
        cache_dir: where results are kept between runs (default ``default_cache_dir()``), one JSON file per
            folder, keyed by each file's size and modification time. An unwritable cache is not used.
    """
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    cache_file = _cache_path(Path(cache_dir) if cache_dir is not None else default_cache_dir(), root)
    cached = _read_cache(cache_file, root, max_pixels)
    reasons: dict[str, str | None] = {}
    stamps: dict[str, tuple[int, int]] = {}
    for path, full in zip(paths, absolute, strict=True):
        try:
            st = os.stat(full)
        except OSError as err:
            reasons[path] = f"unreadable: {err.strerror or err}"
            continue
        stamps[path] = (st.st_size, st.st_mtime_ns)
        entry = cached.get(os.path.relpath(full, root))
        if entry is not None and (entry[0], entry[1]) == stamps[path]:
            reasons[path] = entry[2]
    todo = [p for p in paths if p not in reasons]
    reasons.update(zip(todo, _check_all(todo, max_pixels, workers), strict=True))
    files = {
        os.path.relpath(full, root): [*stamps[path], reasons[path]]
        for path, full in zip(paths, absolute, strict=True)
        # A permission problem is fixed without changing the file's size or mtime: check it again next time.
        if path in stamps and not (reasons[path] or "").startswith("unreadable")
    }
    if todo or files.keys() != cached.keys():
        _write_cache(cache_file, root, max_pixels, files)
    return {p: reasons[p] for p in paths if reasons[p] is not None}


def write_bad_images(bad_files: list[tuple[str, str]], run_dir: str | Path) -> Path | None:
    """Write ``run_dir/bad_images.txt``, one ``path<TAB>reason`` line per skipped file; None when there are none."""
    if not bad_files:
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "bad_images.txt"
    lines = [f"# {len(bad_files)} image(s) left out of training (--on-bad-image skip): path<TAB>reason"]
    lines += [f"{path}\t{reason}" for path, reason in bad_files]
    out.write_text("\n".join(lines) + "\n")
    return out
