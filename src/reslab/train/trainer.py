"""``fit``: a training run as setup, a loop of epochs, and a finish.

Validation split, train-only augmentation, seeding, early stopping that restores the best model, per-batch
schedules, TensorBoard, atomic self-describing checkpoints (``last.pt``, ``best.pt``: ``checkpointing.py``), exact
resume from any step, DDP. Besides the checkpoints the run folder holds ``results.json`` (the final numbers),
``metrics.jsonl`` (per-epoch numbers), ``grad_norms.jsonl`` (per-epoch gradient norm of every parameter),
``tensorboard/`` (curves) and ``bad_images.txt`` (image-folder files skipped).

Every step is checked before the optimizer applies it: a non-finite or exploding loss or a non-finite gradient
stops the run there, names the first layer that went non-finite, and nothing non-finite is ever saved.

Determinism: the data of step ``s`` of epoch ``e`` is a function of (seed, e, s, rank), and the global RNG
state (stochastic depth) is checkpointed, so a run killed at any point and resumed ends with the same weights
and metrics as one that never stopped, on the CPU.

The run's parts are built by ``parts.py``, a diverged step stopped by ``guard.py``, a budget turned into steps by
``budget.py``, and what the run prints and records is ``records.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.train import budget, finetuning, records, runtime
from reslab.train.checkpointing import CheckpointWriter, ResumePoint, open_run_folder
from reslab.train.config import TrainConfig
from reslab.train.engine import EvalResult, evaluate, forward_backward, optimizer_step
from reslab.train.guard import DivergenceGuard, StepWindow
from reslab.train.logging import RunLogger
from reslab.train.optim import total_steps
from reslab.train.parts import RunParts, announcer, data_sizes, prepare, read_weights, resolved_config, wrap
from reslab.train.signals import StopSignals, TrainingStopped
from reslab.train.state import TrainState


def fit(cfg: TrainConfig, *, resume: str | Path | ResumePoint | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset``; returns the final results (also written to results.json).

    Args:
        cfg: the run.
        resume: a ``last.pt`` to continue from, ``"auto"`` for the run folder's newest good checkpoint (a new
            run when there is none), or a ``ResumePoint`` already read (the checkpoint is not read again).
    """
    rt = runtime.setup(cfg.device, cfg.amp, cfg.channels_last)
    try:
        with StopSignals(announce=announcer(rt)) as signals:
            trainer = Trainer(cfg, rt, resume, signals)
            try:
                trainer.train()
                return trainer.finish()
            finally:
                trainer.logger.close()
    finally:
        runtime.teardown()


def measure_costs(cfg: TrainConfig) -> tuple[budget.RunCosts, int]:
    """What a step, an epoch's end and the final test of a run of ``cfg`` cost on this machine, and the run's
    steps per epoch, measured as ``--budget`` measures them; nothing is trained, and no checkpoint or log is
    written. For one step count shared by several runs (``reslab explain degradation``)."""
    rt = runtime.setup(cfg.device, cfg.amp, cfg.channels_last)
    try:
        started = time.perf_counter()
        parts = prepare(resolved_config(dataclasses.replace(cfg, budget="", steps=0), rt), rt)
        setup = time.perf_counter() - started  # what the run itself will spend before its first step
        run_step = partial(_train_step, loss_fn=parts.loss_fn, rt=rt, host_checked=parts.host_checked, look=None)
        costs = budget.probe_run(parts, rt, run_step, budget=cfg.budget)
        return dataclasses.replace(costs, setup_seconds=setup), len(parts.loaders[0])
    finally:
        runtime.teardown()


