"""The whole state of a training run in one object that saves and restores itself.

Model, optimizer, scheduler, loss scaler, where the run is (epoch and step), the partial sums of the epoch in
progress, the best model so far and the history. With the global random-number states (gathered by the
trainer, one per rank) this is everything a run needs to continue from any step exactly as if it had never
stopped: the data of a step is a function of (seed, epoch, step), see ``reslab.data.loaders``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reslab.checkpoint import progress_of
from reslab.train.config import TrainConfig
from reslab.train.ema import ModelEma
from reslab.train.engine import EpochMeter
from reslab.train.logging import GradNormTracker
from reslab.train.optim import build_scheduler
from reslab.train.runtime import Runtime


def _no_best() -> dict[str, Any]:
    return {"accuracy": -1.0, "epoch": -1, "state": None}


@dataclass
class TrainState:
    """Everything a run needs to continue from any step; ``new`` makes a new run's, ``state_dict`` and
    ``load_state_dict`` save and restore it."""

    model: nn.Module  # the raw model, not its DDP or compiled wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    meter: EpochMeter  # the epoch in progress: summed loss and correct predictions
    tracker: GradNormTracker  # the epoch in progress: summed gradient norms
    ema: ModelEma | None = None  # the average of the weights, when the run keeps one
    epoch: int = 0  # the epoch in progress, or the next one to start
    step: int = 0  # steps of that epoch already done
    epoch_seconds: float = 0.0  # training time of the epoch in progress, summed over resumes
    best: dict[str, Any] = field(default_factory=_no_best)  # accuracy, epoch, state (CPU copy), weights (raw/ema)
    history: list[dict] = field(default_factory=list)  # one record per finished epoch (metrics.jsonl)
    grad_norms: list[dict] = field(default_factory=list)  # per epoch: {"epoch": e, "norms": {param: mean norm}}
    stopped_early: bool = False

    @classmethod
    def new(
        cls, cfg: TrainConfig, rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> TrainState:
        """A new run's state for ``model`` (the raw one) and its optimizer: the schedule over the run's steps, a
        loss scaler for fp16, the epoch's meters, and the weight average when ``cfg.ema_decay`` asks for one."""
        return cls(
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg, steps_per_epoch),
            scaler=torch.amp.GradScaler(rt.device.type) if rt.amp_dtype == torch.float16 else None,
            meter=EpochMeter(rt.device),
            tracker=GradNormTracker(model),
            ema=ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None,
        )

    def global_step(self, steps_per_epoch: int) -> int:
        return self.epoch * steps_per_epoch + self.step

    def remember_best(self, accuracy: float, weights: str = "raw") -> None:
        """The weights now (``"raw"``) or their average (``"ema"``) are the best so far, with this validation
        accuracy; kept as a CPU copy."""
        model = self.ema.module if weights == "ema" else self.model
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.best = {"accuracy": accuracy, "epoch": self.epoch, "state": state, "weights": weights}

    def finish_epoch(self) -> None:
        self.epoch, self.step, self.epoch_seconds = self.epoch + 1, 0, 0.0
        self.meter.reset()

    def state_dict(self) -> dict[str, Any]:
        """What ``last.pt`` holds besides the run's description and the random-number states."""
        return {
            "progress": {"epoch": self.epoch, "step": self.step},
            "epoch": self.epoch - 1,  # the last finished epoch (-1: none yet)
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "meter": self.meter.state_dict(),
            "tracker": self.tracker.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch_seconds": self.epoch_seconds,
            "best": self.best,
            "history": self.history,
            "grad_norms": self.grad_norms,
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, ckpt: dict[str, Any], rank: int = 0) -> None:
        """Continue from a ``last.pt``; one written before mid-epoch checkpoints existed resumes at its epoch's end.

        The saved epoch sums are those of every rank together: rank 0 carries them on, the others start at zero.
        """
        self.model.load_state_dict(ckpt["model"])
        # A checkpoint from before fused optimizers would turn fused off (guard.py needs it on); set before
        # loading, so the optimizer also places its saved state (Adam's step counts) where fused kernels want it.
        saved = ckpt["optimizer"]
        now = self.optimizer.param_groups  # a different count: load_state_dict says so below
        groups = [{**g, "fused": n.get("fused")} for g, n in zip(saved["param_groups"], now, strict=False)]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step = progress_of(ckpt)
        if "meter" in ckpt:
            self.meter.load_state_dict(ckpt["meter"], keep=rank == 0)
            self.tracker.load_state_dict(ckpt["tracker"])
        self.epoch_seconds = ckpt.get("epoch_seconds", 0.0)
        self.best, self.history = ckpt["best"], ckpt["history"]
        self.grad_norms = ckpt.get("grad_norms", [])
        self.stopped_early = bool(ckpt.get("stopped_early"))
