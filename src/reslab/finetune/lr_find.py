"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates", Sec. 3.3; fastai's ``lr_find``,
Lightning's tuner): train a copy of the run's model for a few hundred steps while the learning rate grows
exponentially from tiny to huge, and read a good learning rate off the loss curve.

The rule that picks the suggestion: the learning rate where the smoothed loss falls fastest (the steepest
negative slope against log lr, before the loss's minimum), as Lightning suggests. The minimum / 10 (fastai's
earlier rule) is reported beside it. Nothing of the run is changed: the model is a fresh one, trained nowhere
but here, and only the range test's own folder is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from reslab.errors import ReslabError
from reslab.train import runtime
from reslab.train.config import TrainConfig
from reslab.train.engine import forward_backward

SMOOTHING = 0.98  # exponential moving average of the loss, debiased (fastai's and Lightning's beta)
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum


@dataclass
class RangeTest:
    """The range test's learning rates, raw and smoothed losses, and the suggestion with its rule."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str
    minimum_lr: float  # where the smoothed loss was lowest

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_find(
    cfg: TrainConfig, out_dir: str | Path, *, start: float = 1e-7, end: float = 10.0, steps: int = 100
) -> RangeTest:
    """Run the range test for the run ``cfg`` describes (its model, weights, freezing, data, batch size,
    optimizer and per-part lr ratios) and write ``lr_find.json`` and ``lr_find.png`` into ``out_dir``, which
    must not exist yet."""
    out = Path(out_dir)
    if out.exists():
        raise ReslabError(f"{out} already exists: lr-find writes only a new folder; pass another --out-dir")
    if not (0 < start < end and math.isfinite(end)):
        raise ReslabError(f"the range must grow: start {start} < end {end}, both positive")
    if steps < 10:
        raise ReslabError(f"--range-steps must be at least 10 for a curve, not {steps}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ReslabError("lr-find runs in one process: run it without torchrun")
    try:
        out.mkdir(parents=True)  # where a run would list skipped images, too
        rt = runtime.setup(cfg.device, cfg.amp, cfg.channels_last)
        try:
            lrs, losses = _sweep(dataclasses.replace(cfg, out_dir=str(out)), rt, start, end, steps)
        finally:
            runtime.teardown()
        result = _suggest(lrs, losses)
        record = {"config": cfg.to_dict(), **result.to_dict()}
        (out / "lr_find.json").write_text(json.dumps(record, indent=2) + "\n")
        _plot(result, out / "lr_find.png")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing written half-way
        raise
    return result


def _sweep(cfg: TrainConfig, rt, start: float, end: float, steps: int) -> tuple[list[float], list[float]]:
    """Losses of ``steps`` training steps at learning rates growing from ``start`` to ``end``."""
    from reslab.train.parts import prepare, resolved_config

    # The run's own parts, built as a run builds them, and nothing saved
    parts = prepare(resolved_config(dataclasses.replace(cfg, budget="", steps=0), rt), rt)
    model, optimizer = parts.model, parts.optimizer
    if cfg.finetune:  # the first phase's freezing: what the head-only epochs train
        from reslab.train import finetuning

        model.freeze(finetuning.frozen_in_epoch(cfg, model, 0))
    ratios = [group["lr"] / cfg.lr for group in optimizer.param_groups]  # per-part lrs keep their ratios
    batches = itertools.chain.from_iterable(_epochs(parts.loaders[0]))
    lrs, losses = [], []
    best = math.inf
    for i, (x, y) in zip(range(steps), batches, strict=False):
        lr = start * (end / start) ** (i / (steps - 1))
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        loss, _ = forward_backward(
            model, x, y, parts.loss_fn, optimizer, device=rt.device, amp_dtype=rt.amp_dtype, scaler=None
        )
        optimizer.step()
        lrs.append(lr)
        losses.append(float(loss.detach()))
        smoothed = _smooth(losses)[-1]
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
            break
    return lrs, losses


def _epochs(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch, 0)
        yield loader


def _smooth(losses: list[float]) -> list[float]:
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        out.append(average / (1 - SMOOTHING ** (i + 1)))
    return out


def _suggest(lrs: list[float], losses: list[float]) -> RangeTest:
    smoothed = _smooth(losses)
    # The first tenth is skipped in looking for the minimum: the average has seen only a few (maybe easy) batches.
    skip = len(smoothed) // 10
    lowest = min(range(skip, len(smoothed)), key=lambda i: smoothed[i] if math.isfinite(smoothed[i]) else math.inf)
    if lowest < skip + 2:
        raise ReslabError(
            f"the loss never fell (lowest at the first learning rates, {lrs[lowest]:.1e}): start the range lower"
        )
    logs = [math.log10(lr) for lr in lrs]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(skip + 1, lowest)]
    steepest = skip + 1 + min(range(len(slopes)), key=slopes.__getitem__)
    rule = "the steepest fall of the smoothed loss against log lr, before its minimum (Lightning's rule)"
    return RangeTest(lrs, losses, smoothed, lrs[steepest], rule, lrs[lowest])


def _plot(result: RangeTest, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label=f"smoothed (EMA {SMOOTHING})")
    ax.axvline(result.suggestion, color="C3", ls="--", label=f"suggested {result.suggestion:.1e}")
    ax.axvline(result.minimum_lr, color="0.4", ls=":", label=f"minimum {result.minimum_lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    top = min(max(result.smoothed[: max(len(result.smoothed) // 10, 1)]) * 1.5, max(result.losses))
    ax.set_ylim(min(result.smoothed) * 0.9, top)
    ax.set_title("learning-rate range test (Smith 2017)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
