"""Wall-clock time and final test accuracy of a training recipe, as a user runs it.

Usage: python benchmarks/time_to_accuracy.py recipes/fashion_mnist_fast.yaml [--target 0.94] [-- extra train flags]

Runs `reslab train --recipe RECIPE` in a fresh process (imports, data loading, training and the final test
evaluation all count) and writes benchmarks/results/time_to_accuracy_<recipe>_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--target", type=float, default=0.94, help="test accuracy to reach")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("extra", nargs="*", help="more `reslab train` flags (after --)")
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="reslab-tta-"))
    cmd = [
        sys.executable,
        "-m",
        "reslab",
        "train",
        "--recipe",
        args.recipe,
        "--device",
        args.device,
        "--out-dir",
        str(run_dir),
        *args.extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    record = {
        "recipe": args.recipe,
        "command": " ".join(["reslab", *cmd[3:]]),
        "wall_seconds": round(wall, 1),
        "test_acc": results["test_acc"],
        "best_val_acc": results["best_val_acc"],
        "target": args.target,
        "reached": results["test_acc"] >= args.target,
        "epochs_run": results["epochs_run"],
        "train_seconds": results["train_seconds"],
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor(),
            "device": results["device"],
            "amp": results["amp"],
        },
    }
    out = Path("benchmarks/results") / f"time_to_accuracy_{Path(args.recipe).stem}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
