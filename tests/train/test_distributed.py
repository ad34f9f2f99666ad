"""DistributedDataParallel: two CPU processes under torchrun (gloo), each reading its own shard."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import reslab
from reslab.errors import ReslabError
from tests.train.test_eval_predict import TINY


def torchrun_train(*flags: str) -> subprocess.CompletedProcess:
    """``reslab train FLAGS`` in two CPU processes under torchrun, one thread each; its output captured."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "reslab"]
    return subprocess.run(
        [*torchrun, "train", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_torchrun_two_processes(tiny_fashion, tmp_path):
    run = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "reslab"]
    flags = ["--epochs", "2", "--batch-size", "16", "--data-dir", str(tiny_fashion), "--out-dir", str(run)]
    cmd = [*torchrun, "train", *TINY, *flags]  # later flags win
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["device"] == "cpu x2" and results["test_acc"] is not None
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # rank 0 alone writes
    # 510 training images (640 less a stratified 20%: 13 of each class's 64) in two shards of 255: 15 full
    # batches of 16 per rank, 480 images an epoch in all. Were each rank reading everything, it would be 960.
    assert json.loads(lines[0])["train_images"] == 480
    assert result.stdout.count("epoch   1/2") == 1


def test_torchrun_user_error_prints_one_line(tiny_fashion, tmp_path):
    """A user error on every rank (a corrupt dataset file): the clear line once, no traceback from reslab.

    What remains is torchrun's own summary (its ChildFailedError traceback and FAILED box), printed by the
    launcher process whenever a worker exits non-zero; no worker can change it.
    """
    data = tmp_path / "data"
    shutil.copytree(tiny_fashion, data)
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")  # an empty download
    result = torchrun_train(*TINY, "--data-dir", str(data), "--out-dir", str(tmp_path / "run"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("reslab: error:") == 1, output
    error_line = next(line for line in output.splitlines() if line.startswith("reslab: error:"))
    assert "train-images-idx3-ubyte.gz" in error_line and not error_line.startswith("reslab: error: rank ")
    assert "[rank" not in output, output  # torch prefixes a worker's traceback with its rank
    package = str(Path(reslab.__file__).parent)
    frames = [line for line in output.splitlines() if line.lstrip().startswith('File "')]
    assert not [f for f in frames if package in f], output  # the one traceback left is torchrun's


def _agreeing_rank(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: record what each failure scenario raised here, as JSON in out_dir."""
    import errno
    from datetime import timedelta

    import torch.distributed as dist

    from reslab.train import runtime

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))  # a mismatch fails
    rt = runtime.setup("cpu", "off", False)
    seen: dict[str, list] = {}

    def record(name, fn):
        try:
            seen[name] = ["returned", fn()]
        except Exception as err:
            seen[name] = [type(err).__name__, str(err), runtime.is_shared(err), getattr(err, "filename", None)]

    def read_files():  # rank 0 reads first (it may download); rank 1's files are missing
        if rank == 1:
            assert os.path.exists(os.path.join(out_dir, "rank0-was-here"))
            raise ReslabError("rank 1 cannot find its files")
        open(os.path.join(out_dir, "rank0-was-here"), "w").close()
        return "data"

    def save_on_rank0():
        with runtime.shared_errors(rt):
            if rank == 0:
                raise OSError(errno.ENOSPC, "No space left on device", "/full/last.pt")

    def bug_on_rank1():
        with runtime.shared_errors(rt):
            if rank == 1:
                raise ZeroDivisionError("division by zero")

    record("no error", lambda: runtime.on_every_rank(lambda: rank * 10, rt))
    record("user error on rank 1", lambda: runtime.on_every_rank(read_files, rt))
    record("full disk on rank 0", save_on_rank0)
    record("bug on rank 1", bug_on_rank1)
    runtime.teardown()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_errors_on_one_rank_end_every_rank(tmp_path):
    """shared_errors / on_every_rank with two gloo processes: a failure on one rank ends both, none waits."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.spawn(_agreeing_rank, args=(port, str(tmp_path)), nprocs=2, join=False)
    for _ in range(600):  # a guard against a hang, not a timing: ten minutes
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        raise AssertionError("the ranks did not finish: one is waiting for the other")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["no error"] == ["returned", 0] and rank1["no error"] == ["returned", 10]
    # Rank 1's own error, on both ranks; rank 0 alone prints it (is_shared).
    assert rank0["user error on rank 1"] == rank1["user error on rank 1"]
    assert rank0["user error on rank 1"] == ["ReslabError", "rank 1 cannot find its files", True, None]
    # A full disk while rank 0 alone writes: the same OSError, file name included, on both.
    assert rank0["full disk on rank 0"] == rank1["full disk on rank 0"]
    assert rank1["full disk on rank 0"][0] == "OSError" and rank1["full disk on rank 0"][2:] == [True, "/full/last.pt"]
    # A bug keeps its traceback where it happened (not shared, so that rank prints it); the other rank says where.
    assert rank1["bug on rank 1"] == ["ZeroDivisionError", "division by zero", False, None]
    assert rank0["bug on rank 1"][0] == "ReslabError" and rank0["bug on rank 1"][2] is True
    assert "rank 1 failed: ZeroDivisionError: division by zero" in rank0["bug on rank 1"][1]


def test_cli_prints_on_rank0_alone(monkeypatch, capsys):
    """Under torchrun an error every rank shares is printed by rank 0; an error of one rank's own by that rank."""
    from reslab import cli
    from reslab.train import runtime

    monkeypatch.setenv("WORLD_SIZE", "2")
    bad_size = ["summary", "resnet20", "--input-size", "3", "0", "32"]  # every rank fails alike, before joining
    for rank, expected in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(bad_size) == 2
        assert capsys.readouterr().err.count("reslab: error:") == expected
        with pytest.raises(SystemExit):
            cli.main(["summary", "--no-such-flag"])
        assert bool(capsys.readouterr().err) == (rank == "0")

    def own_error(args):
        raise ReslabError("a file only this rank reads is missing")

    monkeypatch.setattr(runtime, "_joined_group", True)  # as after runtime.setup under torchrun
    monkeypatch.setattr(cli.models, "cmd_models", own_error)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "reslab: error: rank 1: a file only this rank reads is missing\n"


def test_a_budget_under_torchrun_fixes_one_step_count_on_both_ranks(tiny_fashion, tmp_path):
    run = tmp_path / "ddp-budget"
    flags = ["--budget", "25s", "--batch-size", "16", "--data-dir", str(tiny_fashion), "--out-dir", str(run)]
    result = torchrun_train(*TINY, *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((run / "results.json").read_text())
    assert result.stdout.count("budget 25s: ") == 1 and f"budget 25s: {results['steps']} steps" in result.stdout
    assert results["train_images"] == results["steps"] * 16 * 2  # both ranks took every step


def test_finetune_under_torchrun_trains_the_head_then_everything_on_both_ranks(tiny_fashion, tmp_path):
    # DDP registers the parameters that train when it is built: the trainer builds it again at each phase.
    source = tmp_path / "source"
    from reslab.cli import main

    assert main(["train", *TINY, "--epochs", "1", "--data-dir", str(tiny_fashion), "--out-dir", str(source)]) == 0
    run = tmp_path / "ddp-finetune"
    flags = ["--epochs", "2", "--finetune", "1", "--weights", str(source / "best.pt"), "--batch-size", "16"]
    result = torchrun_train(*TINY, *flags, "--data-dir", str(tiny_fashion), "--out-dir", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("epoch 2: training stem, layer1, layer2, layer3, head; frozen: none") == 1
    norms = [json.loads(line)["norms"] for line in (run / "grad_norms.jsonl").read_text().splitlines()]
    assert norms[0]["conv1.weight"] == 0 < norms[0]["fc.weight"] and norms[1]["conv1.weight"] > 0
