"""A run's checkpoints: which one a run continues, and what goes into the ones it writes.

- ``last.pt``: the whole training state (``TrainState``), the random states of every rank and the run's
  description; the one it replaces is kept as ``last.prev.pt``, in case the newest is damaged.
- ``best.pt``: the model with the best validation accuracy and the run's history (what ``eval`` and
  ``predict`` use); the final one also holds the results.

The low-level file work (atomic, fsynced, checked against the free space, read with ``weights_only``) is
``reslab.checkpoint``; this module decides the contents and when a run's folder may be written to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reslab.checkpoint import FORMAT, atomic_save, clean_stale_temp_files, previous_path, resolve_resume
from reslab.data.types import DatasetInfo
from reslab.errors import ReslabError
from reslab.train import budget, runtime
from reslab.train.config import TrainConfig, check_resumable
from reslab.train.state import TrainState


@dataclass
class ResumePoint:
    """A training state to continue, read once: the file and what it holds (``resolve_resume``'s result).

    ``reslab train --resume`` reads the checkpoint to take its config; passing this to ``fit`` spares a
    second read of the same file. The trainer empties ``checkpoint`` once restored from it, so that no caller
    keeps a second copy of the weights and optimizer state alive for the whole run.
    """

    path: Path
    checkpoint: dict[str, Any] | None


def open_run_folder(
    resume: str | Path | ResumePoint | None, cfg: TrainConfig, rt: runtime.Runtime
) -> tuple[TrainConfig, ResumePoint | None]:
    """Make the run folder ready for ``cfg``'s run: the state it continues, or room for a new one.

    Temporary files of a run killed while saving are removed. With ``resume`` (a ``last.pt``, ``"auto"`` or a
    ``ResumePoint`` already read) the checkpoint is checked against ``cfg``; without one, or when ``"auto"``
    finds none, an older run's state is refused unless ``cfg.overwrite``, and then deleted.

    Returns:
        ``cfg`` (a budgeted run resumed from its recipe takes its recorded step count) and the state to
        continue, or None for a new run. Raises ReslabError for a checkpoint that cannot be continued.
    """
    run_dir = cfg.run_dir()
    if rt.is_main:
        for path in clean_stale_temp_files(run_dir):
            print(f"removed {path}, left by a run killed while saving")
    point = _read_resume(resume, run_dir, rt)
    if point is not None:
        cfg = _adopt_budgeted_steps(cfg, point.checkpoint["config"])
        check_resumable(point.checkpoint["config"], cfg)
        _set_aside_damaged(point.path, run_dir, rt)
        return cfg, point
    if (run_dir / "last.pt").exists() and not cfg.overwrite:
        raise ReslabError(
            f"{run_dir} already holds a run; continue it with --resume auto (or --resume "
            f"{run_dir / 'last.pt'}), or pass --out-dir NEW or --overwrite"
        )
    if rt.is_main:  # --overwrite: no state of the run before may be taken for this one's
        for name in ("last.pt", "last.prev.pt", "last.damaged.pt"):
            (run_dir / name).unlink(missing_ok=True)
    return cfg, None


def _read_resume(resume: str | Path | ResumePoint | None, run_dir: Path, rt: runtime.Runtime) -> ResumePoint | None:
    if isinstance(resume, ResumePoint):
        if resume.checkpoint is None or "optimizer" not in resume.checkpoint:  # as resolve_resume refuses best.pt
            raise ReslabError(f"{resume.path} holds a model, not a training state; resume from the run's last.pt")
        return resume
    if resume is None:
        return None
    path, ckpt, messages = resolve_resume(str(resume), run_dir)
    if rt.is_main:
        for message in messages:
            print(message)
    return ResumePoint(path, ckpt) if ckpt is not None else None


def _adopt_budgeted_steps(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """Resuming a budgeted run from its recipe (``--resume auto``): the step count its budget fixed when it
    started holds, not a new measurement (which would change the schedule, and so every step after)."""
    if not (cfg.budget and not cfg.steps and saved.get("budget")):
        return cfg
    if budget.parse_budget(saved["budget"]) == budget.parse_budget(cfg.budget):  # "90" is "90s", "1m30s"
        return dataclasses.replace(cfg, steps=saved.get("steps", 0), budget=saved["budget"])
    return cfg


def _set_aside_damaged(resumed: Path, run_dir: Path, rt: runtime.Runtime) -> None:
    """Resuming from last.prev.pt because last.pt is damaged: keep that good file as the next save's backup."""
    last = run_dir / "last.pt"
    if rt.is_main and last.exists() and Path(resumed).resolve() == previous_path(last).resolve():
        last.replace(run_dir / "last.damaged.pt")
        print(f"moved the damaged {last} to {run_dir / 'last.damaged.pt'}")


class CheckpointWriter:
    """Writes a run's ``last.pt`` and ``best.pt``, each saying what it is so eval, predict and resume rebuild
    the exact run. Rank 0 writes; under DDP the callers wrap each write in ``runtime.shared_errors`` so a
    failed write (a ``CheckpointWriteError``: full disk, quota) ends every rank with that one error, and the
    file written before is kept.

    Args:
        run_dir: the run's folder.
        rt: where the run runs (only rank 0 writes).
        cfg: the run's config as it runs (after a budget fixed its steps).
        info: the dataset's description (classes, channels, normalization, preprocessing).
        data_sizes: images per split, compared when the run resumes.
    """

    def __init__(
        self, run_dir: Path, rt: runtime.Runtime, *, cfg: TrainConfig, info: DatasetInfo, data_sizes: dict[str, int]
    ) -> None:
        self.run_dir, self.rt = run_dir, rt
        self.cfg, self.info, self.data_sizes = cfg, info, data_sizes

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"

    def save_last(self, state: TrainState, *, meter: dict[str, Any], rng: dict[str, list]) -> None:
        """The whole state to last.pt (the one before becomes last.prev.pt), with ``meter`` (every rank's partial
        sums of the epoch, so any world size resumes them) and ``rng`` (every rank's random states), both
        gathered by the caller: they are collectives."""
        if self.rt.is_main:
            ckpt = {**self._header(state), **state.state_dict(), "meter": meter, "rng": rng}
            atomic_save(ckpt, self.last, keep_previous=True)

    def save_best(self, state: TrainState) -> None:
        """The best weights so far (``state.best``) to best.pt."""
        if self.rt.is_main:
            atomic_save(self._model_checkpoint(state, state.best["epoch"], state.best["state"]), self.best)

    def save_final(self, state: TrainState, results: dict[str, Any]) -> None:
        """The model as the run ends (the best one restored) with its results, to best.pt; rank 0 only."""
        final = self._model_checkpoint(state, state.best["epoch"], state.model.state_dict())
        atomic_save({**final, "results": results}, self.best)

    def saved_hint(self) -> str:
        """Where the saved work is, naming only files that exist ("" when there are none)."""
        parts = []
        if self.last.exists():
            parts.append(f"the last good state is in {self.last}: continue with `reslab train --resume {self.last}`")
        if self.best.exists():
            parts.append(f"the best model so far is {self.best}")
        return "; ".join(parts)

    def _header(self, state: TrainState) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_name": self.cfg.model,
            "model_config": state.model.config,
            "dataset": dataclasses.asdict(self.info),
            "config": self.cfg.to_dict(),
            "data_sizes": self.data_sizes,
        }

    def _model_checkpoint(self, state: TrainState, epoch: int, weights: dict) -> dict[str, Any]:
        best = {k: v for k, v in state.best.items() if k != "state"}
        return {
            **self._header(state),
            "epoch": epoch,
            "model": weights,
            "history": state.history,
            "grad_norms": state.grad_norms,
            "best": best,
        }
