"""What the training loop costs: `reslab train`'s images/s against the bare training step, same model, same run.

Usage: python benchmarks/loop_overhead.py [--model resnet20] [--batch-size 512] [--device cpu] [--epochs 2] [--compile]

The bare step is forward, backward and the fused optimizer on the loader's batches, with nothing else: no
divergence check, no metrics, no logging, no checkpoints. The loop is `reslab.train.fit` on the same data
(Fashion-MNIST, all 60,000 training images) with everything on, once looking at each step at once
(`sync_every_steps=1`) and once every 10 steps (the default). The loop's images/s are those of its last
epoch (the first holds one-off costs such as the first TensorBoard image grid and compilation). With
--compile both run under torch.compile, and the eager bare step is timed too, for comparison. Writes
benchmarks/results/loop_overhead_<device>[_compiled].json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from reslab import create_model, machine
from reslab.data import Augment, TensorBatchLoader, load_dataset
from reslab.device import pick_amp
from reslab.machine import synchronize
from reslab.train import TrainConfig, fit


def bare_step(model_name: str, batch_size: int, device: torch.device, steps: int, compile: bool) -> float:
    """Images per second of forward + backward + fused SGD, nothing else, after 5 warm-up steps."""
    bundle = load_dataset("fashion-mnist", val_ratio=0.0, download=False)
    loader = TensorBatchLoader(
        bundle.train,
        bundle.info,
        batch_size=batch_size,
        train=True,
        device=device,
        augment=Augment(crop_padding=2, flip=True),
        channels_last=True,
    )
    torch.manual_seed(0)
    model = create_model(model_name, in_chans=1).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    model = torch.compile(model, dynamic=False) if compile else model  # as `reslab train --compile` wraps it
    loss_fn = torch.nn.CrossEntropyLoss()
    amp = pick_amp("auto", device)
    batches = iter(loader)
    for step in range(steps + 5):
        if step == 5:
            synchronize(device)
            start = time.perf_counter()
        x, y = next(batches)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def loop(model_name: str, batch_size: int, device: str, epochs: int, sync_every: int, compile: bool) -> float:
    """Images per second of `fit`'s last epoch."""
    out = Path(tempfile.mkdtemp(prefix="reslab-loop-"))
    cfg = TrainConfig(
        model=model_name,
        dataset="fashion-mnist",
        val_ratio=0.0,
        epochs=epochs,
        batch_size=batch_size,
        lr=0.05,
        crop_padding=2,
        device=device,
        quiet=True,
        out_dir=str(out),
        sync_every_steps=sync_every,
        hist_every=0,
        compile=compile,
    )
    fit(cfg)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return history[-1]["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="timed steps of the bare step")
    parser.add_argument("--compile", action="store_true", help="both under torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    bare = bare_step(args.model, args.batch_size, device, args.steps, args.compile)
    rows = {"bare_step": bare}
    if args.compile:  # what compiling gains on the bare step, in the same run (this machine's speed drifts)
        rows["bare_step_eager"] = bare_step(args.model, args.batch_size, device, args.steps, False)
    for every in (1, 10):
        rows[f"reslab_train_sync_every_{every}"] = loop(
            args.model, args.batch_size, args.device, args.epochs, every, args.compile
        )
    results = [
        {"path": k, "images_per_second": round(v, 1), "share_of_bare_step": round(v / bare, 3)} for k, v in rows.items()
    ]
    for r in results:
        print(f"{r['path']:<32} {r['images_per_second']:>9.1f} img/s  {r['share_of_bare_step']:.1%}")
    out = Path(f"benchmarks/results/loop_overhead_{device.type}{'_compiled' if args.compile else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": args.model,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "results": results,
        "provenance": machine.record(device),
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
