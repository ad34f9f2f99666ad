"""Recipe trials for `reslab explain degradation`: which training set and augmentation let the paper's two
findings show within about 80,000 training images per model (what a 2-core AVX2 CPU trains in 20 minutes).

Usage:
    python benchmarks/degradation_recipes.py --subset 5000 --aug 0 --images 80000 [--models ...] --tag NAME

A plain loop over the library's parts (the same models, the same in-memory loader and augmentation, SGD with
Nesterov momentum, lr 0.1, weight decay 1e-4 on weights only, a linear warmup over 10% of the steps and a linear
decay to zero), so that trials are cheap to vary; every model sees the same batches in the same order. Each
model's final training error is measured on its training images in eval mode without augmentation. Adds the
trial to benchmarks/results/degradation_recipes_cpu.json under its tag. T=1 runs it on one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from reslab import machine
from reslab.data import load_dataset
from reslab.data.loaders import Augment, TensorBatchLoader
from reslab.data.types import stratified_split
from reslab.models import create_model
from reslab.train.engine import autocast

RESULTS = Path("benchmarks/results/degradation_recipes_cpu.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", type=int, default=0, help="training images (stratified); 0: the whole split")
    p.add_argument("--images", type=int, default=80000, help="training images per model")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.1, help="share of the steps")
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--aug", type=int, default=1, help="1: 2-pixel random crops and flips; 0: none")
    p.add_argument("--amp", default="bf16", help="bf16 or off (float32)")
    p.add_argument("--sched", default="linear", help="linear or cosine decay to zero")
    p.add_argument("--models", nargs="+", default=["plain20", "resnet20", "plain56", "resnet56"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="")
    return p.parse_args()


def error(model: nn.Module, loader, device: torch.device, dtype) -> float:
    """Top-1 error in eval mode over ``loader``."""
    model.eval()
    correct = seen = 0
    with torch.no_grad(), autocast(device, dtype):
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            seen += len(y)
    return 1 - correct / seen


def schedule(a: argparse.Namespace, steps: int):
    warmup = max(1, round(a.warmup * steps))

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = (s - warmup) / max(steps - warmup, 1)
        return 1 - progress if a.sched == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_one(name: str, a: argparse.Namespace, loader, steps: int, dtype) -> tuple[nn.Module, list, float]:
    """``steps`` SGD steps of ``name`` on ``loader``'s batches; the model, a running-error curve, seconds."""
    torch.manual_seed(a.seed)
    m = create_model(name, num_classes=10, in_chans=1).to(memory_format=torch.channels_last)
    decay = [q for q in m.parameters() if q.ndim > 1]
    no_decay = [q for q in m.parameters() if q.ndim <= 1]
    groups = [{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0}]
    opt = torch.optim.SGD(groups, lr=a.lr, momentum=0.9, nesterov=True)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, schedule(a, steps))
    loss_fn = nn.CrossEntropyLoss()
    s, epoch, start, curve, run_c, run_n = 0, 0, time.time(), [], 0, 0
    while s < steps:
        loader.set_epoch(epoch)
        for x, y in loader:
            m.train()
            with autocast(torch.device("cpu"), dtype):
                logits = m(x)
                loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
            run_c += int((logits.argmax(1) == y).sum())
            run_n += len(y)
            s += 1
            if s % max(1, steps // 10) == 0:
                curve.append((s, 1 - run_c / run_n, float(loss.detach())))
                run_c = run_n = 0
            if s >= steps:
                break
        epoch += 1
    return m, curve, time.time() - start


def main() -> None:
    a = parse_args()
    torch.set_num_threads(int(os.environ.get("T", "2")))
    b = load_dataset("fashion-mnist", val_ratio=0.2, seed=0, download=False)
    train = b.train
    if a.subset:
        idx, _ = stratified_split(train.labels, 1 - a.subset / len(train), 0)
        train = train.subset(idx)
    dev = torch.device("cpu")
    dtype = torch.bfloat16 if a.amp == "bf16" else None
    steps = a.images // a.batch
    augment = Augment(crop_padding=2 if a.aug else 0, flip=bool(a.aug))
    common = dict(device=dev, channels_last=True)
    loader = TensorBatchLoader(train, b.info, batch_size=a.batch, train=True, augment=augment, seed=a.seed, **common)
    train_eval = TensorBatchLoader(train, b.info, batch_size=1000, train=False, **common)
    test_eval = TensorBatchLoader(b.test, b.info, batch_size=1000, train=False, **common)
    out = {"provenance": machine.record(dev), "args": vars(a), "n_train": len(train), "steps": steps, "models": {}}
    for name in a.models:
        m, curve, secs = train_one(name, a, loader, steps, dtype)
        te, tst = error(m, train_eval, dev, dtype), error(m, test_eval, dev, dtype)
        out["models"][name] = {"train_err_eval": te, "test_err": tst, "seconds": secs, "curve": curve}
        print(name, f"train_err(eval) {te:.4f} running_last {curve[-1][1]:.4f} test {tst:.4f} {secs:.0f}s", flush=True)
    record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"trials": {}}
    record["trials"][a.tag] = out
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
