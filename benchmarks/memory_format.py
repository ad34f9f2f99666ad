"""NCHW (channels-first) vs NHWC (channels-last) speed, fp32 and bf16 autocast, inference and training.

Usage: python benchmarks/memory_format.py [--device cpu|cuda] [--out benchmarks/results/memory_format_cpu.json]

Every configuration is timed in the same process, so the ratios are comparable; absolute numbers depend on
the machine, which is written into the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from reslab import create_model, machine

CASES = [  # (model, batch, input size): a CIFAR net at its resolution, an ImageNet net at 224
    ("resnet20", 128, 32),
    ("resnet50", 16, 224),
]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: str, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, batch: int, size: int, *, channels_last: bool, bf16: bool, train: bool, device: str) -> float:
    """Images per second."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(device, memory_format=memory_format).train(train)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format)
    y = torch.randint(0, model.fc.out_features, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        if train:
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast:
                model(x)

    return batch / time_it(step, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or f"benchmarks/results/memory_format_{args.device}.json")
    results = []
    for name, batch, size in CASES:
        for train in (False, True):
            for bf16 in (False, True):
                row = {
                    "model": name,
                    "batch": batch,
                    "size": size,
                    "mode": "train" if train else "inference",
                    "dtype": "bf16-autocast" if bf16 else "fp32",
                }
                for cl in (False, True):
                    ips = measure(name, batch, size, channels_last=cl, bf16=bf16, train=train, device=args.device)
                    row["nhwc_img_s" if cl else "nchw_img_s"] = round(ips, 1)
                row["nhwc_over_nchw"] = round(row["nhwc_img_s"] / row["nchw_img_s"], 2)
                results.append(row)
                print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"provenance": machine.record(args.device), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
