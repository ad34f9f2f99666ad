"""Train the reference twins that reslab ships, and package them (``reslab.explain.reference``).

Usage:
    python benchmarks/reference_twins.py [--budget 40m | --steps N] [--recipe recipes/reference_twins.yaml]
        [--runs-dir runs/reference] [--device cpu]

Runs the degradation experiment (plain-20, ResNet-20, plain-56, ResNet-56, one step count for all four, fixed
by the budget) with the reference recipe, then writes into ``src/reslab/explain/reference_nets/``: each model's
final weights as safetensors, the experiment's figure, and ``manifest.json`` with the command, commit, date,
machine (CPU, flags, cores, torch, the measured fp32 matrix-product peak), seconds, recipe, every epoch's metrics,
the final errors and each file's SHA-256.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from reslab import machine
from reslab.checkpoint import load_checkpoint
from reslab.explain import degradation
from reslab.explain.reference import FOLDER, sha256, test_accuracy


def package(result: dict, runs_dir: Path, provenance: dict) -> Path:
    FOLDER.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, run in result["runs"].items():
        last = load_checkpoint(runs_dir / name / "last.pt")
        weights = {k: v.contiguous() for k, v in last["model"].items()}
        path = FOLDER / f"{name}.safetensors"
        save_file(weights, str(path))
        cfg = last["config"]
        models[name] = {
            "file": path.name,
            "sha256": sha256(path),
            "bytes": path.stat().st_size,
            "model_config": last["model_config"],
            "dataset": last["dataset"],
            "split": {"val_ratio": cfg["val_ratio"], "seed": cfg["seed"], "train_subset": cfg["train_subset"]},
            "history": run["history"],
            "final": run["final"],
            "results": run["results"],
        }
    figure = runs_dir / "figure" / "degradation.png"
    shutil.copy(figure, FOLDER / "degradation.png")
    manifest = {
        **provenance,
        "budget": result["budget"],
        "steps": result["steps"],
        "recipe": result["recipe"],
        "summary": degradation.summarize(result),
        "verdict": result["verdict"],
        "models": models,
    }
    out = FOLDER / "manifest.json"
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    # What `make test` checks against, on a subset it can afford (tests/explain/test_reference.py).
    for name, entry in models.items():
        entry["test_acc_first_1000"] = test_accuracy(name, images=1000)[0]
    out.write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="40m", help="wall clock for the four models together")
    parser.add_argument("--steps", type=int, default=None, help="a step count in place of the budget (for a quick try)")
    parser.add_argument("--recipe", default="recipes/reference_twins.yaml")
    parser.add_argument("--runs-dir", default="runs/reference")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    provenance = machine.record(device)  # its commit is the one before the weights are written into src/
    start = time.perf_counter()
    result = degradation.measure(
        budget=args.budget,
        steps=args.steps,
        recipe=args.recipe,
        runs_dir=args.runs_dir,
        retrain=True,
        device=args.device,
        reference=False,
    )
    seconds = time.perf_counter() - start
    figure_dir = Path(args.runs_dir) / "figure"
    figure_dir.mkdir(parents=True, exist_ok=True)
    degradation.plot(result, figure_dir)
    out = package(result, Path(args.runs_dir), {**provenance, "seconds": round(seconds, 1)})
    print("\n".join(degradation.summarize(result)))
    print(f"wrote {out} and the weights beside it ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
