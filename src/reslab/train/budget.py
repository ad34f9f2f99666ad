"""Budgeted training: as many optimizer steps as fit a wall-clock budget, with the schedule fitted to them.

Li et al. (ICLR 2020, "Budgeted Training: Rethinking Deep Neural Network Training Under Resource Constraints")
found that at a small budget the schedule must know where it ends: a linear decay of the learning rate to zero
at the last step beat every schedule tuned for a longer run. So a budget is turned into a step count *before*
training starts: a probe times a few steps of a throw-away copy of the model on the run's own first batches, and
one pass of validation, a checkpoint and the test, then ``steps_within`` picks the largest step count whose
training, per-epoch work and final test fit the budget. The probe touches neither the model, nor the optimizer,
nor the random state, so a run with ``--budget`` trains exactly what a run with ``--steps N`` (the count it
printed and recorded) trains, on any machine.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.train.guard import StepWindow
from reslab.train.optim import build_optimizer
from reslab.train.parts import RunParts, data_sizes, wrap
from reslab.train.runtime import all_reduce_sum, shared_errors
from reslab.train.state import TrainState

# h, then m, then s, each at most once: "90s", "4m", "1.5h", "1h30m", "2m30s", or plain seconds ("90").
_DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?")
SAFETY = 0.95  # the step count is fitted to 95% of the budget: a shared CPU's speed drifts by a few percent
# How long the probe times steps: 0.5% of the budget, within these bounds. A shared 2-core CPU's step time varies
# by +-15% from step to step and drifts over minutes: a probe of 1.5 s (4 steps of a 56-layer net) measured a
# step 15% shorter than the run then took, and a 20-minute experiment ran 19% over its budget.
PROBE_SECONDS = (1.5, 10.0)
AUTO_SAVE_SECONDS = 60.0  # save_every_steps=0: the trainer checkpoints about this often, so a kill loses at most this


class SaveInterval:
    """How often a run checkpoints inside an epoch: ``save_every_steps``, or with 0 the steps in about
    ``AUTO_SAVE_SECONDS`` of this process's own training, decided once 5 steps are timed.

    The steps of the first look are left out: they hold one-off costs (torch.compile's compilation, allocator
    and kernel warm-up) that would make a run checkpoint every few steps.
    """

    def __init__(self, every_steps: int) -> None:
        self.every_steps = every_steps  # 0: not decided yet
        self.steps_run, self.seconds_run, self.warm = 0, 0.0, False

    def due(self, step: int) -> bool:
        """Whether a checkpoint is written after ``step`` steps of the epoch."""
        return bool(self.every_steps) and step % self.every_steps == 0

    def count(self, steps: int, seconds: float) -> None:
        """The host looked at ``steps`` more steps, which took ``seconds``."""
        if self.warm:
            self.steps_run += steps
            self.seconds_run += seconds
        self.warm = True

    def ready(self) -> bool:
        """Whether an interval is to be decided now (``decide``)."""
        return not self.every_steps and self.steps_run >= 5

    def decide(self, rt) -> tuple[int, float]:
        """The interval in steps, the same on every rank (saving gathers every rank's random states), and the
        seconds a step took here."""
        seconds_per_step = self.seconds_run / self.steps_run
        steps = max(1, round(AUTO_SAVE_SECONDS / max(seconds_per_step, 1e-6)))
        if rt.distributed:
            steps = int(all_reduce_sum(torch.tensor(float(steps), device=rt.device)) / rt.world_size)
        self.every_steps = max(steps, 1)
        return self.every_steps, seconds_per_step


def parse_budget(text: str | float | int) -> float:
    """Seconds in a duration: ``"90s"``, ``"4m"``, ``"1.5h"``, ``"1h30m"``, or a plain number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        spec = str(text).strip().lower().replace(" ", "")
        if spec.startswith("-"):
            raise ReslabError(f"budget must be a positive duration, not {text!r}")
        found = _DURATION.fullmatch(spec)
        if not spec or found is None or not any(found.groups()):
            raise ReslabError(f"budget must be a duration such as 90s, 4m, 1h or 1h30m, not {text!r}")
        hours, minutes, rest = (float(v or 0) for v in found.group("h", "m", "s"))
        seconds = hours * 3600 + minutes * 60 + rest
    if not (math.isfinite(seconds) and seconds > 0):
        raise ReslabError(f"budget must be a positive duration, not {text!r}")
    return seconds


@dataclass(frozen=True)
class RunCosts:
    """What a run's time is made of, measured by ``probe``."""

    step_seconds: float  # one optimizer step (forward, backward, update) at the run's batch size
    epoch_seconds: float  # at each epoch's end: validation, checkpoints, logs
    final_seconds: float  # once at the end: the test set (with its test-time views)
    save_seconds: float  # one checkpoint written inside an epoch (about once a minute)
    setup_seconds: float = 0.0  # reading the data and building the model, for a run not yet started
    save_every_steps: int = 0  # the run's checkpoint interval inside an epoch; 0: about once a minute

    def total(self, steps: int, steps_per_epoch: int) -> float:
        """Seconds for a run of ``steps`` optimizer steps."""
        train = steps * self.step_seconds
        every = self.save_every_steps
        saves = (steps // every if every else math.floor(train / AUTO_SAVE_SECONDS)) * self.save_seconds
        epochs = math.ceil(steps / steps_per_epoch) * self.epoch_seconds
        return self.setup_seconds + train + epochs + saves + self.final_seconds


def steps_within(seconds: float, costs: Iterable[RunCosts], steps_per_epoch: int) -> int:
    """The largest step count N such that every run in ``costs`` trained for N steps fits in ``seconds`` together
    (0 when not even one step does)."""
    costs = list(costs)

    def needed(n: int) -> float:
        return sum(c.total(n, steps_per_epoch) for c in costs)

    high = max(int(seconds / max(sum(c.step_seconds for c in costs), 1e-9)), 0) + 1
    low = 0  # needed(low) fits (or low is 0), needed(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if needed(middle) <= seconds else (low, middle)
    return low if low and needed(low) <= seconds else 0


def probe_seconds(budget: str | None) -> float:
    """Seconds the probe spends timing steps for ``budget`` (``PROBE_SECONDS``)."""
    low, high = PROBE_SECONDS
    return min(max(0.005 * parse_budget(budget), low), high) if budget else low


def _timed(device: torch.device, work: Callable[[], object]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_steps(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    make_step: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], object]],
    *,
    device: torch.device,
    warmup: int = 3,
    min_seconds: float = 1.5,
    max_steps: int = 200,
) -> float:
    """Mean seconds of a training step, batch preparation included, on a deep copy of ``model`` (the model itself
    is left as it was).

    ``make_step(copy)`` returns the step function (forward, backward, optimizer update on the copy); the first
    ``warmup`` steps (allocation, kernel choice, compilation) are not timed; then steps are timed until
    ``min_seconds`` have passed (at least 3, at most ``max_steps``). The global random state (drop path draws
    from it) is restored afterwards, so the run that follows draws as if no probe had run.
    """
    rng = torch.get_rng_state()
    times: list[float] = []
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        step = make_step(copy.deepcopy(model))
        batches = iter(batches)
        for _ in range(warmup):
            step(*next(batches))
        while len(times) < max_steps and (len(times) < 3 or sum(times) < min_seconds):
            times.append(_timed(device, lambda: step(*next(batches))))
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return sum(times) / len(times)