class Trainer:
    """One run: ``Trainer(...)`` sets it up (or restores it), ``train()`` runs the epochs, ``finish()`` tests.

    Args:
        cfg: the run.
        rt: where it runs (``runtime.setup``).
        resume: as ``fit``'s.
        signals: the SIGTERM / SIGINT that ask the run to save and stop.
    """

    def __init__(
        self, cfg: TrainConfig, rt: runtime.Runtime, resume: str | Path | ResumePoint | None, signals: StopSignals
    ) -> None:
        self.wall_start = time.perf_counter()
        self.rt, self.signals = rt, signals
        self.cfg = resolved_config(cfg, rt)  # checkpoints store this one
        self.run_dir = self.cfg.run_dir()
        self.budget_note: str | None = None  # what a budget fixed, said once the logger is there
        # Under DDP, an error on any rank in these blocks ends every rank with that one error (runtime.py).
        pretrained = read_weights(self.cfg, rt) if resume is None else None  # before an older run is deleted
        with runtime.shared_errors(rt):
            self.cfg, point = open_run_folder(resume, self.cfg, rt)
        self.resumed_from = point.path if point is not None else None
        parts = prepare(self.cfg, rt, pretrained=pretrained, resume=point)
        self.bundle, self.info, self.loss_fn = parts.bundle, parts.info, parts.loss_fn
        self.train_loader, self.val_loader, self.test_loader = parts.loaders
        self.host_checked = parts.host_checked
        if self.cfg.budget and not self.cfg.steps:  # the probe runs collectives under DDP: outside those blocks
            self.cfg = dataclasses.replace(self.cfg, steps=self._steps_for_budget(parts))
        with runtime.shared_errors(rt):
            steps_per_epoch = len(self.train_loader)
            finetuning.check_finetune_fits(self.cfg, steps_per_epoch, total_steps(self.cfg, steps_per_epoch))
            self.state = TrainState.new(self.cfg, rt, parts.model, parts.optimizer, steps_per_epoch)
            if point is not None:
                self.state.load_state_dict(point.checkpoint, rank=rt.rank)
                self.state.stopped_early &= self.cfg.patience > 0  # early stopping ended it; without patience, go on
                runtime.restore_rng_states(point.checkpoint["rng"], rt)
                point.checkpoint = None  # restored: free it, whoever else holds the ResumePoint
        self.model = wrap(self.state.model, self.cfg, rt)  # DDP's constructor is a collective: outside the blocks
        sizes = data_sizes(self.bundle)
        self.checkpoints = CheckpointWriter(self.run_dir, rt, cfg=self.cfg, info=self.info, data_sizes=sizes)
        self.guard = DivergenceGuard(
            rt=rt,
            max_loss=parts.max_loss,
            loss_fn=self.loss_fn,
            train_loader=self.train_loader,
            saved_hint=self.checkpoints.saved_hint,
        )
        self.saves = budget.SaveInterval(self.cfg.save_every_steps)
        # The epoch in progress: losses since the last logged step, when the last look was, images trained on.
        self._recent_losses: list[float] = []
        self._started, self._images = 0.0, 0
        with runtime.shared_errors(rt):
            self.logger = self._make_logger(fresh=point is None)
            self._announce()

    # --- setup -------------------------------------------------------------------------------------------
    def _steps_for_budget(self, parts: RunParts) -> int:
        """The step count that fits ``cfg.budget`` from this run's start: measured on a copy of the model, so the
        run then trains exactly as one given ``--steps`` with that count."""
        costs = budget.probe_run(parts, self.rt, self._step)
        steps, self.budget_note = budget.plan_run(
            self.cfg, self.rt, costs, len(self.train_loader), started=self.wall_start
        )
        return steps

    def _make_logger(self, *, fresh: bool) -> RunLogger:
        if fresh and self.rt.is_main:  # a new run (maybe --overwrite): no curves of an older run in its TensorBoard
            shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)
        return RunLogger(
            self.run_dir,
            enabled=self.rt.is_main,
            quiet=self.cfg.quiet,
            hist_every=self.cfg.hist_every,
            history=self.state.history,
            grad_norms=self.state.grad_norms,
            start_step=self.state.global_step(len(self.train_loader)),
        )

    def _announce(self) -> None:
        lines = records.run_description(self.cfg, self.rt, self.bundle, self.state)
        lines += [self.budget_note] if self.budget_note else []
        if self.resumed_from is not None:
            lines.append(f"resumed from {self.resumed_from} at step {self.state.step} of epoch {self.state.epoch + 1}")
        for line in lines:
            self.logger.print(line)
        self.logger.log_text("config", records.config_text(self.cfg))

    def _freeze_for_epoch(self) -> None:
        """``--finetune N``: the body frozen for the first N epochs, then unfrozen (DDP wraps the model again,
        since it registers the parameters that train when it is built)."""
        model, epoch = self.state.model, self.state.epoch
        frozen = finetuning.frozen_in_epoch(self.cfg, model, epoch)
        if tuple(frozen) == getattr(model, "frozen", ()):
            return
        model.freeze(frozen)
        trains = [p for p in model.part_names if p not in frozen]
        self.logger.print(f"epoch {epoch + 1}: training {', '.join(trains)}; frozen: {', '.join(frozen) or 'none'}")
        if self.rt.distributed or self.cfg.compile:
            self.model = wrap(model, self.cfg, self.rt)

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self) -> None:
        """Run the epochs left; raises ``TrainingStopped`` (after saving) when a signal asks the run to stop."""
        if self._agree(bool(self.signals.requested))[0]:  # it came while loading data or building the model
            message = f"stopped by {self.signals.name or 'a signal on another rank'} before training began"
            if self.rt.is_main:
                print(message)
            raise TrainingStopped(message, self.signals.requested or 15)
        try:
            while self.state.epoch < self.epochs and not self.state.stopped_early:
                self._train_epoch()
                self._end_epoch()
        except TrainingStopped:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, with no new checkpoint
            self.logger.end_epoch()
            saved = self.checkpoints.saved_hint()
            if self.rt.is_main and saved:
                print(f"interrupted; {saved}")
            raise

    def _train_epoch(self) -> None:
        if self.cfg.finetune:
            self._freeze_for_epoch()
        st, steps = self.state, self._steps_in_epoch(self.state.epoch)
        self.train_loader.set_epoch(st.epoch, st.step)
        self.logger.start_epoch(st.epoch, self.epochs, steps, done=st.step)
        self._recent_losses = []
        self._started, self._images = time.perf_counter(), 0
        for x, y in islice(self.train_loader, steps - st.step):  # a run of `steps` steps may end mid-epoch
            if st.epoch == 0 and st.step == 0:
                self.logger.log_images(x, torch.tensor(self.info.mean), torch.tensor(self.info.std), 0)
            self._step(x, y)
            st.step += 1
            self._images += len(x) * self.rt.world_size
            if self._sync_due(steps):
                self._sync()
                if self._agree(bool(self.signals.requested))[0]:
                    self._save_last()
                    self._stopped()
                if st.step < steps and self.saves.due(self.state.step):
                    self._save_last()
                    self._started = time.perf_counter()  # a checkpoint's writing time is not training time
        self.logger.end_epoch()

    @property
    def epochs(self) -> int:
        """Epochs in the run, the last one maybe partial (``cfg.steps``)."""
        return math.ceil(total_steps(self.cfg, len(self.train_loader)) / len(self.train_loader))

    def _steps_in_epoch(self, epoch: int) -> int:
        per_epoch = len(self.train_loader)
        return min(per_epoch, total_steps(self.cfg, per_epoch) - epoch * per_epoch)

    def _step(self, x: torch.Tensor, y: torch.Tensor, *, state=None, model=None, window=None) -> None:
        """One training step of the run (``_train_step``). ``state``, ``model`` and ``window`` default to the
        run's own; the budget's probe passes a copy's, whose window it reads itself."""
        own = window is None
        _train_step(
            x,
            y,
            state=state or self.state,
            model=model or self.model,
            window=self.guard.window if own else window,
            loss_fn=self.loss_fn,
            rt=self.rt,
            host_checked=self.host_checked,
            look=self._sync if own else None,
        )

    def _sync_due(self, steps: int) -> bool:
        """Whether the host reads the window after this step: every ``sync_every_steps`` steps, at the epoch's
        end, before a checkpoint, and (one process) as soon as a stop is asked for. The same steps on every rank."""
        st = self.state
        asked = not self.rt.distributed and bool(self.signals.requested)
        return st.step % self.cfg.sync_every_steps == 0 or st.step == steps or self.saves.due(self.state.step) or asked

    def _sync(self) -> None:
        """Read the steps since the last look (one host synchronization): stop at the first bad one, or log
        them and move the progress bar."""
        st, steps = self.state, len(self.train_loader)
        looked = self.guard.window.read()
        if not looked:
            return
        bad = next((r for r in looked if r.bad), None)
        if bad is not None:
            with runtime.shared_errors(self.rt):
                self.guard.stop_at(bad, st)
        now = time.perf_counter()
        st.epoch_seconds += now - self._started
        self.saves.count(len(looked), now - self._started)
        self._started = now
        first = st.epoch * steps
        for record in looked:
            self._recent_losses.append(record.loss)
            step = first + record.step + 1  # global steps done after this one: the same whether resumed or not
            if step % self.cfg.log_every_steps == 0:
                lr = st.scheduler.base_lrs[-1] * st.scheduler.lr_lambdas[-1](step)  # after that step (the head's: last)
                self.logger.log_step(step, sum(self._recent_losses) / len(self._recent_losses), lr)
                self._recent_losses.clear()
        self.logger.step(self._images, looked[-1].loss, steps=len(looked))
        if self.saves.ready():
            steps, seconds = self.saves.decide(self.rt)
            self.logger.print(f"checkpoint every {steps} steps (about {steps * seconds:.0f} s of training)")

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Under DDP every rank must stop at the same step: a flag raised on any rank holds on all."""
        if not self.rt.distributed:
            return flags
        votes = torch.tensor([float(f) for f in flags], device=self.rt.device)
        return tuple(v > 0 for v in runtime.all_reduce_sum(votes).tolist())

    def _validate(self, model: nn.Module) -> EvalResult | None:
        if self.val_loader is None:
            return None
        info, rt = self.info, self.rt
        return evaluate(model, self.val_loader, num_classes=info.num_classes, device=rt.device, amp_dtype=rt.amp_dtype)

    def _end_epoch(self) -> None:
        st = self.state
        epoch, global_step = st.epoch, st.global_step(len(self.train_loader))
        train = st.meter.result()
        val = self._validate(self.model)
        val_ema = self._validate(st.ema.module) if st.ema is not None else None
        with runtime.shared_errors(self.rt):
            self.guard.check_finite(st, f"after epoch {epoch + 1}", val.loss if val else train.loss, val_ema)
        # The weight average replaces the weights where it validates better; without a validation split it is
        # taken when there is one, and nothing is selected: the last epoch is the model.
        use_ema = st.ema is not None and (val is None or val_ema.accuracy > val.accuracy)
        accuracy = (val_ema if use_ema and val_ema else val or train).accuracy
        improved = val is None or accuracy > st.best["accuracy"]
        if improved:
            st.remember_best(accuracy, weights="ema" if use_ema else "raw")
        record = records.epoch_record(st, train, val, val_ema)
        st.history.append(record)
        st.grad_norms.append({"epoch": epoch, "norms": st.tracker.pop()})
        with runtime.shared_errors(self.rt):  # rank 0 writes; a full disk there must end every rank
            self.logger.log_epoch(record, global_step)
            self.logger.log_model(st.model, st.grad_norms[-1], global_step)
        line = records.epoch_line(
            record, self.epochs, seconds=st.epoch_seconds, val=val, val_ema=val_ema, improved=improved
        )
        self.logger.print(line)
        st.finish_epoch()
        self._stop_early_if_stalled(epoch)
        self._save_last()
        with runtime.shared_errors(self.rt):
            if improved:
                self.checkpoints.save_best(st)
        if self._agree(bool(self.signals.requested))[0]:
            self._stopped()

    def _stop_early_if_stalled(self, epoch: int) -> None:
        """``--patience``: no better validation accuracy for that many epochs after ``epoch`` ends the run
        (``finish`` then restores the best model)."""
        st, patience = self.state, self.cfg.patience
        if patience and epoch - st.best["epoch"] >= patience:
            self.logger.print(
                f"early stopping: no better validation accuracy for {patience} epochs; "
                f"best was epoch {st.best['epoch'] + 1} ({st.best['accuracy']:.2%})"
            )
            st.stopped_early = True

    def _save_last(self) -> None:
        """Write the whole state to last.pt, never a non-finite one. A collective under DDP."""
        rng = runtime.gather_rng_states(self.rt)
        meter = self.state.meter.summed_state()  # every rank's partial sums, so any world size resumes them
        with runtime.shared_errors(self.rt):
            self.guard.check_finite(self.state, "before saving", 0.0)
            self.checkpoints.save_last(self.state, meter=meter, rng=rng)

    def _stopped(self) -> None:
        st, name = self.state, self.signals.name or "a signal on another rank"
        where = f"step {st.step} of epoch {st.epoch + 1}" if st.step else f"the end of epoch {st.epoch}"
        message = (
            f"stopped by {name} at {where}; saved {self.checkpoints.last}; "
            f"continue with `reslab train --resume auto --out-dir {self.run_dir}`"
        )
        self.logger.end_epoch()
        if self.rt.is_main:
            print(message)
        raise TrainingStopped(message, self.signals.requested or 15)

    # --- finish ------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Test the best model (early stopping keeps it), write results.json and the final best.pt.

        Returns:
            The results: accuracies, losses, steps, seconds, and where and how the run ran.
        """
        st, cfg, info, rt = self.state, self.cfg, self.info, self.rt
        if st.best["state"] is not None:
            st.model.load_state_dict(st.best["state"])
        test = None
        if self.test_loader is not None:
            test = evaluate(
                self.model,
                self.test_loader,
                num_classes=info.num_classes,
                device=rt.device,
                amp_dtype=rt.amp_dtype,
                tta_flip=cfg.tta_flip,
                tta_translate=cfg.tta_translate,
            )
        results = records.run_results(
            cfg,
            rt,
            self.bundle,
            st,
            test,
            steps=total_steps(cfg, len(self.train_loader)),
            wall_seconds=time.perf_counter() - self.wall_start,
            run_dir=self.run_dir,
        )
        with runtime.shared_errors(rt):
            if rt.is_main:
                self._write_results(results, test)
        return results

    def _write_results(self, results: dict, test: EvalResult | None) -> None:
        """Rank 0: the final best.pt (with the results in it) and results.json."""
        self.checkpoints.save_final(self.state, results)
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if test:
            self.logger.print(
                f"test accuracy {test.accuracy:.2%} (best epoch {self.state.best['epoch'] + 1}); "
                f"run folder {self.run_dir}"
            )


