"""One table of finished `reslab train` runs: what each changed from the defaults, and what it measured.

Usage: python benchmarks/collect_runs.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/NAME.json

For each run folder: the options that differ from `TrainConfig`'s defaults (device, amp, channels-last and
output options aside), so the run can be repeated with `reslab train` and those flags; the last epoch's
training and validation accuracy (and the weight average's, when kept); the test accuracy; the training
images and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from reslab import machine
from reslab.checkpoint import load_checkpoint
from reslab.train import TrainConfig

IGNORED = {"device", "amp", "channels_last", "out_dir", "overwrite", "quiet", "hist_every", "data_dir"}


def summarize(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    config = load_checkpoint(run / "best.pt")["config"]
    defaults = dataclasses.asdict(TrainConfig())
    changed = {k: v for k, v in config.items() if k not in IGNORED and v != defaults.get(k)}
    history = _history(run)
    last = history[-1]
    return {
        "run": run.name,
        "options": changed,
        "train_acc": last["train_acc"],
        "val_acc": last["val_acc"],
        "val_acc_ema": last.get("val_acc_ema"),
        "test_acc": results["test_acc"],
        "best_weights": results.get("best_weights", "raw"),
        "train_images": sum(r["train_images"] for r in history),
        "train_seconds": results["train_seconds"],
    }


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = [summarize(Path(run)) for run in args.runs]
    for r in rows:
        val = f"{r['val_acc']:.2%}" if r["val_acc"] is not None else "-"
        print(f"{r['run']:<10} val {val:>7}  test {r['test_acc']:.2%}  {r['train_seconds']:>7.1f} s  {r['options']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"provenance": machine.record("cpu", peak=False), "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
