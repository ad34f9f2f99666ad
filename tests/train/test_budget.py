"""Budgeted training: a wall-clock budget becomes a recorded step count, the schedule ends at zero on the last
step, and a budgeted run resumes as exactly as any other."""

import json

import pytest
import torch

from reslab import ReslabError
from reslab.checkpoint import load_checkpoint
from reslab.cli import main
from reslab.train import TrainConfig, fit, from_dict
from reslab.train import trainer as trainer_module
from reslab.train.budget import RunCosts, parse_budget, steps_within
from reslab.train.optim import build_scheduler
from reslab.train.signals import TrainingStopped
from tests.train.test_trainer import assert_same_run


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("4m", 240), ("1h", 3600), ("1h30m", 5400), ("2.5m", 150), ("45", 45), ("3m40s", 220)],
)
def test_budget_durations(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "4 minutes", "m", "-1m", "0", "0s", "4m4x", "nan", "1.5.3", "1m1m", "30s1m"])
def test_a_bad_budget_is_one_line(text):
    with pytest.raises(ReslabError, match="budget must be a"):
        parse_budget(text)


def test_a_budget_in_a_recipe_is_checked_when_read():
    assert from_dict({"budget": 90}).budget == "90s"  # YAML `budget: 90` reads as a number: seconds
    with pytest.raises(ReslabError, match="budget must be a positive duration"):
        from_dict({"budget": "-2m"})


def test_the_step_count_is_the_most_that_fits():
    costs = RunCosts(step_seconds=0.1, epoch_seconds=1.0, final_seconds=2.0, save_seconds=0.5)
    # 10 steps an epoch: N steps cost 0.1 N + ceil(N / 10) + 2 (+ 0.5 a minute of training, none here).
    assert steps_within(2.0 + 1.0 + 1.0, [costs], 10) == 10  # one epoch: 1 + 1 + 2 = 4 s
    assert steps_within(2.0 + 2.1, [costs], 10) == 10  # 11 steps would open a second epoch (5.1 s)
    assert steps_within(5.1, [costs], 10) == 11
    assert steps_within(3.0, [costs], 10) == 0  # not even one step with its validation and test
    # Several runs of one count (the degradation experiment's twins): they share the budget.
    assert steps_within(8.0, [costs, costs], 10) == 10


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
@pytest.mark.parametrize("steps", [7, 45, 100])
def test_the_schedule_reaches_zero_at_the_last_step(schedule, steps):
    cfg = TrainConfig(schedule=schedule, steps=steps, warmup_epochs=0.5, epochs=1000)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=10)
    factors = [scheduler.lr_lambdas[0](s) for s in range(steps + 1)]
    warmup = min(5, steps - 1)
    assert factors[-1] == 0  # the learning rate after the last step
    assert all(f > 0 for f in factors[:-1])  # every step of the run learns something
    assert factors[warmup:] == sorted(factors[warmup:], reverse=True)  # then it only decays


class FakeClock:
    """A clock for the trainer, the budget's probe and the logger in which only what the test charges takes time:
    a training step ``step`` seconds, a ``torch.save`` ``save`` seconds, everything else a microsecond. So a run's
    "wall clock" is what its plan accounted for, the same on any machine (STYLE.md: no timing is asserted)."""

    def __init__(self, step: float, save: float) -> None:
        self.now, self.step, self.save = 1000.0, step, save

    def perf_counter(self) -> float:
        self.now += 1e-6
        return self.now

    def install(self, monkeypatch) -> None:
        import time
        import types

        from reslab.train import budget, logging

        clock = types.SimpleNamespace(perf_counter=self.perf_counter, monotonic=time.monotonic, time=time.time)
        for module in (trainer_module, budget, logging):
            monkeypatch.setattr(module, "time", clock)
        step, save = trainer_module.Trainer._step, torch.save

        def charged_step(*args, **kwargs):
            self.now += self.step
            return step(*args, **kwargs)

        def charged_save(*args, **kwargs):
            self.now += self.save
            return save(*args, **kwargs)

        monkeypatch.setattr(trainer_module.Trainer, "_step", charged_step)
        monkeypatch.setattr(torch, "save", charged_save)


