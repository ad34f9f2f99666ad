"""What test-time augmentation adds: one checkpoint's test accuracy with no TTA, flips, and flips plus shifts.

Usage: python benchmarks/tta_gain.py RUN/best.pt [RUN2/best.pt ...] [--out benchmarks/results/tta_gain_cpu.json]

Each checkpoint is scored on its dataset's test split exactly as `reslab eval` scores it (its normalization
and precision), once per view set; the views are `reslab.train.engine.predict_logits`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from reslab import machine
from reslab.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.data import DatasetInfo, TensorBatchLoader, load_dataset
from reslab.device import pick_amp
from reslab.train.engine import evaluate

VIEWS = {"none": (False, 0), "flip": (True, 0), "flip+translate1": (True, 1), "flip+translate2": (True, 2)}


def gains(path: str) -> dict[str, float]:
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    info = DatasetInfo.from_dict(ckpt["dataset"])
    bundle = load_dataset(
        cfg["dataset"],
        data_dir=cfg.get("data_dir"),
        val_ratio=0.0,
        download=False,
        image_size=cfg.get("image_size"),
        in_chans=cfg.get("in_chans"),
    )
    model = model_from_checkpoint(ckpt).eval()
    amp = pick_amp(cfg.get("amp", "auto"), torch.device("cpu"))
    loader = TensorBatchLoader(bundle.test, info, batch_size=1000, train=False, device=torch.device("cpu"))
    accuracy = {}
    for name, (flip, translate) in VIEWS.items():
        result = evaluate(
            model,
            loader,
            num_classes=info.num_classes,
            device=torch.device("cpu"),
            amp_dtype=amp,
            tta_flip=flip,
            tta_translate=translate,
        )
        accuracy[name] = result.accuracy
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/tta_gain_cpu.json")
    args = parser.parse_args()
    runs = {path: gains(path) for path in args.checkpoints}
    for path, accuracy in runs.items():
        print(path, "  ".join(f"{k} {v:.2%}" for k, v in accuracy.items()))
    median = {k: statistics.median(r[k] for r in runs.values()) for k in VIEWS}
    print("median", "  ".join(f"{k} {v:.2%}" for k, v in median.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"provenance": machine.record("cpu"), "checkpoints": runs, "median": median}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
