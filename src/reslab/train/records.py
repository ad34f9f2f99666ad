"""What a run says about itself: the lines that describe it, each epoch's record and line, the final results.

Plain functions of numbers the trainer already has: nothing here trains, waits for the device or writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reslab.data import DataBundle
from reslab.train.config import TrainConfig
from reslab.train.engine import EpochResult, EvalResult
from reslab.train.optim import scaled_lr
from reslab.train.runtime import Runtime
from reslab.train.state import TrainState


def run_description(cfg: TrainConfig, rt: Runtime, bundle: DataBundle, state: TrainState) -> list[str]:
    """The lines a run starts with: the model, the data, the device and precision, and the learning rate's
    scaling or a training size that differs from the test's where they apply."""
    info = bundle.info
    n_params = sum(p.numel() for p in state.model.parameters())
    n_val, n_test = (len(s) if s is not None else 0 for s in (bundle.val, bundle.test))
    lines = [
        f"{cfg.model} ({n_params / 1e6:.2f}M params) on {info.name}: "
        f"{len(bundle.train)} train / {n_val} val / {n_test} test images; "
        f"{rt.device.type} x{rt.world_size}, {'float32' if cfg.amp == 'off' else cfg.amp}, "
        f"{'channels-last' if rt.channels_last else 'channels-first'}{', compiled' if cfg.compile else ''}"
    ]
    if cfg.lr_reference_batch:
        global_batch, used = cfg.batch_size * rt.world_size, state.scheduler.base_lrs[-1]
        kept = "" if used == scaled_lr(cfg, rt.world_size) else "; the resumed run keeps its checkpoint's lr"
        lines.append(
            f"lr {used:.4g}: {cfg.lr:g} at batch {cfg.lr_reference_batch}, "
            f"scaled linearly to the global batch of {global_batch}{kept}"
        )
    sizes, tested = cfg.progressive_sizes, info.image_size[0]
    if sizes and sizes[-1] != tested:
        lines.append(f"note: training ends at {sizes[-1]} px (progressive_sizes); tests are at {tested} px")
    return lines


def config_text(cfg: TrainConfig) -> str:
    """The config as TensorBoard's text tab shows it (markdown code block)."""
    return "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```"


def epoch_record(
    state: TrainState, train: EpochResult, val: EvalResult | None, val_ema: EvalResult | None
) -> dict[str, Any]:
    """The epoch in progress as one line of metrics.jsonl (and of ``history``)."""
    record = {
        "epoch": state.epoch,
        "train_loss": train.loss,
        "train_acc": train.accuracy,
        "val_loss": val.loss if val else None,
        "val_acc": val.accuracy if val else None,
        "lr": state.optimizer.param_groups[-1]["lr"],  # the head's (layer decay)
        "train_images": train.images,
        "seconds": round(state.epoch_seconds, 3),
        "images_per_second": round(train.images / max(state.epoch_seconds, 1e-9), 1),
    }
    if val_ema is not None:
        record.update(val_loss_ema=val_ema.loss, val_acc_ema=val_ema.accuracy)
    return record


def epoch_line(
    record: dict[str, Any],
    epochs: int,
    *,
    seconds: float,
    val: EvalResult | None,
    val_ema: EvalResult | None,
    improved: bool,
) -> str:
    """The line an epoch ends with; ``*`` marks a new best model."""
    val_text = f"val loss {val.loss:.4f} acc {val.accuracy:.2%}" if val else "no validation split"
    if val_ema is not None:
        val_text += f" (ema {val_ema.accuracy:.2%})"
    return (
        f"epoch {record['epoch'] + 1:>3}/{epochs}  train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.2%}  {val_text}  {record['images_per_second']:.0f} img/s  {seconds:.1f}s"
        + ("  *" if improved else "")
    )


def run_results(
    cfg: TrainConfig,
    rt: Runtime,
    bundle: DataBundle,
    state: TrainState,
    test: EvalResult | None,
    *,
    steps: int,
    wall_seconds: float,
    run_dir: Path,
) -> dict[str, Any]:
    """The final numbers of a run (results.json): the best epoch, the test of its model, time and setting."""
    info, best, history = bundle.info, state.best, state.history
    return {
        "model": cfg.model,
        "dataset": info.name,
        "epochs_run": len(history),
        "stopped_early": state.stopped_early,
        "best_epoch": best["epoch"] + 1,
        "best_val_acc": best["accuracy"] if bundle.val is not None else None,
        "best_weights": best.get("weights", "raw"),  # "ema": the weight average validated better
        "test_acc": test.accuracy if test else None,
        "test_loss": test.loss if test else None,
        "test_per_class_acc": dict(zip(info.classes, test.per_class_accuracy, strict=True)) if test else None,
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "train_images": sum(r["train_images"] for r in history),
        "steps": steps,
        "budget": cfg.budget or None,
        "wall_seconds": round(wall_seconds, 2),
        "device": f"{rt.device.type} x{rt.world_size}",
        "amp": "float32" if cfg.amp == "off" else cfg.amp,
        "channels_last": rt.channels_last,
        "run_dir": str(run_dir),
    }