def test_a_budgeted_run_stops_within_its_budget_and_records_its_step_count(tiny_config, monkeypatch, capsys):
    FakeClock(step=0.04, save=0.01).install(monkeypatch)
    cfg = tiny_config(budget="5s", schedule="onecycle", epochs=1000)
    results = fit(cfg)
    out = capsys.readouterr().out
    steps = results["steps"]
    assert f"budget 5s: {steps} steps of 32 images" in out and f"--steps {steps} trains the same run" in out
    # Within the budget, and using most of it: the count is what fits 95% of it, steps, epochs' ends and test.
    assert 0.8 * 5 < results["wall_seconds"] <= 5
    assert results["budget"] == "5s" and steps > 15  # more than an epoch of the tiny split, not 1000 epochs
    last = load_checkpoint(cfg.run_dir() / "last.pt")
    assert last["config"]["steps"] == steps and last["config"]["budget"] == "5s"
    history = last["history"]
    assert sum(r["train_images"] for r in history) == steps * 32  # the last epoch stops at the count, mid-way
    assert history[-1]["lr"] == 0.0  # the schedule ended at zero


def test_resuming_a_budgeted_run_mid_way_is_bit_identical(tiny_config, tmp_path, signal_at_step, monkeypatch):
    budgeted = tiny_config(budget="12s", schedule="onecycle", out_dir=str(tmp_path / "cut"), save_every_steps=4)
    planned = trainer_module.Trainer._steps_for_budget

    def plan_then_arm(self, parts):  # count training steps only, not the probe's
        steps = planned(self, parts)
        # Step 7 of epoch 2 where the 12 s fit 33 steps or more; two thirds of the way on a machine too busy to.
        signal_at_step(min(22, steps * 2 // 3))
        return steps

    monkeypatch.setattr(trainer_module.Trainer, "_steps_for_budget", plan_then_arm)
    with pytest.raises(TrainingStopped):
        fit(budgeted)
    steps = load_checkpoint(tmp_path / "cut" / "last.pt")["config"]["steps"]
    signal_at_step(None)
    fit(budgeted, resume="auto")  # from the recipe, as a requeued job does: the recorded count holds
    straight = tiny_config(steps=steps, schedule="onecycle", out_dir=str(tmp_path / "straight"))
    fit(straight)
    assert_same_run(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt"))
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("straight", "cut"))
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"] and a["steps"] == b["steps"] == steps


def test_a_budget_smaller_than_the_warm_up_is_one_line_and_writes_nothing(tiny_fashion, tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--model", "resnet20", "--model-arg", "layers=[1,1,1]", "--data-dir", str(tiny_fashion)]
    code = main(["train", *flags, "--no-download", "--device", "cpu", "--budget", "1s", "--out-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "a budget of 1s is too small" in err and "give at least --budget" in err
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_a_training_subset_keeps_each_class_share(tiny_config):
    from reslab.data import load_dataset
    from reslab.data.types import subset_of_train

    cfg = tiny_config(train_subset=100, epochs=1)
    bundle = load_dataset("fashion-mnist", data_dir=cfg.data_dir, val_ratio=cfg.val_ratio, seed=cfg.seed)
    before = torch.bincount(bundle.train.labels, minlength=10).float()
    subset = subset_of_train(bundle, 100, cfg.seed)
    after = torch.bincount(subset.labels, minlength=10).float()
    assert abs(len(subset) - 100) <= 5 and torch.allclose(after / len(subset), before / len(bundle.train), atol=0.02)
    assert fit(cfg)["train_images"] == len(subset) // 32 * 32  # whole batches of the subset, one epoch
    with pytest.raises(ReslabError, match="train_subset must be below"):
        fit(tiny_config(train_subset=10_000, overwrite=True))


def test_warmup_options_are_checked_and_one_cycle_warms_up_over_30_percent_by_default():
    with pytest.raises(ReslabError, match="warmup_fraction must be in"):
        from_dict({"warmup_fraction": 1.0})
    with pytest.raises(ReslabError, match="not both"):
        from_dict({"warmup_fraction": 0.1, "warmup_epochs": 1})
    with pytest.raises(ReslabError, match="budget and progressive_sizes"):
        from_dict({"budget": "4m", "progressive_sizes": [16, 28]})
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    factors = build_scheduler(optimizer, TrainConfig(schedule="onecycle", steps=100), 10).lr_lambdas[0]
    assert max(range(101), key=factors) == 29 and factors(29) == 1.0  # the warmup's last step: 30 of 100
