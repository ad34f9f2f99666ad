"""``fit``: a training run as setup, a loop of epochs, and a finish.

Validation split, train-only augmentation, seeding, early stopping that restores the best model, per-batch
schedules, TensorBoard, atomic self-describing checkpoints, exact resume from any step, DDP. Files in the run
folder:

- ``last.pt``: the whole training state (``TrainState``), written at each epoch's end, every
  ``save_every_steps`` steps inside an epoch, and on SIGTERM / SIGINT; ``last.prev.pt`` is the one before,
  kept in case the newest is damaged. Resume with ``--resume auto`` (or a path).
- ``best.pt``: the model with the best validation accuracy (what ``eval`` and ``predict`` use).
- ``results.json``: the final numbers; ``metrics.jsonl``: per-epoch numbers; ``grad_norms.jsonl``: per-epoch
  gradient norm of every parameter; ``tensorboard/``: curves; ``bad_images.txt``: image-folder files skipped.

Every step is checked before the optimizer applies it: a non-finite or exploding loss or a non-finite gradient
stops the run there, names the first layer that went non-finite, and nothing non-finite is ever saved.

Determinism: the data of step ``s`` of epoch ``e`` is a function of (seed, e, s, rank), and the global RNG
state (stochastic depth) is checkpointed, so a run killed at any point and resumed ends with the same weights
and metrics as one that never stopped, on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.checkpoint import FORMAT, atomic_save, clean_stale_temp_files, previous_path, resolve_resume
from reslab.data import DataBundle, load_dataset
from reslab.data.types import subset_of_train
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.models.pretrained import Pretrained, load_pretrained, read_pretrained
from reslab.train import budget, finetuning, runtime
from reslab.train.config import TrainConfig, check_resumable
from reslab.train.divergence import diagnose, nonfinite_entries
from reslab.train.ema import ModelEma
from reslab.train.engine import EpochMeter, EvalResult, evaluate, forward_backward, optimizer_step
from reslab.train.guard import StepRecord, StepWindow
from reslab.train.loaders import build_loaders
from reslab.train.logging import GradNormTracker, RunLogger
from reslab.train.optim import build_optimizer, build_scheduler, scaled_lr, total_steps
from reslab.train.signals import StopSignals, TrainingStopped
from reslab.train.state import TrainState

AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def fit(cfg: TrainConfig, *, resume: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset``; returns the final results (also written to results.json).

    ``resume``: a ``last.pt`` to continue from, or ``"auto"`` for the run folder's newest good checkpoint
    (a new run when there is none).
    """
    rt = runtime.setup(cfg.device, cfg.amp, cfg.channels_last)
    try:
        with StopSignals(announce=_announcer(rt)) as signals:
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
    written."""
    rt = runtime.setup(cfg.device, cfg.amp, cfg.channels_last)
    try:
        return Trainer.measure(cfg, rt)
    finally:
        runtime.teardown()


def _announcer(rt: runtime.Runtime):
    return print if rt.is_main else (lambda message: None)


class Trainer:
    """One run: ``Trainer(...)`` sets it up (or restores it), ``train()`` runs the epochs, ``finish()`` tests."""

    def __init__(self, cfg: TrainConfig, rt: runtime.Runtime, resume, signals: StopSignals) -> None:
        self._begin(cfg, rt)
        self.signals = signals
        # Under DDP, an error on any rank in these blocks ends every rank with that one error (runtime.py).
        if resume is None:  # a user's error in the weights before anything of an older run is deleted
            self._read_weights()
        with runtime.shared_errors(rt):
            self.resumed_from, ckpt = self._checkpoint_to_resume(resume)
        self._load(ckpt)
        cfg = self.cfg
        with runtime.shared_errors(rt):
            self._check_same_data(ckpt)
            model, optimizer = self._new_model(load_weights=ckpt is None)
            self._prepare_loop(optimizer)
        if self.cfg.budget and not self.cfg.steps:  # the probe runs collectives under DDP: outside those blocks
            self.cfg = cfg = dataclasses.replace(self.cfg, steps=self._steps_for_budget(model))
        with runtime.shared_errors(rt):
            finetuning.check_finetune_fits(cfg, len(self.train_loader), total_steps(cfg, len(self.train_loader)))
            self.state = self._state_of(model, optimizer)
            if ckpt is not None:
                self.state.load_state_dict(ckpt, rank=rt.rank)
                self.state.stopped_early &= cfg.patience > 0  # early stopping ended it; without patience, go on
                runtime.restore_rng_states(ckpt["rng"], rt)
        self.model = self._wrap(self.state.model)  # DDP's constructor is a collective: outside the blocks
        self.save_every = cfg.save_every_steps  # 0: decided after the first steps (_decide_save_interval)
        # Steps and seconds of this process after its first look, for the auto checkpoint interval: the first
        # window holds one-off costs (torch.compile's compilation, allocator and kernel warm-up).
        self._steps_run, self._seconds_run, self._warm = 0, 0.0, False
        with runtime.shared_errors(rt):
            self.logger = self._make_logger(fresh=ckpt is None)
            self._announce()

    @classmethod
    def measure(cls, cfg: TrainConfig, rt: runtime.Runtime) -> tuple[budget.RunCosts, int]:
        """What a step, an epoch's end and the final test of a run of ``cfg`` cost here (as ``--budget`` measures
        them) and its steps per epoch; nothing is trained or written. For one step count shared by several runs
        (``reslab explain degradation``)."""
        trainer = cls.__new__(cls)
        trainer._begin(dataclasses.replace(cfg, budget="", steps=0), rt)
        trainer._load()
        model, optimizer = trainer._new_model()
        trainer._prepare_loop(optimizer)
        setup = time.perf_counter() - trainer.wall_start  # what the run itself will spend before its first step
        costs = dataclasses.replace(trainer._measure_costs(model, for_budget=cfg.budget), setup_seconds=setup)
        return costs, len(trainer.train_loader)

    # --- setup -------------------------------------------------------------------------------------------
    def _begin(self, cfg: TrainConfig, rt: runtime.Runtime) -> None:
        self.wall_start = time.perf_counter()
        # The config as it runs here: "auto" replaced by what this machine chose. Checkpoints store this one.
        self.cfg = dataclasses.replace(
            cfg, device=rt.device.type, amp=AMP_NAMES[rt.amp_dtype], channels_last=rt.channels_last
        )
        self.rt, self.run_dir = rt, self.cfg.run_dir()
        self.budget_note: str | None = None  # what a budget fixed, said once the logger is there
        self.pretrained: Pretrained | None = None  # cfg.weights, once read (_read_weights)
        finetuning.check_parts(self.cfg)  # --freeze names, before anything is read or written

    def _read_weights(self) -> None:
        """``cfg.weights``, read once (on every rank: an error on one ends all) into ``self.pretrained``."""
        if self.cfg.weights and self.pretrained is None:
            cfg = self.cfg
            self.pretrained = runtime.on_every_rank(
                lambda: read_pretrained(cfg.weights, cfg.model, download=cfg.download), self.rt
            )

    def _load(self, ckpt: dict | None = None) -> None:
        """Seed, read the data, and set up what every step uses: the loss and the divergence window. A resumed
        run (``ckpt``) takes its input preprocessing from its checkpoint, and never reads its weights again."""
        cfg, rt = self.cfg, self.rt
        runtime.seed_everything(cfg.seed + rt.rank)
        if ckpt is None:  # pretrained weights come with the input they expect: read before the data, which takes it
            self._read_weights()
        self.bundle = self._load_data(ckpt)
        self.info = self.bundle.info
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.max_loss = cfg.max_loss or 100 * math.log(max(self.info.num_classes, 2))
        self.window = StepWindow(rt.device, self.max_loss, distributed=rt.distributed)

    def _checkpoint_to_resume(self, resume) -> tuple[Path | None, dict | None]:
        if self.rt.is_main:
            for path in clean_stale_temp_files(self.run_dir):
                print(f"removed {path}, left by a run killed while saving")
        if resume is not None:
            path, ckpt, messages = resolve_resume(str(resume), self.run_dir)
            for message in messages:
                _announcer(self.rt)(message)
            if ckpt is not None:
                self._adopt_budgeted_steps(ckpt["config"])
                check_resumable(ckpt["config"], self.cfg)
                self._set_aside_damaged(path)
                return path, ckpt
        if (self.run_dir / "last.pt").exists() and not self.cfg.overwrite:
            raise ReslabError(
                f"{self.run_dir} already holds a run; continue it with --resume auto (or --resume "
                f"{self.run_dir / 'last.pt'}), or pass --out-dir NEW or --overwrite"
            )
        if self.rt.is_main:  # --overwrite: no state of the run before may be taken for this one's
            for name in ("last.pt", "last.prev.pt", "last.damaged.pt"):
                (self.run_dir / name).unlink(missing_ok=True)
        return None, None

    def _adopt_budgeted_steps(self, saved: dict[str, Any]) -> None:
        """Resuming a budgeted run from its recipe (``--resume auto``): the step count its budget fixed when it
        started holds, not a new measurement (which would change the schedule, and so every step after)."""
        if not (self.cfg.budget and not self.cfg.steps and saved.get("budget")):
            return
        if budget.parse_budget(saved["budget"]) == budget.parse_budget(self.cfg.budget):  # "90" is "90s", "1m30s"
            self.cfg = dataclasses.replace(self.cfg, steps=saved.get("steps", 0), budget=saved["budget"])

    def _set_aside_damaged(self, resumed: Path) -> None:
        """Resuming from last.prev.pt because last.pt is damaged: keep that good file as the next save's backup."""
        last = self.run_dir / "last.pt"
        if self.rt.is_main and last.exists() and Path(resumed).resolve() == previous_path(last).resolve():
            last.replace(self.run_dir / "last.damaged.pt")
            print(f"moved the damaged {last} to {self.run_dir / 'last.damaged.pt'}")

    def _load_data(self, ckpt: dict | None = None) -> DataBundle:
        cfg = self.cfg
        if ckpt is not None and (cfg.weights or cfg.mean):
            preprocessing = finetuning.recorded_preprocessing(ckpt["dataset"])
        else:
            preprocessing, lines = finetuning.preprocessing(cfg, self.pretrained)
            for line in lines:
                _announcer(self.rt)(line)

        def load() -> DataBundle:
            bundle = load_dataset(
                cfg.dataset,
                data_dir=cfg.data_dir,
                val_ratio=cfg.val_ratio,
                seed=cfg.seed,
                download=cfg.download,
                image_size=cfg.image_size,
                in_chans=cfg.in_chans,
                on_bad_image=cfg.on_bad_image,
                max_image_pixels=cfg.max_image_pixels,
                preprocessing=preprocessing,
            )
            if cfg.train_subset:
                bundle.train = subset_of_train(bundle, cfg.train_subset, cfg.seed)
            return bundle

        bundle = runtime.on_every_rank(load, self.rt)  # a user error on one rank ends every rank alike
        with runtime.shared_errors(self.rt):
            if bundle.bad_files and self.rt.is_main:
                from reslab.data.verify import write_bad_images

                listing = write_bad_images(bundle.bad_files, self.run_dir)
                print(f"skipped {len(bundle.bad_files)} unreadable image(s), listed in {listing}")
        return bundle

    def _data_sizes(self) -> dict[str, int]:
        """Images per split: saved in checkpoints, compared when a run resumes."""
        splits = {"train": self.bundle.train, "val": self.bundle.val, "test": self.bundle.test}
        return {name: len(split) if split is not None else 0 for name, split in splits.items()}

    def _check_same_data(self, ckpt: dict | None) -> None:
        """A resumed run must see the data its checkpoint saw: a file removed since would change every split."""
        saved = (ckpt or {}).get("data_sizes")
        if saved is not None and saved != self._data_sizes():
            raise ReslabError(
                f"the data changed since {self.resumed_from} was saved (images per split then {saved}, now "
                f"{self._data_sizes()}); restore the files to continue, or start a new run (--overwrite)"
            )

    def _new_model(self, *, load_weights: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The model (from ``cfg.weights`` unless ``load_weights`` is False: a resumed run's come from its
        checkpoint), its ``--freeze`` parts frozen, and an optimizer over the parts that may train."""
        cfg, rt, info = self.cfg, self.rt, self.info
        model_args = {"num_classes": info.num_classes, "in_chans": info.channels, **cfg.model_args}
        model = create_model(cfg.model, **model_args)
        if self.pretrained is not None and load_weights:
            load_pretrained(model, self.pretrained, force=cfg.force_weights, say=_announcer(rt))
        frozen = finetuning.permanently_frozen(cfg, list(getattr(model, "part_names", [])))
        if frozen:
            model.freeze(frozen)
            _announcer(rt)(f"frozen for the whole run: {', '.join(frozen)} (BatchNorm statistics too)")
        model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
        return model, build_optimizer(model, cfg, rt.device, rt.world_size)

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
            self.model = self._wrap(model)

    def _prepare_loop(self, optimizer: torch.optim.Optimizer) -> None:
        """The loaders, and whether the host checks each step itself: it looks before the optimizer applies a
        step where the device cannot skip one by itself (fp16, whose GradScaler owns the optimizer's found_inf,
        or an optimizer without a fused kernel)."""
        self.host_checked = self.rt.amp_dtype == torch.float16 or not optimizer.defaults.get("fused")
        self.train_loader, self.val_loader, self.test_loader = build_loaders(self.bundle, self.cfg, self.rt)

    def _state_of(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
        """A new run's state for ``model`` and its optimizer: the schedule over this run's steps, and the rest."""
        cfg, device = self.cfg, self.rt.device
        return TrainState(
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg, len(self.train_loader)),
            scaler=torch.amp.GradScaler(device.type) if self.rt.amp_dtype == torch.float16 else None,
            meter=EpochMeter(device),
            tracker=GradNormTracker(model),
            ema=ModelEma(model, cfg.ema_decay) if cfg.ema_decay else None,
        )

    def _steps_for_budget(self, model: nn.Module) -> int:
        """The step count that fits ``cfg.budget`` from this run's start: measured on a copy of the model, so the
        run then trains exactly as one given ``--steps`` with that count."""
        costs = self._measure_costs(model)
        spent = time.perf_counter() - self.wall_start
        if self.rt.distributed:  # every rank plans from the same numbers, so every rank takes the same count
            spent = float(runtime.all_reduce_sum(torch.tensor(spent, device=self.rt.device))) / self.rt.world_size
        with runtime.shared_errors(self.rt):
            steps, self.budget_note = budget.plan(self.cfg, spent, [costs], len(self.train_loader))
        return steps

    def _measure_costs(self, model: nn.Module, for_budget: str | None = None) -> budget.RunCosts:
        """``budget.probe`` of this run, with its own step (``_probe_step``), for ``for_budget`` (``cfg.budget``
        when None); under DDP the ranks' mean."""
        cfg, rt = self.cfg, self.rt
        sizes = self._data_sizes()
        loaders = (self.train_loader, self.val_loader, self.test_loader)
        costs = budget.probe(
            model,
            self._probe_step,
            loaders,
            cfg,
            rt,
            num_classes=self.info.num_classes,
            eval_images=(sizes["val"], sizes["test"]),
            budget=for_budget,
        )
        if rt.distributed:  # every rank must take the same count: plan with the mean of their measurements
            mean = runtime.all_reduce_sum(torch.tensor(list(vars(costs).values()), device=rt.device)) / rt.world_size
            costs = budget.RunCosts(*mean.tolist()[:-1], save_every_steps=cfg.save_every_steps)
        return costs

    def _probe_step(self, copy: nn.Module):
        """This run's own training step (``_step``) on ``copy``, a copy of the model, with an optimizer, schedule,
        meters and divergence window of its own: what the budget's probe times. The run's state is not touched."""
        state = self._state_of(copy, build_optimizer(copy, self.cfg, self.rt.device, self.rt.world_size))
        model, window = self._wrap(copy), StepWindow(self.rt.device, self.max_loss, distributed=self.rt.distributed)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            self._step(x, y, state=state, model=model, window=window)
            state.step += 1

        return step

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # dynamic=False: a shape seen twice (progressive sizes, the last partial batch) gets kernels of its own
        # rather than one slower shape-generic graph for every size.
        return torch.compile(model, dynamic=False) if self.cfg.compile else model

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
        cfg, rt, info, bundle = self.cfg, self.rt, self.info, self.bundle
        n_params = sum(p.numel() for p in self.state.model.parameters())
        n_val, n_test = (len(s) if s is not None else 0 for s in (bundle.val, bundle.test))
        self.logger.print(
            f"{cfg.model} ({n_params / 1e6:.2f}M params) on {info.name}: "
            f"{len(bundle.train)} train / {n_val} val / {n_test} test images; "
            f"{rt.device.type} x{rt.world_size}, {'float32' if cfg.amp == 'off' else cfg.amp}, "
            f"{'channels-last' if rt.channels_last else 'channels-first'}{', compiled' if cfg.compile else ''}"
        )
        if cfg.lr_reference_batch:
            global_batch, used = cfg.batch_size * rt.world_size, self.state.scheduler.base_lrs[-1]
            kept = "" if used == scaled_lr(cfg, rt.world_size) else "; the resumed run keeps its checkpoint's lr"
            self.logger.print(
                f"lr {used:.4g}: {cfg.lr:g} at batch {cfg.lr_reference_batch}, "
                f"scaled linearly to the global batch of {global_batch}{kept}"
            )
        sizes, tested = cfg.progressive_sizes, info.image_size[0]
        if sizes and sizes[-1] != tested:
            self.logger.print(f"note: training ends at {sizes[-1]} px (progressive_sizes); tests are at {tested} px")
        if self.budget_note:
            self.logger.print(self.budget_note)
        if self.resumed_from is not None:
            st = self.state
            self.logger.print(f"resumed from {self.resumed_from} at step {st.step} of epoch {st.epoch + 1}")
        self.logger.log_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self) -> None:
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
            saved = self._saved_hint()
            if self.rt.is_main and saved:
                print(f"interrupted; {saved}")
            raise

    def _train_epoch(self) -> None:
        if self.cfg.finetune:
            self._freeze_for_epoch()
        st, steps = self.state, self._steps_in_epoch(self.state.epoch)
        self.train_loader.set_epoch(st.epoch, st.step)
        self.logger.start_epoch(st.epoch, self.epochs, steps, done=st.step)
        self._recent_losses: list[float] = []
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
                if st.step < steps and self._save_due():
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
        """One training step, queued on the device without waiting for it: the divergence check stays on the
        device and the fused optimizer skips the step if it failed (``guard.py``); the host reads it later.
        ``state``, ``model`` and ``window`` default to the run's own (the budget's probe passes a copy's)."""
        st, model, window, rt = state or self.state, model or self.model, window or self.window, self.rt
        rng_before = torch.get_rng_state()  # a replay of a diverging step draws the same drop-path masks
        loss, logits = forward_backward(
            model, x, y, self.loss_fn, st.optimizer, device=rt.device, amp_dtype=rt.amp_dtype, scaler=st.scaler
        )
        norms = st.tracker.norms()
        found_inf = window.check(st.step, loss, norms if st.scaler is None else None, rng_before)
        if self.host_checked:  # fp16's loss scaler, or an optimizer without found_inf: look before it steps
            self._sync() if window is self.window else window.read()
        else:
            st.optimizer.found_inf = found_inf
        if norms is not None:
            st.tracker.add(norms)
        st.meter.add(loss, logits, y)
        optimizer_step(st.optimizer, st.scheduler, st.scaler)
        if st.ema is not None:
            st.ema.update(st.model)

    def _sync_due(self, steps: int) -> bool:
        """Whether the host reads the window after this step: every ``sync_every_steps`` steps, at the epoch's
        end, before a checkpoint, and (one process) as soon as a stop is asked for. The same steps on every rank."""
        st = self.state
        asked = not self.rt.distributed and bool(self.signals.requested)
        return st.step % self.cfg.sync_every_steps == 0 or st.step == steps or self._save_due() or asked

    def _sync(self) -> None:
        """Read the steps since the last look (one host synchronization): stop at the first bad one, or log
        them and move the progress bar."""
        st, steps = self.state, len(self.train_loader)
        records = self.window.read()
        if not records:
            return
        bad = next((r for r in records if r.bad), None)
        if bad is not None:
            with runtime.shared_errors(self.rt):
                self._diverged(bad)
        now = time.perf_counter()
        st.epoch_seconds += now - self._started
        if self._warm:
            self._steps_run += len(records)
            self._seconds_run += now - self._started
        self._warm, self._started = True, now
        first = st.epoch * steps
        for record in records:
            self._recent_losses.append(record.loss)
            step = first + record.step + 1  # global steps done after this one: the same whether resumed or not
            if step % self.cfg.log_every_steps == 0:
                lr = st.scheduler.base_lrs[-1] * st.scheduler.lr_lambdas[-1](step)  # after that step (the head's: last)
                self.logger.log_step(step, sum(self._recent_losses) / len(self._recent_losses), lr)
                self._recent_losses.clear()
        self.logger.step(self._images, records[-1].loss, steps=len(records))
        if not self.save_every and self._steps_run >= 5:
            self.save_every = self._decide_save_interval()

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Under DDP every rank must stop at the same step: a flag raised on any rank holds on all."""
        if not self.rt.distributed:
            return flags
        votes = torch.tensor([float(f) for f in flags], device=self.rt.device)
        return tuple(v > 0 for v in runtime.all_reduce_sum(votes).tolist())

    def _save_due(self) -> bool:
        return bool(self.save_every) and self.state.step % self.save_every == 0

    def _decide_save_interval(self) -> int:
        """save_every_steps=0: once 5 steps after this process's first look are timed, the number of steps in
        about a minute."""
        seconds_per_step = self._seconds_run / self._steps_run
        steps = max(1, round(budget.AUTO_SAVE_SECONDS / max(seconds_per_step, 1e-6)))
        if self.rt.distributed:  # the same interval on every rank: saving gathers RNG states from all of them
            steps = int(runtime.all_reduce_sum(torch.tensor(float(steps), device=self.rt.device)) / self.rt.world_size)
        steps = max(steps, 1)
        self.logger.print(f"checkpoint every {steps} steps (about {steps * seconds_per_step:.0f} s of training)")
        return steps

    def _validate(self, model: nn.Module) -> EvalResult | None:
        if self.val_loader is None:
            return None
        info, rt = self.info, self.rt
        return evaluate(model, self.val_loader, num_classes=info.num_classes, device=rt.device, amp_dtype=rt.amp_dtype)

    def _end_epoch(self) -> None:
        st, cfg = self.state, self.cfg
        epoch, global_step = st.epoch, st.global_step(len(self.train_loader))
        train = st.meter.result()
        val = self._validate(self.model)
        val_ema = self._validate(st.ema.module) if st.ema is not None else None
        with runtime.shared_errors(self.rt):
            self._check_finite(f"after epoch {epoch + 1}", val.loss if val else train.loss, val_ema)
        # The weight average replaces the weights where it validates better; without a validation split it is
        # taken when there is one, and nothing is selected: the last epoch is the model.
        use_ema = st.ema is not None and (val is None or val_ema.accuracy > val.accuracy)
        accuracy = (val_ema if use_ema and val_ema else val or train).accuracy
        improved = val is None or accuracy > st.best["accuracy"]
        if improved:
            st.remember_best(accuracy, weights="ema" if use_ema else "raw")
        record = {
            "epoch": epoch,
            "train_loss": train.loss,
            "train_acc": train.accuracy,
            "val_loss": val.loss if val else None,
            "val_acc": val.accuracy if val else None,
            "lr": st.optimizer.param_groups[-1]["lr"],  # the head's (layer decay)
            "train_images": train.images,
            "seconds": round(st.epoch_seconds, 3),
            "images_per_second": round(train.images / max(st.epoch_seconds, 1e-9), 1),
        }
        if val_ema is not None:
            record.update(val_loss_ema=val_ema.loss, val_acc_ema=val_ema.accuracy)
        st.history.append(record)
        st.grad_norms.append({"epoch": epoch, "norms": st.tracker.pop()})
        with runtime.shared_errors(self.rt):  # rank 0 writes; a full disk there must end every rank
            self.logger.log_epoch(record, global_step)
            self.logger.log_model(st.model, st.grad_norms[-1], global_step)
        val_text = f"val loss {val.loss:.4f} acc {val.accuracy:.2%}" if val else "no validation split"
        if val_ema is not None:
            val_text += f" (ema {val_ema.accuracy:.2%})"
        self.logger.print(
            f"epoch {epoch + 1:>3}/{self.epochs}  train loss {train.loss:.4f} acc {train.accuracy:.2%}  "
            f"{val_text}  {record['images_per_second']:.0f} img/s  {st.epoch_seconds:.1f}s"
            + ("  *" if improved else "")
        )
        st.finish_epoch()
        if cfg.patience and epoch - st.best["epoch"] >= cfg.patience:
            self.logger.print(
                f"early stopping: no better validation accuracy for {cfg.patience} epochs; "
                f"best was epoch {st.best['epoch'] + 1} ({st.best['accuracy']:.2%})"
            )
            st.stopped_early = True
        self._save_last()
        with runtime.shared_errors(self.rt):
            if improved and self.rt.is_main:
                atomic_save(self._model_checkpoint(st.best["epoch"], st.best["state"]), self.run_dir / "best.pt")
        if self._agree(bool(self.signals.requested))[0]:
            self._stopped()

    # --- checkpoints -------------------------------------------------------------------------------------
    def _header(self) -> dict[str, Any]:
        """What every checkpoint says about itself, so eval, predict and resume rebuild the exact run."""
        return {
            "format": FORMAT,
            "model_name": self.cfg.model,
            "model_config": self.state.model.config,
            "dataset": dataclasses.asdict(self.info),
            "config": self.cfg.to_dict(),
            "data_sizes": self._data_sizes(),
        }

    def _model_checkpoint(self, epoch: int, weights: dict) -> dict[str, Any]:
        st = self.state
        best = {k: v for k, v in st.best.items() if k != "state"}
        return {
            **self._header(),
            "epoch": epoch,
            "model": weights,
            "history": st.history,
            "grad_norms": st.grad_norms,
            "best": best,
        }

    def _save_last(self) -> None:
        """Write the whole state to last.pt (the previous one becomes last.prev.pt). A collective under DDP."""
        rng = runtime.gather_rng_states(self.rt)
        meter = self.state.meter.summed_state()  # every rank's partial sums, so any world size resumes them
        with runtime.shared_errors(self.rt):
            self._check_finite("before saving", 0.0)
            if self.rt.is_main:
                state = {**self._header(), **self.state.state_dict(), "meter": meter, "rng": rng}
                atomic_save(state, self.run_dir / "last.pt", keep_previous=True)

    def _saved_hint(self) -> str:
        """Where the saved work is: only files that exist."""
        last, best = self.run_dir / "last.pt", self.run_dir / "best.pt"
        parts = []
        if last.exists():
            parts.append(f"the last good state is in {last}: continue with `reslab train --resume {last}`")
        if best.exists():
            parts.append(f"the best model so far is {best}")
        return "; ".join(parts)

    def _stopped(self) -> None:
        st, name = self.state, self.signals.name or "a signal on another rank"
        where = f"step {st.step} of epoch {st.epoch + 1}" if st.step else f"the end of epoch {st.epoch}"
        message = (
            f"stopped by {name} at {where}; saved {self.run_dir / 'last.pt'}; "
            f"continue with `reslab train --resume auto --out-dir {self.run_dir}`"
        )
        self.logger.end_epoch()
        if self.rt.is_main:
            print(message)
        raise TrainingStopped(message, self.signals.requested or 15)

    # --- divergence --------------------------------------------------------------------------------------
    def _check_finite(self, when: str, loss: float, val_ema: EvalResult | None = None) -> None:
        """A non-finite weight, BatchNorm statistic or validation loss (of the weights or of their average) ends
        the run before anything is saved."""
        ema = self.state.ema
        entries = nonfinite_entries(self.state.model)
        entries += [f"the weight average's {name}" for name in nonfinite_entries(ema.module)] if ema is not None else []
        problems = [f"{name} holds non-finite values" for name in entries]
        if not math.isfinite(loss):
            problems.append(f"the validation loss is {loss}")
        if val_ema is not None and not math.isfinite(val_ema.loss):
            problems.append(f"the weight average's validation loss is {val_ema.loss}")
        if problems:
            raise ReslabError(
                f"training diverged {when}: {problems[0]}; nothing of it was saved. {self._restart_hint()}"
            )

    def _diverged(self, bad: StepRecord) -> None:
        """Stop at ``bad``, the first diverged step: its batch is replayed on the weights it saw (the optimizer
        skipped it and every step after it), with its random state, to name the layer that went non-finite."""
        st, rt, loss = self.state, self.rt, bad.loss
        try:
            self.train_loader.set_epoch(st.epoch, bad.step)  # a step's batch is a function of (seed, epoch, step)
            x, y = next(iter(self.train_loader))
            torch.set_rng_state(bad.rng_state)
            scale = st.scaler.get_scale() if st.scaler is not None else 1.0  # fp16 overflowed at this scale
            found = diagnose(
                st.model,
                x,
                y,
                self.loss_fn,
                amp_dtype=rt.amp_dtype,
                device_type=rt.device.type,
                grad_scale=scale,
                max_loss=self.max_loss,
            ).message
        except Exception as err:  # the replay itself failed (out of memory, say): the divergence is still the news
            found = f"replaying the batch to find the layer failed ({type(err).__name__})"
        limit = f" (above --max-loss {self.max_loss:.3g})" if math.isfinite(loss) and loss > self.max_loss else ""
        raise ReslabError(
            f"training diverged at step {bad.step + 1} of epoch {st.epoch + 1}: the loss was {loss:.4g}{limit}; "
            f"{found}. {self._restart_hint()}"
        )

    def _restart_hint(self) -> str:
        saved = self._saved_hint()
        return (
            f"Lower --lr (or add --warmup-epochs) and start again; {saved}" if saved else "Lower --lr and start again"
        )

    # --- finish ------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Test the best model (early stopping keeps it), write results.json and the final best.pt."""
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
        results = {
            "model": cfg.model,
            "dataset": info.name,
            "epochs_run": len(st.history),
            "stopped_early": st.stopped_early,
            "best_epoch": st.best["epoch"] + 1,
            "best_val_acc": st.best["accuracy"] if self.val_loader is not None else None,
            "best_weights": st.best.get("weights", "raw"),  # "ema": the weight average validated better
            "test_acc": test.accuracy if test else None,
            "test_loss": test.loss if test else None,
            "test_per_class_acc": dict(zip(info.classes, test.per_class_accuracy, strict=True)) if test else None,
            "train_seconds": round(sum(r["seconds"] for r in st.history), 2),
            "train_images": sum(r["train_images"] for r in st.history),
            "steps": total_steps(cfg, len(self.train_loader)),
            "budget": cfg.budget or None,
            "wall_seconds": round(time.perf_counter() - self.wall_start, 2),
            "device": f"{rt.device.type} x{rt.world_size}",
            "amp": "float32" if cfg.amp == "off" else cfg.amp,
            "channels_last": rt.channels_last,
            "run_dir": str(self.run_dir),
        }
        with runtime.shared_errors(rt):
            if rt.is_main:
                self._write_results(results, test)
        return results

    def _write_results(self, results: dict, test) -> None:
        """Rank 0: the final best.pt (with the results in it) and results.json."""
        st = self.state
        final = self._model_checkpoint(st.best["epoch"], st.model.state_dict())
        atomic_save({**final, "results": results}, self.run_dir / "best.pt")
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if test:
            self.logger.print(
                f"test accuracy {test.accuracy:.2%} (best epoch {st.best['epoch'] + 1}); run folder {self.run_dir}"
            )