def time_saving(state: dict, device: torch.device) -> float:
    """Seconds to serialize ``state`` (what a checkpoint write costs before the disk)."""
    return _timed(device, lambda: torch.save(state, io.BytesIO()))


def time_epoch_logs(model: nn.Module, hist_every: int) -> float:
    """Seconds an epoch's TensorBoard records of ``model`` take to build (a gradient-norm scalar per parameter,
    and a weight histogram per parameter every ``hist_every`` epochs), amortized over epochs."""
    from torch.utils.tensorboard.summary import histogram, scalar

    params = list(model.named_parameters())
    start = time.perf_counter()
    for name, _ in params:
        scalar(f"grad_norm/{name}", 1.0)
    seconds = time.perf_counter() - start
    if hist_every:
        # SummaryWriter's "tensorflow" bins: 1e-12 to 1e20 growing 10% a bucket, both signs.
        buckets = [1e-12 * 1.1**k for k in range(math.ceil(math.log(1e32) / math.log(1.1)))]
        bins = [-b for b in reversed(buckets)] + [0.0] + buckets
        start = time.perf_counter()
        for name, p in params:
            histogram(f"weights/{name}", p.detach().float().cpu().numpy(), bins)
        seconds += (time.perf_counter() - start) / hist_every
    return seconds


