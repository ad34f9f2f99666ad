"""The shipped reference twins on the whole Fashion-MNIST test set, against what their manifest records.

Usage:
    python benchmarks/reference_accuracy.py

Loads each shipped model (its SHA-256 checked), evaluates it on all 10,000 test images in float32 with
BatchNorm in inference mode, and compares the accuracy with the manifest's final test error (recorded when the
twins were trained). `make test` checks the first 1,000 images (tests/explain/test_reference.py). Writes
benchmarks/results/reference_accuracy_cpu.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from reslab import machine
from reslab.explain import reference


def main() -> None:
    rows = {}
    for name in reference.shipped():
        accuracy, images = reference.test_accuracy(name)
        recorded = 1 - reference.manifest()["models"][name]["final"]["test"]["error"]
        rows[name] = {"test_acc": accuracy, "images": images, "recorded": recorded, "difference": accuracy - recorded}
        print(f"{name:>9}: {accuracy:.2%} on {images} test images (recorded {recorded:.2%})", flush=True)
    record = {"models": rows, "provenance": machine.record("cpu")}
    out = Path("benchmarks/results/reference_accuracy_cpu.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
