"""Checkpoint files under failure: a full disk, a failed or killed write, corrupt files and resuming past them."""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from reslab import checkpoint
from reslab.checkpoint import (
    FORMAT,
    CheckpointWriteError,
    atomic_save,
    clean_stale_temp_files,
    load_checkpoint,
    previous_path,
    progress_of,
    resolve_resume,
)
from reslab.errors import ReslabError


def _state(epoch: int, progress: tuple[int, int] | None = None, *, numel: int = 64, training: bool = True) -> dict:
    """A small checkpoint: a training state (with "optimizer"), or a model only like best.pt."""
    ckpt = {"format": FORMAT, "epoch": epoch, "model": {"weight": torch.full((numel,), float(epoch))}}
    if training:
        ckpt["optimizer"] = {"state": {}, "param_groups": [{"lr": 0.1}]}
    if progress is not None:
        ckpt["progress"] = {"epoch": progress[0], "step": progress[1]}
    return ckpt


def _temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _run_child(script: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)


def _corrupt(path, kind: str) -> None:
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint\xff" * 50)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")


# --- writing --------------------------------------------------------------------------------------------------


def test_atomic_save_writes_an_ordinary_file_that_loads_back(tmp_path):
    path = tmp_path / "run" / "last.pt"
    written = atomic_save(_state(3), path)
    assert written == path.stat().st_size
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((64,), 3.0))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a private temporary file
    assert _temp_files(path.parent) == []


def test_write_that_does_not_fit_fails_before_touching_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    before = path.read_bytes()
    little = types.SimpleNamespace(total=10**9, used=10**9 - 2_000_000, free=2_000_000)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: little)
    with pytest.raises(CheckpointWriteError) as caught:
        atomic_save(_state(2, numel=1_000_000), path)  # 4 MB of weights
    message = str(caught.value)
    assert f"cannot write {path}" in message and "2.0 MB is free" in message and f"in {tmp_path}" in message
    needed_mb = float(message.split("needs ")[1].split(" MB")[0])
    assert needed_mb >= 4.0
    assert f"previous checkpoint {path} is kept" in message and "\n" not in message
    assert path.read_bytes() == before and _temp_files(tmp_path) == []
    with pytest.raises(CheckpointWriteError) as caught:
        atomic_save(_state(2, numel=1_000_000), tmp_path / "other.pt")
    assert "is kept" not in str(caught.value)  # no previous file to name


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO])
def test_write_failing_midway_removes_the_temp_file_and_keeps_the_previous(tmp_path, monkeypatch, code):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path, keep_previous=True)
    atomic_save(_state(2), path, keep_previous=True)
    before, prev_before = path.read_bytes(), previous_path(path).read_bytes()
    real_write = os.write

    def write_some_then_fail(fd, data):  # what the kernel does when the disk fills during the write
        if write_some_then_fail.done:
            raise OSError(code, os.strerror(code))
        write_some_then_fail.done = True
        return real_write(fd, data[:1000])

    write_some_then_fail.done = False
    with monkeypatch.context() as patch, pytest.raises(CheckpointWriteError) as caught:
        patch.setattr(checkpoint.os, "write", write_some_then_fail)
        atomic_save(_state(3, numel=100_000), path, keep_previous=True)
    message = str(caught.value)
    assert os.strerror(code) in message and "MB" in message and f"previous checkpoint {path} is kept" in message
    assert path.read_bytes() == before and previous_path(path).read_bytes() == prev_before  # no rotation either
    assert _temp_files(tmp_path) == []


