"""The two choices of reslab's int8 quantization, measured: uint8 weights without VNNI, and fp32 ends.

Usage: python benchmarks/int8_choices.py [CKPT] [--out benchmarks/results/int8_choices_cpu.json]
(default CKPT: the deployment tests' small trained model, tests/deploy/fixtures/resnet8_w8.pt)

The checkpoint's model is exported once and quantized four ways with the same 512 calibration images:
reslab's choice (``weights="auto"``: uint8 weights without VNNI, int8 with it; first convolution and
classifier kept fp32), int8 weights instead, and both with every layer quantized. Each is scored on the
test set: accuracy, and top-1 agreement with the eager fp32 model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from reslab import machine
from reslab.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.deploy import OnnxRuntimeModel, export_onnx, quantize_onnx
from reslab.inference import calibration_batches, checkpoint_batches

VARIANTS = {
    "reslab (auto weights, fp32 ends)": dict(weights="auto", fp32_ends=True),
    "int8 weights, fp32 ends": dict(weights="int8", fp32_ends=True),
    "auto weights, every layer int8": dict(weights="auto", fp32_ends=False),
    "int8 weights, every layer int8": dict(weights="int8", fp32_ends=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="tests/deploy/fixtures/resnet8_w8.pt")
    parser.add_argument("--out", default="benchmarks/results/int8_choices_cpu.json")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    model, info = model_from_checkpoint(ckpt), ckpt["dataset"]
    batches = list(checkpoint_batches(ckpt))
    labels = torch.cat([y for _, y in batches])
    with torch.no_grad():
        reference = torch.cat([model(x) for x, _ in batches]).argmax(1)
    rows = {"eager fp32": {"accuracy": (reference == labels).float().mean().item(), "agreement": 1.0}}
    calibration = calibration_batches(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", input_shape=(info["channels"], *info["image_size"]))
        for name, options in VARIANTS.items():
            int8 = OnnxRuntimeModel(quantize_onnx(fp32, Path(tmp) / "int8.onnx", calibration, **options))
            predicted = torch.cat([int8(x) for x, _ in batches]).argmax(1)
            rows[name] = {
                "accuracy": (predicted == labels).float().mean().item(),
                "agreement": (predicted == reference).float().mean().item(),
            }
    for name, row in rows.items():
        print(f"{name:>34}: accuracy {row['accuracy']:.2%}, agreement with eager fp32 {row['agreement']:.2%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"checkpoint": args.checkpoint, "provenance": machine.record("cpu"), "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
