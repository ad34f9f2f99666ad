"""Wall-clock time and final test accuracy of a training recipe, as a user runs it, over one or more seeds.

Usage:
    python benchmarks/time_to_accuracy.py RECIPE [--seeds 0 1 2] [--target 0.94] [--max-seconds 180]
        [--max-images 300000] [--device cpu] [--name NAME] [-- extra train flags]

Each seed runs `reslab train --recipe RECIPE --seed S` in a fresh process. The time of a run is from starting
that process to the test result (results.json written: imports, data loading, training and the final test
evaluation count; the HTML report written afterwards does not). Writes
benchmarks/results/time_to_accuracy_<name>_<device>.json with every run, the median and the spread, and
whether the median met the target accuracy within the time and image budgets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reslab import machine


def run_once(recipe: str, seed: int, device: str, extra: list[str]) -> dict:
    """One `reslab train` process; its seconds to the test result and what results.json says."""
    run_dir = Path(tempfile.mkdtemp(prefix="reslab-tta-"))
    cmd = [sys.executable, "-m", "reslab", "train", "--recipe", recipe, "--seed", str(seed), "--device", device]
    cmd += ["--out-dir", str(run_dir), *extra]
    start_wall = time.time()
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    process_seconds = time.perf_counter() - start
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text())
    return {
        "seed": seed,
        "command": " ".join(["reslab", *cmd[3:]]),
        "seconds_to_test_result": round(results_file.stat().st_mtime - start_wall, 1),
        "process_seconds": round(process_seconds, 1),
        "test_acc": results["test_acc"],
        "best_val_acc": results["best_val_acc"],
        "best_weights": results.get("best_weights", "raw"),
        "train_images": results.get("train_images"),
        "epochs_run": results["epochs_run"],
        "train_seconds": results["train_seconds"],
        "device": results["device"],
        "amp": results["amp"],
        "run_dir": str(run_dir),  # its best.pt, for benchmarks/tta_gain.py
    }


def summarize(runs: list[dict], target: float, max_seconds: float | None, max_images: int | None) -> dict:
    accuracies = [r["test_acc"] for r in runs]
    seconds = [r["seconds_to_test_result"] for r in runs]
    images = max(r["train_images"] or 0 for r in runs)
    median_acc, median_seconds = statistics.median(accuracies), statistics.median(seconds)
    met = median_acc >= target
    met &= max_seconds is None or median_seconds <= max_seconds
    met &= max_images is None or images <= max_images
    return {
        "median_test_acc": median_acc,
        "min_test_acc": min(accuracies),
        "max_test_acc": max(accuracies),
        "median_seconds": median_seconds,
        "min_seconds": min(seconds),
        "max_seconds": max(seconds),
        "train_images": images,
        "target": {"test_acc": target, "seconds": max_seconds, "train_images": max_images},
        "reached": met,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--target", type=float, default=0.94, help="test accuracy to reach (median over seeds)")
    parser.add_argument("--max-seconds", type=float, default=None, help="time budget from start to test result")
    parser.add_argument("--max-images", type=int, default=None, help="training images budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="result file name; default: the recipe's")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1 :]  # more `reslab train` flags, after --
    runs = []
    for seed in args.seeds:
        runs.append(run_once(args.recipe, seed, args.device, args.extra))
        print(json.dumps(runs[-1], indent=2), flush=True)
    record = {
        "recipe": args.recipe,
        "seeds": args.seeds,
        **summarize(runs, args.target, args.max_seconds, args.max_images),
        "runs": runs,
        "provenance": machine.record(args.device),
    }
    name = args.name or Path(args.recipe).stem
    out = Path("benchmarks/results") / f"time_to_accuracy_{name}_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    summary = {k: v for k, v in record.items() if k not in ("runs", "provenance")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
