"""Faults a real run meets, made real: SIGKILL at random points (mid-step, mid-write), SIGTERM, a full disk."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch

from reslab.checkpoint import load_checkpoint
from reslab.cli import main
from tests.train.test_trainer import assert_same_run

# The child is `reslab train` whose fsync takes 0.3 s and says so: a kill timed on that line lands
# in the middle of writing a checkpoint, and one timed otherwise lands mid-step.
CHILD = """
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    print("FSYNC", flush=True)
    time.sleep(0.3)
    real_fsync(fd)
os.fsync = slow_fsync
from reslab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _command(tiny_fashion, run, *extra):
    flags = ["--model", "resnet20", "--model-arg", "layers=[1,1,1]", "--model-arg", "drop_path_rate=0.2"]
    flags += ["--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--no-download"]
    flags += ["--data-dir", str(tiny_fashion), "--out-dir", str(run), "--save-every-steps", "4", *extra]
    return [sys.executable, "-c", CHILD, "train", *flags, "--quiet"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run_until(command, event: str, delay: float, log: list[str]) -> subprocess.Popen:
    """Start ``command``; once ``event`` ("FSYNC" or "train", the run's first line) is printed, wait ``delay``
    seconds and SIGKILL it, unless it already ended. Returns the finished process; its output goes to ``log``."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    for line in proc.stdout:
        log.append(line)
        if (event == "FSYNC" and line.startswith("FSYNC")) or (event == "train" and " params) on " in line):
            time.sleep(delay)
            proc.kill()
            break
    log.extend(proc.stdout)
    proc.wait()
    return proc


def test_sigkill_anywhere_then_resume_ends_as_an_uninterrupted_run(tiny_fashion, tmp_path):
    reference = subprocess.run(
        _command(tiny_fashion, tmp_path / "straight"), capture_output=True, text=True, env=_env(), timeout=300
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    run, log, rng = tmp_path / "killed", [], random.Random(0)
    # Kill mid-write (0.15 s into a 0.3 s fsync) and mid-step, alternately, until a start runs to the end.
    plan = [("FSYNC", 0.15), ("train", 1.5), ("FSYNC", 0.15)]
    for attempt in range(12):
        event, delay = plan[attempt] if attempt < len(plan) else ("never", 0)
        proc = _run_until(_command(tiny_fashion, run, "--resume", "auto"), event, delay * rng.uniform(0.8, 1.2), log)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, "".join(log)
    text = "".join(log)
    assert proc.returncode == 0 and attempt >= len(plan), text
    assert "removed " in text and ".tmp, left by a run killed while saving" in text  # a mid-write kill's leftovers
    assert "at step " in text and not any(p.name.endswith(".tmp") for p in run.iterdir())
    assert_same_run(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt"))
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("straight", "killed"))
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]


def test_sigterm_saves_says_how_to_resume_and_exits_nonzero(tiny_fashion, tmp_path):
    run, log = tmp_path / "run", []
    proc = subprocess.Popen(
        _command(tiny_fashion, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )
    for line in proc.stdout:
        log.append(line)
        if line.startswith("FSYNC"):  # the first checkpoint is being written: training is under way
            proc.send_signal(signal.SIGTERM)
            break
    log.extend(proc.stdout)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = "".join(log)
    assert "stopped by SIGTERM at step " in text and f"--resume auto --out-dir {run}" in text
    assert "Traceback" not in text
    saved = load_checkpoint(run / "last.pt")
    assert saved["progress"]["step"] > 0 and torch.isfinite(saved["model"]["conv1.weight"]).all()


def test_a_full_disk_keeps_the_previous_checkpoint_and_ends_in_one_line(tiny_config, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import reslab.checkpoint as checkpoint_module

    real = shutil.disk_usage
    writes = {"n": 0}
    usage = namedtuple("usage", "total used free")

    def filling_up(path):
        writes["n"] += 1
        return real(path) if writes["n"] <= 2 else usage(10**9, 10**9 - 1000, 1000)  # two writes fit, then 1 kB

    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", filling_up)
    run = tmp_path / "run"
    args = ["train", "--model", "resnet20", "--model-arg", "layers=[1,1,1]", "--data-dir", tiny_config().data_dir]
    args += [
        "--no-download",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--out-dir",
        str(run),
    ]
    before = None
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("reslab: error: ") and "MB" in err and str(run) in err
    before = load_checkpoint(run / "last.pt")  # the last good state is intact and resumes
    assert before["progress"] == {"epoch": 1, "step": 0}