def test_unwritable_folder_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with monkeypatch.context() as patch, pytest.raises(CheckpointWriteError, match="Permission denied"):
        patch.setattr(checkpoint.os, "open", refuse)
        atomic_save(_state(1), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_real_write_over_the_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    before = path.read_bytes()
    child = _run_child(
        """
        import resource, signal, sys
        import torch
        from reslab.checkpoint import CheckpointWriteError, atomic_save

        limit = int(sys.argv[2])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            atomic_save({"model": torch.zeros(limit // 2)}, sys.argv[1])  # 2 x limit bytes
        except CheckpointWriteError as err:
            print(err)
            sys.exit(3)
        """,
        path,
        200_000,
    )
    assert child.returncode == 3, child.stderr
    assert "File too large" in child.stdout and f"previous checkpoint {path} is kept" in child.stdout
    assert path.read_bytes() == before and _temp_files(tmp_path) == []


def test_keep_previous_rotates_the_last_two(tmp_path):
    path = tmp_path / "last.pt"
    assert previous_path(path) == tmp_path / "last.prev.pt"
    for epoch in range(3):
        atomic_save(_state(epoch), path, keep_previous=True)
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(previous_path(path))["epoch"] == 1
    atomic_save(_state(9), tmp_path / "best.pt")  # without keep_previous nothing else appears
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.prev.pt", "last.pt"]


def test_failure_between_the_two_renames_leaves_the_previous_for_resume(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(_state(4), path, keep_previous=True)
    real_replace = os.replace

    def fail_second(src, dst):
        if fail_second.calls:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        fail_second.calls += 1
        return real_replace(src, dst)

    fail_second.calls = 0
    with monkeypatch.context() as patch, pytest.raises(CheckpointWriteError) as caught:
        patch.setattr(checkpoint.os, "replace", fail_second)
        atomic_save(_state(5), path, keep_previous=True)
    assert f"previous checkpoint {previous_path(path)} is kept" in str(caught.value)
    assert not path.exists() and _temp_files(tmp_path) == []
    found, ckpt, _ = resolve_resume("auto", tmp_path)
    assert found == previous_path(path) and ckpt["epoch"] == 4


def test_kill_during_a_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    before = path.read_bytes()
    child = _run_child(
        """
        import os, signal, sys
        import torch
        from reslab.checkpoint import atomic_save

        # SIGKILL once every byte is written but before the rename: the moment that leaves the most behind
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        atomic_save({"model": torch.zeros(10_000)}, sys.argv[1])
        """,
        path,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = _temp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.")
    assert path.read_bytes() == before
    (tmp_path / ".notes.tmp").write_text("mine")
    assert clean_stale_temp_files(tmp_path) == [tmp_path / leftovers[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "last.pt"]


def test_clean_stale_temp_files_removes_only_checkpoint_temp_names(tmp_path):
    stale = [".last.pt.0f3a9c1e.tmp", ".best.pt.k2j_h4l5.tmp", ".last.prev.pt.abcdef12.tmp"]  # ours and mkstemp's
    kept = [".notes.tmp", ".last.pt.backup.tmp", "last.pt.0f3a9c1e.tmp", ".data.npy.0f3a9c1e.tmp", "last.pt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".dir.pt.0f3a9c1e.tmp").mkdir()  # a folder is never removed
    removed = clean_stale_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".dir.pt.0f3a9c1e.tmp"])
    assert clean_stale_temp_files(tmp_path / "missing") == []


# --- reading and resuming -------------------------------------------------------------------------------------


def test_load_checkpoint_names_the_problem(tmp_path):
    with pytest.raises(ReslabError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    atomic_save(_state(1), tmp_path / "best.pt")
    with pytest.raises(ReslabError, match=f"{re.escape(str(tmp_path))} is a folder, not a checkpoint.*best.pt"):
        load_checkpoint(tmp_path)
    _corrupt(tmp_path / "best.pt", "truncated")
    with pytest.raises(ReslabError, match="not a readable reslab checkpoint \\(truncated or corrupt"):
        load_checkpoint(tmp_path / "best.pt")


def test_progress_of_old_and_new_checkpoints():
    assert progress_of(_state(2)) == (3, 0)  # epoch 2 finished
    assert progress_of(_state(2, progress=(2, 50))) == (2, 50)  # 50 steps into epoch 2


def test_resume_auto_takes_last_whenever_it_loads(tmp_path):
    """last.pt is the newest state even when last.prev.pt shows more progress: after --overwrite, the file
    rotated into last.prev.pt belongs to the run before."""
    atomic_save(_state(5), tmp_path / "last.prev.pt")  # an older run, further along
    atomic_save(_state(0, progress=(0, 10)), tmp_path / "last.pt")
    path, ckpt, messages = resolve_resume("auto", tmp_path)
    assert path == tmp_path / "last.pt" and progress_of(ckpt) == (0, 10) and messages == []


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_resume_auto_falls_back_when_last_is_corrupt(tmp_path, kind):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path, keep_previous=True)
    atomic_save(_state(2), path, keep_previous=True)
    _corrupt(path, kind)
    found, ckpt, messages = resolve_resume("auto", tmp_path)
    assert found == tmp_path / "last.prev.pt" and ckpt["epoch"] == 1
    assert len(messages) == 1 and str(path) in messages[0] and "not a readable" in messages[0]


def test_resume_auto_in_an_empty_or_new_folder_starts_a_new_run(tmp_path):
    for run_dir in (tmp_path, tmp_path / "not-yet"):
        path, ckpt, messages = resolve_resume("auto", run_dir)
        assert path is None and ckpt is None and messages == [f"no checkpoint in {run_dir}: starting a new run"]


def test_resume_auto_skips_a_model_only_file_and_refuses_when_nothing_is_usable(tmp_path):
    atomic_save(_state(5, training=False), tmp_path / "last.pt")
    atomic_save(_state(3), tmp_path / "last.prev.pt")
    path, _, messages = resolve_resume("auto", tmp_path)
    assert path == tmp_path / "last.prev.pt" and "holds a model, not a training state" in messages[0]
    _corrupt(tmp_path / "last.prev.pt", "garbage")
    with pytest.raises(ReslabError, match=f"no usable checkpoint to resume in {re.escape(str(tmp_path))}"):
        resolve_resume("auto", tmp_path)


def test_resume_explicit_path_falls_back_to_its_previous(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path, keep_previous=True)
    atomic_save(_state(2), path, keep_previous=True)
    assert resolve_resume(str(path), tmp_path / "elsewhere")[0] == path
    _corrupt(path, "truncated")
    found, ckpt, messages = resolve_resume(str(path), tmp_path / "elsewhere")
    assert found == previous_path(path) and ckpt["epoch"] == 1
    assert messages == [f"{messages[0].split(';')[0]}; resuming from {previous_path(path)} instead"]
    assert messages[0].startswith(f"{path} is not a readable reslab checkpoint")
    previous_path(path).unlink()
    with pytest.raises(ReslabError, match="not a readable reslab checkpoint"):
        resolve_resume(str(path), tmp_path)


def test_resume_explicit_folder_or_model_only_is_refused(tmp_path):
    with pytest.raises(ReslabError, match=f"{re.escape(str(tmp_path))} is a folder.*last.pt.*--resume auto"):
        resolve_resume(str(tmp_path), tmp_path)
    atomic_save(_state(3, training=False), tmp_path / "best.pt")
    refused = r"best\.pt holds a model, not a training state; resume from the run's last\.pt"
    with pytest.raises(ReslabError, match=refused):
        resolve_resume(str(tmp_path / "best.pt"), tmp_path)


def test_a_ctrl_c_between_the_renames_waits_until_the_new_checkpoint_is_in_place(tmp_path, monkeypatch, request):
    path = tmp_path / "last.pt"
    atomic_save(_state(1), path)
    real = os.replace
    calls = {"n": 0}

    def replace_then_interrupted(src, dst):
        calls["n"] += 1
        real(src, dst)
        if calls["n"] == 1:  # after last.pt became last.prev.pt, before the new one is last.pt
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(checkpoint.os, "replace", replace_then_interrupted)
    # Python's own Ctrl-C handler, even where a shell started pytest in the background with SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):  # delivered once both renames are done
        atomic_save(_state(2), path, keep_previous=True)
    assert calls["n"] == 2 and progress_of(load_checkpoint(path)) == (3, 0)
    assert progress_of(load_checkpoint(checkpoint.previous_path(path))) == (2, 0)