def time_per_image(evaluate_batches: Callable[[int], int], device: torch.device, batches: int = 2) -> float:
    """Seconds per image of an evaluation pass: ``evaluate_batches(k)`` evaluates the first k batches and returns
    how many images they held; one warm batch first."""
    evaluate_batches(1)
    images = 0

    def work() -> None:
        nonlocal images
        images = evaluate_batches(batches)

    seconds = _timed(device, work)
    return seconds / max(images, 1)


def probe(
    model: nn.Module,
    make_step: Callable[[nn.Module], Callable[[torch.Tensor, torch.Tensor], object]],
    loaders: tuple,
    cfg,
    rt,
    *,
    num_classes: int,
    eval_images: tuple[int, int],
    budget: str | None = None,
) -> RunCosts:
    """The ``RunCosts`` of training ``model`` (``num_classes`` outputs) with ``cfg`` on ``loaders`` (train, val,
    test; val and test may be None) in runtime ``rt``; under DDP the ranks' mean. ``make_step(copy)`` is the
    trainer's own step on a copy of the model (with its own optimizer, schedule and checks); ``eval_images``:
    (validation, test) images of the whole split (under DDP each rank evaluates its share, and the time per image
    is per image of the split); ``budget``: the budget planned from these costs (``cfg.budget`` when None), which
    sets how long steps are timed (``probe_seconds``)."""
    from reslab.train.engine import evaluate

    train, val, test = loaders

    def batches():  # the run's own first batches, epoch after epoch where one epoch is shorter than the probe
        for epoch in itertools.count():
            train.set_epoch(epoch, 0)
            yield from train

    # Under DDP every rank must take the same steps (each one is a collective): a fixed count, not a time.
    timing = 0.0 if rt.distributed else probe_seconds(budget or cfg.budget)
    step_seconds = time_steps(model, batches(), make_step, device=rt.device, min_seconds=timing)

    def per_image(loader, tta: bool) -> float:
        if loader is None:
            return 0.0

        def run(k: int) -> int:
            flip, translate = (cfg.tta_flip, cfg.tta_translate) if tta else (False, 0)
            batches = itertools.islice(loader, k)
            kwargs = dict(device=rt.device, amp_dtype=rt.amp_dtype, tta_flip=flip, tta_translate=translate)
            result = evaluate(model, batches, num_classes=num_classes, **kwargs)
            return int(result.confusion.sum())

        return time_per_image(run, rt.device)

    # A checkpoint of the training state holds the weights and about as much optimizer state again.
    save_seconds = 2 * time_saving(model.state_dict(), rt.device)
    # With a weight average (EMA) both the weights and their average are validated.
    val_seconds = per_image(val, tta=False) * eval_images[0] * (2 if cfg.ema_decay else 1)
    # Each epoch: validation, last.pt (weights and optimizer state) and best.pt (weights), and the logs.
    epoch_seconds = val_seconds + 1.5 * save_seconds + time_epoch_logs(model, cfg.hist_every)
    final_seconds = per_image(test, tta=True) * eval_images[1] + save_seconds
    costs = RunCosts(step_seconds, epoch_seconds, final_seconds, save_seconds, save_every_steps=cfg.save_every_steps)
    if rt.distributed:  # every rank must take the same count: plan with the mean of their measurements
        mean = all_reduce_sum(torch.tensor(list(vars(costs).values()), device=rt.device)) / rt.world_size
        costs = RunCosts(*mean.tolist()[:-1], save_every_steps=cfg.save_every_steps)
    return costs


