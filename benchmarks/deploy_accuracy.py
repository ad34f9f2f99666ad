"""Accuracy of each deployment precision of a trained checkpoint, against the model as trained.

Usage: python benchmarks/deploy_accuracy.py CKPT [--precisions fp32 bf16 int8] [--compile]
                                           [--out benchmarks/results/deploy_accuracy_cpu.json]

For the eager fp32 model and for each precision of ``reslab.deploy.optimize`` (fp32 and bf16:
folded BatchNorm, channels-last; int8: ONNX Runtime QDQ calibrated on 512 training images): test accuracy,
top-1 agreement with the eager fp32 model, accuracy drop, and the seconds of the test pass. The speed of each
path is ``reslab bench``'s job; this is about what each precision does to the answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reslab import machine
from reslab.device import pick_device
from reslab.inference import compare_precisions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/deploy_accuracy_cpu.json")
    args = parser.parse_args()
    rows = compare_precisions(args.checkpoint, tuple(args.precisions), compile=args.compile, device=args.device)
    for name, row in rows.items():
        print(
            f"{name:>10} ({row.get('backend', 'torch eager')}): accuracy {row['accuracy']:.2%}, "
            f"agreement {row['agreement']:.2%}, "
            f"drop {row['accuracy_drop'] * 100:+.2f} points, {row['seconds']:.1f} s"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": args.checkpoint, "provenance": machine.record(pick_device(args.device)), "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
