"""`make demo` as a newcomer runs it, timed and recorded: what README's first command takes and reaches here.

Usage:
    python benchmarks/demo.py        # runs `make demo` (set-up first when .venv is missing), then records it

Writes benchmarks/results/demo_cpu.json: the seconds `make demo` took after set-up (train + eval + samples +
predict, as its last line prints them), the run's results.json (steps, training images, the test accuracy of
its best model) and eval_test.json's accuracy, with the machine (`reslab.machine.record`). The Getting started
page and README take their demo numbers from it (`make docs-pages`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from reslab import machine

RUN = Path("runs/demo")
OUT = Path("benchmarks/results/demo_cpu.json")


def main() -> None:
    subprocess.run(["make", ".venv/.reslab-installed", "fashion-mnist"], check=True)  # set-up, not timed
    done = subprocess.run(["make", "demo"], capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        sys.exit(f"make demo failed with status {done.returncode}")
    took = re.search(r"demo took (\d+) s after set-up", done.stdout)
    results = json.loads((RUN / "results.json").read_text())
    evaluated = json.loads((RUN / "eval_test.json").read_text())
    record = {
        "provenance": machine.record("cpu", command="make demo"),
        "demo_seconds": int(took.group(1)) if took else None,
        "eval_test_accuracy": evaluated["accuracy"],
        "predictions": [line for line in done.stdout.splitlines() if re.match(r".*\.png: ", line)],
        "run": {k: results[k] for k in ("model", "dataset", "budget", "steps", "train_images", "epochs_run",
                                        "best_val_acc", "test_acc", "train_seconds", "wall_seconds", "amp")},
    }  # fmt: skip
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT}: make demo took {record['demo_seconds']} s, test accuracy {evaluated['accuracy']:.2%}")


if __name__ == "__main__":
    main()
