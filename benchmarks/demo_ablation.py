"""The demo recipe at a fixed amount of work, and what each of its choices is worth there.

Usage:
    python benchmarks/demo_ablation.py [--images 99840] [--seeds 0] [--amp off] [--only NAME ...]

`make demo` trains for a wall-clock budget, so its accuracy depends on the CPU. This benchmark fixes the work
instead: about 100,000 training images (780 steps of 128), what a 2-core AVX2-only CPU (fp32 matrix-product
peak about 130 GFLOP/s) trains in the demo's budget. Each variant is `reslab train --recipe
recipes/fashion_mnist_demo.yaml --steps N` with one choice changed (N: the same images at its batch size);
every run is a fresh process. Writes
benchmarks/results/demo_ablation_<amp>_cpu.json: each variant's test accuracy per seed, its images and seconds,
and the machine (CPU, flags, cores, torch, the measured fp32 matrix-product peak).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from time_to_accuracy import run_once

from reslab import machine

RECIPE = "recipes/fashion_mnist_demo.yaml"
# name: (what changes, the flags that change it)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "demo": ("the recipe as it is", []),
    "no_label_smoothing": ("label smoothing 0.1 -> 0", ["--label-smoothing", "0"]),
    "cosine": ("cosine decay in place of the linear decay to zero", ["--schedule", "cosine"]),
    "no_augmentation": ("no random crops or flips", ["--crop-padding", "0", "--no-flip"]),
    "batch_256": ("batch 256 at lr 0.2", ["--batch-size", "256", "--lr", "0.2"]),
    "batch_64": ("batch 64 at lr 0.05", ["--batch-size", "64", "--lr", "0.05"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=99_840, help="training images per run (780 x 128)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--amp", default="off", help="off (float32, as an AVX2 CPU trains) or auto")
    parser.add_argument("--only", nargs="+", default=None, choices=list(VARIANTS))
    args = parser.parse_args()
    results = {}
    for name in args.only or VARIANTS:
        what, flags = VARIANTS[name]
        batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 128
        extra = ["--steps", str(args.images // batch), "--amp", args.amp, *flags]
        runs = [run_once(RECIPE, seed, "cpu", extra) for seed in args.seeds]
        accuracies = [r["test_acc"] for r in runs]
        results[name] = {
            "change": what,
            "flags": flags,
            "test_acc_median": statistics.median(accuracies),
            "runs": runs,
        }
        print(f"{name:>20}: test accuracy {statistics.median(accuracies):.2%} ({what})", flush=True)
    record = {
        "recipe": RECIPE,
        "images": args.images,
        "amp": args.amp,
        "seeds": args.seeds,
        "variants": results,
        "provenance": machine.record("cpu"),
    }
    out = Path("benchmarks/results") / f"demo_ablation_{args.amp}_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.only:  # a partial rerun keeps the variants it did not run
        kept = json.loads(out.read_text())["variants"]
        record["variants"] = {**kept, **results}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
