"""Self-describing checkpoints, written atomically and read back without unpickling code.

A checkpoint holds everything a later command needs: the model's name and full arguments, the dataset's
classes and normalization, the resolved training config, the weights, and for resuming the optimizer,
scheduler, epoch, random-number states and the best model so far. Only tensors, numbers, strings, lists
and dicts go in, so ``torch.load(weights_only=True)`` reads it.

Writing never damages the checkpoint already on disk (issue 8): the new one is serialized in memory, checked
against the free space, written to a temporary file beside it and only then renamed over it. With
``keep_previous`` the one it replaces stays as ``last.prev.pt``, so a corrupt newest file still leaves a good
one to resume from; ``resolve_resume`` picks between them.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from reslab.errors import ReslabError
from reslab.models import ResNet

FORMAT = "reslab-checkpoint-1"

# Left free after a write: the run's small files written next (metrics, logs) and file-system metadata need room,
# and a disk filled to its last byte breaks every other process on the machine too.
_HEADROOM_BYTES = 8_000_000
# The temporary files atomic_save writes: ".last.pt.<8 random characters>.tmp". The character set also covers
# the names tempfile.mkstemp gave in earlier versions, so their leftovers are cleaned as well.
_TEMP_NAME = re.compile(r"\..+\.pt\.[a-z0-9_]{8}\.tmp")


class CheckpointWriteError(ReslabError):
    """A checkpoint could not be written (full disk, quota, file-size limit, I/O error); the previous one is kept."""


def previous_path(path: str | Path) -> Path:
    """Where ``atomic_save(..., keep_previous=True)`` keeps the file it replaces: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj: Any, path: str | Path, *, keep_previous: bool = False) -> int:
    """Write ``obj`` with ``torch.save`` so that no failure or kill ever leaves half a checkpoint at ``path``.

    The bytes are made in memory first, so their size is checked against the free space before anything on disk
    changes; then they go to a temporary file in the same folder, are flushed to the disk and renamed over
    ``path``. With ``keep_previous`` the file at ``path`` first becomes ``previous_path(path)``; a kill between
    the two renames leaves that one, which ``resolve_resume`` finds.

    Returns the number of bytes written. Raises ``CheckpointWriteError`` (a ``ReslabError``) naming the file, the
    reason, the space needed and free, and the previous checkpoint that is kept; no temporary file is left behind.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(path, len(data), err) from err
    free = _free_bytes(path.parent)
    needed = len(data) + _HEADROOM_BYTES
    if free is not None and free < needed:
        raise CheckpointWriteError(
            f"cannot write {path}: it needs {_mb(needed)} but only {_mb(free)} is free in {path.parent}"
            + _kept_note(path)
        )
    try:
        fd, tmp = _create_temp(path)
    except OSError as err:
        raise _write_error(path, len(data), err) from err
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)  # the bytes reach the disk before the rename publishes them
        finally:
            os.close(fd)
        with _signals_held():  # a Ctrl-C between the two renames would throw away a whole, written checkpoint
            if keep_previous and path.exists():
                os.replace(path, previous_path(path))
            os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(path, len(data), err) from err
        raise
    _fsync_folder(path.parent)
    return len(data)


def clean_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files a killed ``atomic_save`` left in ``folder`` (SIGKILL runs no cleanup).

    Only names of the form ``.<name>.pt.<8 random characters>.tmp`` are touched; returns the paths removed.
    Call it when a run starts, before anything writes into the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if not _TEMP_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
            continue
        try:
            path.unlink()
        except OSError:
            continue  # someone else's file we cannot remove: not worth stopping a run for
        removed.append(path)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a reslab checkpoint; a ReslabError when the file is missing, a folder, unsafe or of another kind."""
    path = Path(path)
    if path.is_dir():
        raise _folder_error(path)
    if not path.is_file():
        raise ReslabError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ReslabError(f"{path} is not a readable reslab checkpoint ({_load_failure(err)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ReslabError(f"{path} is not a reslab checkpoint (plain weights load with create_model(weights=...))")
    return ckpt


def progress_of(ckpt: dict[str, Any]) -> tuple[int, int]:
    """How far a training state got, as ``(epoch, step)``: the epoch running and the steps done in it.

    A finished epoch ``e`` is ``(e + 1, 0)``. Checkpoints written before mid-epoch saves hold only ``epoch``,
    the index of the epoch that had finished.
    """
    progress = ckpt.get("progress")
    if progress is None:
        return int(ckpt["epoch"]) + 1, 0
    return int(progress["epoch"]), int(progress.get("step", 0))


def resolve_resume(spec: str | Path, run_dir: str | Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """Find the checkpoint ``--resume SPEC`` means and load it: ``(path, checkpoint, messages to print)``.

    ``"auto"``: ``run_dir/last.pt``, or ``run_dir/last.prev.pt`` when that one is damaged,
    skipping (with a message) files that are unreadable or hold only a model; ``(None, None, [message])`` when
    neither exists, so a requeued job script starts a new run the first time. Another spec is a file; when it is
    unreadable or missing and its ``previous_path`` is good, that one is used, with a message.

    Raises ReslabError for a folder, a model-only checkpoint such as ``best.pt``, or when nothing usable is found.
    """
    if str(spec) == "auto":
        return _resume_auto(Path(run_dir))
    path = Path(spec)
    if path.is_dir():
        raise _folder_error(path, resume=True)
    ckpt, err = _try_load(path)
    if ckpt is not None:
        if not _is_training_state(ckpt):
            raise ReslabError(f"{path} holds a model, not a training state; resume from the run's last.pt")
        return path, ckpt, []
    prev = previous_path(path)
    prev_ckpt = _try_load(prev)[0] if prev.is_file() else None
    if prev_ckpt is None or not _is_training_state(prev_ckpt):
        raise err
    return prev, prev_ckpt, [f"{err}; resuming from {prev} instead"]


def model_from_checkpoint(ckpt: dict[str, Any]) -> ResNet:
    """Rebuild the exact model a checkpoint was trained as and load its weights (evaluation mode)."""
    model = ResNet(**ckpt["model_config"])
    model.name = ckpt["model_name"]
    model.load_state_dict(ckpt["model"])
    return model.eval()


# --- helpers ---------------------------------------------------------------------------------------------------


def _resume_auto(run_dir: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    last = run_dir / "last.pt"
    candidates = [p for p in (last, previous_path(last)) if p.exists()]
    if not candidates:
        return None, None, [f"no checkpoint in {run_dir}: starting a new run"]
    good, problems = [], []
    for path in candidates:
        ckpt, err = _try_load(path)
        if ckpt is None:
            problems.append(str(err))
        elif not _is_training_state(ckpt):
            problems.append(f"{path} holds a model, not a training state")
        else:
            good.append((path, ckpt))
    if not good:
        raise ReslabError(
            f"no usable checkpoint to resume in {run_dir} ({'; '.join(problems)}); "
            "to start over, drop --resume and pass --overwrite, or pass --out-dir NEW"
        )
    # The newest is last.pt whenever it loads: last.prev.pt may be older or, after --overwrite, of another run.
    path, ckpt = good[0]
    return path, ckpt, [f"{problem}; skipping it" for problem in problems]


def _try_load(path: Path) -> tuple[dict[str, Any] | None, ReslabError | None]:
    try:
        return load_checkpoint(path), None
    except ReslabError as err:
        return None, err


def _is_training_state(ckpt: dict[str, Any]) -> bool:
    # best.pt holds the model only: resuming from it would restart the optimizer and schedule silently
    return "optimizer" in ckpt


def _folder_error(path: Path, *, resume: bool = False) -> ReslabError:
    if resume:
        return ReslabError(
            f"{path} is a folder, not a checkpoint; pass {path / 'last.pt'}, or --resume auto for the run's own folder"
        )
    files = [str(path / name) for name in ("last.pt", "best.pt") if (path / name).is_file()]
    return ReslabError(
        f"{path} is a folder, not a checkpoint; pass a file such as {' or '.join(files or [str(path / 'last.pt')])}"
    )


def _load_failure(err: Exception) -> str:
    """A few words for why torch.load failed; its own messages run to many lines."""
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, pickle.UnpicklingError):
        return "corrupt, or holds objects other than tensors and plain data"
    if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL):
        return err.strerror or type(err).__name__  # a real I/O error, e.g. "Input/output error"
    # torch's zip reader reports a cut-off file as EINVAL, EOFError or a RuntimeError
    return f"truncated or corrupt: {type(err).__name__}"


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (they are delivered right after) where the platform and thread allow it."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask (Windows)
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create ``.<name>.<random>.tmp`` beside ``path``, readable as an ordinary file (mode 0o666 less the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(path.parent))


def _write_all(fd: int, data: memoryview) -> None:
    # os.write may write less than asked (a file-size limit, a signal); the next call then reports the error
    while data:
        data = data[os.write(fd, data) :]


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable on POSIX; a folder cannot be opened (or synced) everywhere, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None  # unknown: the write itself will report a full disk


def _write_error(path: Path, size: int, err: OSError) -> CheckpointWriteError:
    reason = err.strerror or type(err).__name__
    free = _free_bytes(path.parent)
    space = f"it needs {_mb(size + _HEADROOM_BYTES)}"
    if free is not None:
        space += f", {_mb(free)} free in {path.parent}"
    return CheckpointWriteError(f"cannot write {path}: {reason} ({space}){_kept_note(path)}")


def _kept_note(path: Path) -> str:
    """Name the previous checkpoint that survives a failed write, if there is one."""
    for kept in (path, previous_path(path)):
        if kept.is_file():
            return f"; the previous checkpoint {kept} is kept"
    return ""


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"
