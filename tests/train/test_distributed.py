"""DistributedDataParallel: two CPU processes under torchrun (gloo), each reading its own shard."""

import json
import subprocess
import sys

from tests.train.test_eval_predict import TINY


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