def _train_step(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    state: TrainState,
    model: nn.Module,
    window: StepWindow,
    loss_fn: nn.Module,
    rt: runtime.Runtime,
    host_checked: bool,
    look: Callable[[], None] | None,
) -> None:
    """One training step, queued on the device without waiting for it: the divergence check stays on the
    device and the fused optimizer skips the step if it failed (``guard.py``); the host reads ``window`` later.
    Where the host must look first (``host_checked``) it calls ``look`` (None: ``window.read``)."""
    rng_before = torch.get_rng_state()  # a replay of a diverging step draws the same drop-path masks
    loss, logits = forward_backward(
        model, x, y, loss_fn, state.optimizer, device=rt.device, amp_dtype=rt.amp_dtype, scaler=state.scaler
    )
    norms = state.tracker.norms()
    found_inf = window.check(state.step, loss, norms if state.scaler is None else None, rng_before)
    if host_checked:  # fp16's loss scaler, or an optimizer without found_inf: look before it steps
        look() if look is not None else window.read()
    else:
        state.optimizer.found_inf = found_inf
    if norms is not None:
        state.tracker.add(norms)
    state.meter.add(loss, logits, y)
    optimizer_step(state.optimizer, state.scheduler, state.scaler)
    if state.ema is not None:
        state.ema.update(state.model)