def probe_run(parts: RunParts, rt, run_step: Callable[..., object], *, budget: str | None = None) -> RunCosts:
    """``probe`` of a run of ``parts``, timing ``run_step(x, y, state=, model=, window=)`` (the run's own step) on a
    copy of the model with an optimizer, schedule, meters and divergence window of its own, so the run's state
    is not touched; ``budget`` as ``probe``'s."""
    cfg, steps_per_epoch = parts.cfg, len(parts.loaders[0])

    def make_step(copy: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
        optimizer = build_optimizer(copy, cfg, rt.device, rt.world_size)
        state = TrainState.new(cfg, rt, copy, optimizer, steps_per_epoch)
        model, window = wrap(copy, cfg, rt), StepWindow(rt.device, parts.max_loss, distributed=rt.distributed)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            run_step(x, y, state=state, model=model, window=window)
            state.step += 1

        return step

    sizes = data_sizes(parts.bundle)
    return probe(
        parts.model,
        make_step,
        parts.loaders,
        cfg,
        rt,
        num_classes=parts.info.num_classes,
        eval_images=(sizes["val"], sizes["test"]),
        budget=budget,
    )


def plan_run(cfg, rt, costs: RunCosts, steps_per_epoch: int, *, started: float) -> tuple[int, str]:
    """``plan`` for one run that began at ``started`` (a ``time.perf_counter()``): the step count that fits the rest
    of ``cfg.budget``, and the line that says how it was chosen. Under DDP every rank plans from the ranks' mean
    time spent, so every rank takes the same count; an error (a budget too small) is raised on every rank."""
    spent = time.perf_counter() - started
    if rt.distributed:
        spent = float(all_reduce_sum(torch.tensor(spent, device=rt.device))) / rt.world_size
    with shared_errors(rt):
        return plan(cfg, spent, [costs], steps_per_epoch)


def plan(cfg, spent: float, costs: list[RunCosts], steps_per_epoch: int, *, safety: float = SAFETY) -> tuple[int, str]:
    """The step count that fits ``cfg.budget`` for runs of these ``costs`` (one run, or several that share the
    budget), ``spent`` seconds of it already gone, planned to ``safety`` of what is left; and the line that says
    how it was chosen. A budget that does not fit one step is a ReslabError saying how much would."""
    seconds = parse_budget(cfg.budget)
    steps = steps_within((seconds - spent) * safety, costs, steps_per_epoch)
    one = sum(c.total(1, steps_per_epoch) for c in costs)
    if steps < 1:
        least = math.ceil(spent + one / safety)
        raise ReslabError(
            f"a budget of {cfg.budget} is too small: setting up and timing took {spent:.1f} s, and one step "
            f"with its validation and test needs {one:.1f} s more; give at least --budget {least}s"
        )
    runs = f" for each of {len(costs)} runs" if len(costs) > 1 else ""
    step_ms = ", ".join(f"{c.step_seconds * 1e3:.0f}" for c in costs)
    note = (
        f"budget {cfg.budget}: {steps} steps of {cfg.batch_size} images ({steps / steps_per_epoch:.2f} epochs){runs} "
        f"fit (measured {step_ms} ms a step, {sum(c.epoch_seconds for c in costs):.1f} s of validation and "
        f"checkpoints an epoch, {sum(c.final_seconds for c in costs):.1f} s for the test; {spent:.1f} s spent "
        f"setting up); --steps {steps} trains the same run"
    )
    return steps, note
