"""Training throughput: reslab's default path against a plain PyTorch loop, same model, same run.

Usage: python benchmarks/throughput.py [--model resnet20] [--steps 30] [--out benchmarks/results/throughput_cpu.json]

Three ways to train the same ResNet on Fashion-MNIST-shaped data (1x28x28, batch 256), one after the other:
1. baseline: the textbook loop, torchvision DataLoader with per-image RandomCrop + flip, float32, NCHW
   (with 2 workers, and with none);
2. baseline with reslab's data path: batch augmentation of uint8 tensors, still float32 and NCHW;
3. reslab's default path (what `reslab train` runs): batch augmentation, bf16 autocast where the CPU runs it
   natively, channels-last.
Images per second are reported with the ratio to (1), and as a share of this machine's matrix-product peak in
the path's precision: the training FLOPs of one image (counted by torch.utils.flop_counter on a real forward
and backward pass) times images per second, against `reslab.machine.matmul_peak`. A profile of the
default path says which share of its time goes to matrix products and which to the rest.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from reslab import create_model, machine
from reslab.data import Augment, DatasetInfo, TensorBatchLoader, TensorSplit
from reslab.machine import bf16_native, matmul_peak


def train_flops_per_image(model_name: str, **model_args) -> float:
    """FLOPs of one training step (forward and backward) per image, as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(model_name, in_chans=1, **model_args)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(2, 1, 28, 28)).sum().backward()
    return counter.get_total_flops() / 2


def _images(n: int) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(
        torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


def _train(model, batches, steps: int, amp: torch.dtype | None) -> float:
    """Images per second over ``steps`` steps after 3 warm-up steps."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    it = iter(batches)
    start, seen = None, 0
    for step in range(steps + 3):
        if step == 3:
            start, seen = time.perf_counter(), 0
        x, y = next(it)
        with torch.autocast("cpu", dtype=amp) if amp else nullcontext():
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


MATRIX_OPS = ("conv", "mm", "linear", "matmul")  # aten op names whose time is matrix products


def time_by_kind(model, batches, amp: torch.dtype | None, steps: int = 10) -> dict:
    """Where a step's time goes: each aten op's own (self) CPU time over ``steps`` profiled steps, as shares of
    all of it, split into matrix products (convolutions and their backward passes, linear) and the rest."""
    from torch.profiler import ProfilerActivity, profile

    _train(model, batches, 1, amp)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train(model, batches, steps, amp)
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in ops)
    matrix = sum(e.self_cpu_time_total for e in ops if any(m in e.key for m in MATRIX_OPS))
    rest = sorted((e for e in ops if not any(m in e.key for m in MATRIX_OPS)), key=lambda e: -e.self_cpu_time_total)
    return {
        "matrix_products": round(matrix / total, 3),
        "other": round(1 - matrix / total, 3),
        "top_other_ops": {e.key: round(e.self_cpu_time_total / total, 3) for e in rest[:8]},
    }


def _forever(loader):
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time the default path under torch.compile")
    parser.add_argument("--out", default="benchmarks/results/throughput_cpu.json")
    args = parser.parse_args()
    split = _images(args.batch_size * 8)
    info = DatasetInfo("synthetic", [str(i) for i in range(10)], 1, (28, 28), mean=(0.286,), std=(0.353,))
    results = {}

    # 1. The textbook loop: per-image PIL-free tensor transforms in a DataLoader (2 workers), fp32, NCHW.
    per_image = transforms.Compose(
        [
            transforms.ConvertImageDtype(torch.float32),
            transforms.RandomCrop(28, padding=2),
            transforms.RandomHorizontalFlip(),
            transforms.Normalize(info.mean, info.std),
        ]
    )

    class Transformed(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return per_image(x), y

    # Its DataLoader workers share the 2 cores with training, so it is also timed with no workers.
    for key, workers in (("baseline_fp32_nchw_dataloader", 2), ("baseline_fp32_nchw_dataloader_no_workers", 0)):
        loader = DataLoader(
            Transformed(split.images, split.labels),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
        )
        torch.manual_seed(0)
        results[key] = _train(create_model(args.model, in_chans=1), _forever(loader), args.steps, None)

    # 2. and 3. reslab's batch loader, fp32 NCHW, then bf16 channels-last.
    def reslab_batches(channels_last: bool):
        loader = TensorBatchLoader(
            split,
            info,
            batch_size=args.batch_size,
            train=True,
            device=torch.device("cpu"),
            augment=Augment(crop_padding=2, flip=True),
            channels_last=channels_last,
        )
        return _forever(loader)

    def reslab_model(channels_last: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = create_model(args.model, in_chans=1)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    amp = torch.bfloat16 if bf16_native(torch.device("cpu")) else None
    for key, channels_last, dtype in (("reslab_data_fp32_nchw", False, None), ("reslab_default_path", True, amp)):
        results[key] = _train(reslab_model(channels_last), reslab_batches(channels_last), args.steps, dtype)

    profile = time_by_kind(reslab_model(True), reslab_batches(True), amp)
    print(f"default path: matrix products {profile['matrix_products']:.0%} of op time, other {profile['other']:.0%}")
    compile_seconds = None
    if args.compile:  # 4. the default path under torch.compile (its first, compiling step timed apart)
        batches = reslab_batches(True)
        model = torch.compile(reslab_model(True))
        start = time.perf_counter()
        _train(model, batches, 1, amp)
        compile_seconds = round(time.perf_counter() - start, 1)
        results["reslab_default_path_compiled"] = _train(model, batches, args.steps, amp)

    base = results["baseline_fp32_nchw_dataloader"]
    flops = train_flops_per_image(args.model)
    cpu = torch.device("cpu")
    peaks = {None: matmul_peak(cpu, torch.float32), torch.bfloat16: matmul_peak(cpu, torch.bfloat16)}
    precision = {k: (amp if "reslab_default" in k else None) for k in results}
    rows = [
        {
            "path": k,
            "images_per_second": round(v, 1),
            "speedup": round(v / base, 2),
            "gflops": round(v * flops / 1e9, 1),
            "share_of_peak": round(v * flops / 1e9 / peaks[precision[k]], 3),
        }
        for k, v in results.items()
    ]
    for r in rows:
        print(
            f"{r['path']:<40} {r['images_per_second']:>8.1f} img/s  {r['speedup']:.2f}x  "
            f"{r['gflops']:>6.1f} GFLOP/s  {r['share_of_peak']:.1%} of peak"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "provenance": machine.record(cpu, peak=False),  # the peaks of both precisions are below
                "bf16": amp is not None,
                "results": rows,
                "train_flops_per_image": flops,
                "matmul_peak_gflops": {"float32": round(peaks[None], 1), "bfloat16": round(peaks[torch.bfloat16], 1)},
                "compile_warmup_seconds": compile_seconds,
                "default_path_time_by_kind": profile,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
