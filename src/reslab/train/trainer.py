"""``fit``: the whole training story of the seeds as one function.

Validation split, train-only augmentation, seeding, early stopping that restores the best model, per-batch
schedules, TensorBoard, atomic self-describing checkpoints, exact resume, DDP. Files in the run folder:

- ``last.pt``: the full state after the last completed epoch (resume from it with ``--resume``).
- ``best.pt``: the model with the best validation accuracy (what ``eval`` and ``predict`` use).
- ``results.json``: the final numbers; ``metrics.jsonl``: per-epoch numbers; ``grad_norms.jsonl``: per-epoch
  gradient norm of every parameter (also kept in the checkpoints, for the run report); ``tensorboard/``: curves.

Determinism: the data order and augmentation of epoch ``e`` come from generators seeded by (seed, e, rank),
and the global RNG state (stochastic depth) is checkpointed, so "train 4 epochs" and "train 2, resume, train
2" give the same weights on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from reslab.data import Augment, DataBundle, FolderBatchLoader, TensorBatchLoader, load_dataset
from reslab.data.folder import train_transform
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.train import runtime
from reslab.train.checkpoint import FORMAT, atomic_save, load_checkpoint
from reslab.train.config import RESUMABLE_OVERRIDES, TrainConfig
from reslab.train.engine import evaluate, train_one_epoch
from reslab.train.logging import GradNormTracker, RunLogger
from reslab.train.optim import build_optimizer, build_scheduler


class EpochSeededLoader:
    """Reseeds a loader's generator at each epoch from (seed, epoch, rank): resumable without saved state."""

    def __init__(self, loader: TensorBatchLoader | FolderBatchLoader, seed: int, rank: int) -> None:
        self.loader, self.seed, self.rank = loader, seed, rank

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.loader, TensorBatchLoader):
            self.loader.order_generator.manual_seed(self.seed * 100_003 + epoch)  # same order on every rank
            self.loader.generator.manual_seed(self.seed * 100_003 + epoch * 1_009 + 7 * self.rank + 1)
        else:
            self.loader.epoch = epoch  # DistributedSampler's shuffle
            self.loader.loader.generator.manual_seed(self.seed * 100_003 + epoch)  # RandomSampler, worker seeds

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def _loaders(bundle: DataBundle, cfg: TrainConfig, rt: runtime.Runtime):
    info = bundle.info
    common = dict(device=rt.device, channels_last=rt.channels_last, rank=rt.rank, world_size=rt.world_size)
    if bundle.in_memory:
        augment = Augment(crop_padding=cfg.crop_padding, flip=cfg.flip)
        train = TensorBatchLoader(bundle.train, info, batch_size=cfg.batch_size, train=True, augment=augment, **common)

        def make_eval(split):
            return TensorBatchLoader(split, info, batch_size=cfg.eval_batch_size, train=False, **common)
    else:
        bundle.train.transform = train_transform(
            info.image_size[0], info.channels, info.mean, info.std, crop_padding=cfg.crop_padding, flip=cfg.flip
        )
        train = FolderBatchLoader(
            bundle.train, batch_size=cfg.batch_size, train=True, num_workers=cfg.num_workers, seed=cfg.seed, **common
        )

        def make_eval(split):
            return FolderBatchLoader(
                split, batch_size=cfg.eval_batch_size, train=False, num_workers=cfg.num_workers, seed=cfg.seed, **common
            )

    if len(train) == 0:
        raise ReslabError(f"the training split has fewer images than one batch ({cfg.batch_size} per process)")
    val = make_eval(bundle.val) if bundle.val is not None else None
    test = make_eval(bundle.test) if bundle.test is not None else None
    return EpochSeededLoader(train, cfg.seed, rt.rank), val, test


def _gather_rng_states(rt: runtime.Runtime) -> dict[str, list]:
    """Every rank's global RNG states (CPU and CUDA), gathered to all ranks, indexed by rank."""
    state = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    if not rt.distributed:
        return {k: [v] for k, v in state.items()}
    gathered: list[Any] = [None] * rt.world_size
    dist.all_gather_object(gathered, state)
    return {k: [g[k] for g in gathered] for k in state}


def _restore_rng_states(states: dict[str, list], rt: runtime.Runtime) -> None:
    if len(states.get("torch", [])) != rt.world_size:
        return  # a different number of processes: keep the fresh seeds
    torch.set_rng_state(states["torch"][rt.rank])
    if rt.device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][rt.rank], rt.device)


def _check_resumable(ckpt: dict, cfg: TrainConfig, path: str | Path) -> None:
    if not {"optimizer", "scheduler", "rng", "best"} <= set(ckpt):
        raise ReslabError(f"{path} holds a model, not a training state; resume from the run's last.pt")
    saved = ckpt["config"]
    for key, value in cfg.to_dict().items():
        if key not in RESUMABLE_OVERRIDES and key != "overwrite" and saved.get(key) != value:
            raise ReslabError(
                f"cannot resume: the checkpoint has {key}={saved.get(key)!r}, this run {value!r} "
                f"(a resumed run may change only {', '.join(RESUMABLE_OVERRIDES)})"
            )


AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def fit(cfg: TrainConfig, *, resume: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset``; returns the final results (also written to results.json)."""
    rt = runtime.setup(cfg.device, cfg.amp, cfg.channels_last)
    try:
        return _fit(cfg, rt, resume)
    finally:
        runtime.teardown()


def _fit(cfg: TrainConfig, rt: runtime.Runtime, resume: str | Path | None) -> dict[str, Any]:
    wall_start = time.perf_counter()
    # The config as it runs here: "auto" replaced by what this machine chose. Checkpoints store this one.
    cfg = dataclasses.replace(cfg, device=rt.device.type, amp=AMP_NAMES[rt.amp_dtype], channels_last=rt.channels_last)
    run_dir = cfg.run_dir()
    ckpt = load_checkpoint(resume) if resume else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg, resume)
    elif (run_dir / "last.pt").exists() and not cfg.overwrite:
        raise ReslabError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir / 'last.pt'}, "
            "or pass --out-dir NEW or --overwrite"
        )
    runtime.seed_everything(cfg.seed + rt.rank)

    # Data: rank 0 may download; the others wait, then read the same files.
    if rt.distributed and not rt.is_main:
        dist.barrier()
    bundle = load_dataset(
        cfg.dataset,
        data_dir=cfg.data_dir,
        val_ratio=cfg.val_ratio,
        seed=cfg.seed,
        download=cfg.download,
        image_size=cfg.image_size,
        in_chans=cfg.in_chans,
    )
    if rt.distributed and rt.is_main:
        dist.barrier()
    info = bundle.info

    # Model.
    model_args = {"num_classes": info.num_classes, "in_chans": info.channels, **cfg.model_args}
    raw_model = create_model(cfg.model, **model_args)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    raw_model.to(rt.device, memory_format=memory_format)
    optimizer = build_optimizer(raw_model, cfg)
    train_loader, val_loader, test_loader = _loaders(bundle, cfg, rt)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    best: dict[str, Any] = {"accuracy": -1.0, "epoch": -1, "state": None}
    history: list[dict] = []
    grad_norms: list[dict] = []  # per epoch: {"epoch": e, "norms": {parameter: mean L2 norm of its gradient}}
    start_epoch = 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        best, history, start_epoch = ckpt["best"], ckpt["history"], ckpt["epoch"] + 1
        grad_norms = ckpt.get("grad_norms", [])
        if ckpt.get("stopped_early") and cfg.patience:
            start_epoch = cfg.epochs  # early stopping already ended this run: only the final evaluation is left
        _restore_rng_states(ckpt["rng"], rt)

    model: nn.Module = raw_model
    if rt.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if cfg.compile:
        model = torch.compile(model)

    if ckpt is None and rt.is_main:  # a new run (maybe --overwrite): no curves of an older run in its TensorBoard
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    logger = RunLogger(
        run_dir,
        enabled=rt.is_main,
        quiet=cfg.quiet,
        hist_every=cfg.hist_every,
        history=history,
        grad_norms=grad_norms,
        start_epoch=start_epoch,
    )
    n_params = sum(p.numel() for p in raw_model.parameters())
    amp_name = "float32" if cfg.amp == "off" else cfg.amp
    n_val, n_test = (len(s) if s is not None else 0 for s in (bundle.val, bundle.test))
    logger.print(
        f"{cfg.model} ({n_params / 1e6:.2f}M params) on {info.name}: "
        f"{len(bundle.train)} train / {n_val} val / {n_test} test images; "
        f"{rt.device.type} x{rt.world_size}, {amp_name}, "
        f"{'channels-last' if rt.channels_last else 'channels-first'}{', compiled' if cfg.compile else ''}"
    )
    if ckpt is not None:
        logger.print(f"resumed from {resume} after epoch {start_epoch}")
    logger.log_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
    mean = torch.tensor(info.mean)
    std = torch.tensor(info.std)

    def checkpoint(epoch: int, *, full: bool, weights: dict | None = None) -> dict[str, Any]:
        ckpt_out = {
            "format": FORMAT,
            "model_name": cfg.model,
            "model_config": raw_model.config,
            "dataset": dataclasses.asdict(info),
            "config": cfg.to_dict(),
            "epoch": epoch,
            "model": weights if weights is not None else raw_model.state_dict(),
            "history": history,
            "grad_norms": grad_norms,
        }
        if full:
            ckpt_out.update(
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                best=best,
                rng=rng_states,
            )
        else:
            ckpt_out.update(best={k: v for k, v in best.items() if k != "state"})
        return ckpt_out

    stopped_early = bool(ckpt and ckpt.get("stopped_early") and cfg.patience)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch)
            tracker = GradNormTracker(raw_model)
            logger.start_epoch(epoch, cfg.epochs, len(train_loader))
            images_seen = 0

            def on_step(
                step: int, x: torch.Tensor, loss: torch.Tensor, epoch: int = epoch, tracker: GradNormTracker = tracker
            ) -> None:
                nonlocal images_seen
                images_seen += len(x) * rt.world_size
                tracker.update()
                if step == 0 and epoch == 0:
                    logger.log_images(x, mean, std, epoch)
                logger.step(images_seen, loss.item() if step % 10 == 0 else None)

            t0 = time.perf_counter()
            train = train_one_epoch(
                model,
                train_loader,
                optimizer,
                scheduler,
                loss_fn,
                device=rt.device,
                amp_dtype=rt.amp_dtype,
                scaler=scaler,
                on_step=on_step,
            )
            train_seconds = time.perf_counter() - t0
            if not math.isfinite(train.loss):
                raise ReslabError(
                    f"the training loss became {train.loss} in epoch {epoch + 1}; lower --lr (the last good epoch "
                    f"is in {run_dir / 'last.pt'})"
                )
            logger.end_epoch()
            val = (
                evaluate(model, val_loader, num_classes=info.num_classes, device=rt.device, amp_dtype=rt.amp_dtype)
                if val_loader is not None
                else None
            )
            # Without a validation split nothing is selected: the last epoch is the model.
            metric = val.accuracy if val is not None else train.accuracy
            improved = metric > best["accuracy"] if val is not None else True
            if improved:
                best = {
                    "accuracy": metric,
                    "epoch": epoch,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in raw_model.state_dict().items()},
                }
            record = {
                "epoch": epoch,
                "train_loss": train.loss,
                "train_acc": train.accuracy,
                "val_loss": val.loss if val else None,
                "val_acc": val.accuracy if val else None,
                "lr": optimizer.param_groups[0]["lr"],
                "train_images": train.images,
                "seconds": round(train_seconds, 3),
                "images_per_second": round(train.images / train_seconds, 1),
            }
            history.append(record)
            logger.log_epoch(record)
            grad_norms.append({"epoch": epoch, "norms": tracker.pop()})
            logger.log_model(raw_model, grad_norms[-1])
            val_text = f"val loss {val.loss:.4f} acc {val.accuracy:.2%}" if val else "no validation split"
            logger.print(
                f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {train.loss:.4f} acc {train.accuracy:.2%}  "
                f"{val_text}  {record['images_per_second']:.0f} img/s  {train_seconds:.1f}s"
                + ("  *" if improved else "")
            )
            rng_states = _gather_rng_states(rt)
            if rt.is_main:
                atomic_save(checkpoint(epoch, full=True), run_dir / "last.pt")
                if improved:
                    atomic_save(checkpoint(epoch, full=False, weights=best["state"]), run_dir / "best.pt")
            if cfg.patience and epoch - best["epoch"] >= cfg.patience:
                logger.print(
                    f"early stopping: no better validation accuracy for {cfg.patience} epochs; "
                    f"best was epoch {best['epoch'] + 1} ({best['accuracy']:.2%})"
                )
                stopped_early = True
                if rt.is_main:
                    atomic_save({**checkpoint(epoch, full=True), "stopped_early": True}, run_dir / "last.pt")
                break
    except KeyboardInterrupt:
        logger.close()
        if rt.is_main and (run_dir / "last.pt").exists():
            print(
                f"interrupted: the last completed epoch is saved; resume with "
                f"`reslab train --resume {run_dir / 'last.pt'}`"
            )
        raise

    # Early stopping keeps the best model: restore it before the final evaluation.
    if best["state"] is not None:
        raw_model.load_state_dict(best["state"])
    test = (
        evaluate(
            model,
            test_loader,
            num_classes=info.num_classes,
            device=rt.device,
            amp_dtype=rt.amp_dtype,
            tta_flip=cfg.tta_flip,
        )
        if test_loader is not None
        else None
    )
    results = {
        "model": cfg.model,
        "dataset": info.name,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "best_epoch": best["epoch"] + 1,
        "best_val_acc": best["accuracy"] if val_loader is not None else None,
        "test_acc": test.accuracy if test else None,
        "test_loss": test.loss if test else None,
        "test_per_class_acc": dict(zip(info.classes, test.per_class_accuracy, strict=True)) if test else None,
        "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
        "device": f"{rt.device.type} x{rt.world_size}",
        "amp": amp_name,
        "channels_last": rt.channels_last,
        "run_dir": str(run_dir),
    }
    if rt.is_main:
        final = checkpoint(best["epoch"], full=False, weights=raw_model.state_dict())
        final["results"] = results
        atomic_save(final, run_dir / "best.pt")
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if test:
            logger.print(f"test accuracy {test.accuracy:.2%} (best epoch {best['epoch'] + 1}); run folder {run_dir}")
    logger.close()
    return results
