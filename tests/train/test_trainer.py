"""fit(): seeding, early stopping, checkpoints and exact resume, TensorBoard logs."""

import dataclasses
import json
import signal

import pytest
import torch

from reslab import ReslabError
from reslab.checkpoint import load_checkpoint
from reslab.train import budget, fit, guard, parts
from reslab.train import trainer as trainer_module
from reslab.train.signals import TrainingStopped


def test_learns_and_writes_the_run_folder(tiny_config):
    cfg = tiny_config(epochs=4)
    results = fit(cfg)
    run = cfg.run_dir()
    assert results["test_acc"] > 0.5  # chance is 0.1 on this learnable data
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "results.json", "tensorboard"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert json.loads((run / "results.json").read_text())["test_acc"] == results["test_acc"]
    best = load_checkpoint(run / "best.pt")
    assert best["model_name"] == "resnet20" and best["model_config"]["layers"] == [1, 1, 1]
    assert best["dataset"]["classes"][0] == "T-shirt/top" and best["config"]["lr"] == 0.05
    assert "optimizer" not in best and {"optimizer", "scheduler", "rng", "best"} <= set(
        load_checkpoint(run / "last.pt")
    )


def test_same_seed_same_metrics(tiny_config, tmp_path):
    a = fit(tiny_config(epochs=2, out_dir=str(tmp_path / "a")))
    b = fit(tiny_config(epochs=2, out_dir=str(tmp_path / "b")))
    fit(tiny_config(epochs=2, out_dir=str(tmp_path / "c"), seed=1))

    def history(name):
        return [(r["train_loss"], r["val_loss"]) for r in load_checkpoint(tmp_path / name / "best.pt")["history"]]

    assert history("a") == history("b") and a["test_acc"] == b["test_acc"]
    assert history("a") != history("c")


def numbers(history):
    """What an epoch computed (its timing aside)."""
    return [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"], r["lr"], r["train_images"]) for r in history]


def assert_same_run(a, b):
    assert numbers(a["history"]) == numbers(b["history"]) and a["grad_norms"] == b["grad_norms"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_a_signal_saves_mid_epoch_and_resume_continues_exactly(tiny_config, tmp_path, signal_at_step):
    signum = signal.SIGINT  # Ctrl-C; SIGTERM takes the same path (tests/train/test_faults.py sends a real one)
    # 15 steps an epoch; drop path draws from the global RNG, so its state must be restored too.
    model_args = {"layers": [1, 1, 1], "drop_path_rate": 0.2}
    straight = tiny_config(epochs=3, out_dir=str(tmp_path / "straight"), model_args=model_args)
    fit(straight)
    cut = tiny_config(epochs=3, out_dir=str(tmp_path / "cut"), model_args=model_args, save_every_steps=4)
    signal_at_step(22, signum)  # step 7 of epoch 2
    with pytest.raises(TrainingStopped) as stopped:
        fit(cut)
    assert stopped.value.exit_code == 128 + signum and "--resume auto" in stopped.value.message
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["progress"] == {"epoch": 1, "step": 7} and saved["epoch"] == 0
    assert load_checkpoint(tmp_path / "cut" / "last.prev.pt")["progress"] == {"epoch": 1, "step": 4}
    signal_at_step(None)
    fit(cut, resume="auto")
    assert_same_run(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt"))
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("straight", "cut"))
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]


def test_resume_from_any_step_is_exact(tiny_config, tmp_path, signal_at_step):
    reference = tiny_config(epochs=2, out_dir=str(tmp_path / "straight"))
    fit(reference)
    # A stop at the first step, on the last step of an epoch, and on the first step of the next (mid-epoch
    # stops: the test above and test_a_damaged_last_checkpoint_falls_back_to_the_one_before).
    for steps in (1, 15, 16):
        run = tmp_path / f"stopped-at-{steps}"
        cfg = tiny_config(epochs=2, out_dir=str(run))
        signal_at_step(steps)
        with pytest.raises(TrainingStopped):
            fit(cfg)
        signal_at_step(None)
        fit(cfg, resume=run / "last.pt")
        assert_same_run(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt"))


def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(tiny_config, tmp_path, signal_at_step, capsys):
    cfg = tiny_config(epochs=1, save_every_steps=5)
    signal_at_step(12)  # saves at steps 5 and 10, then 12 on the signal
    with pytest.raises(TrainingStopped):
        fit(cfg)
    signal_at_step(None)
    run = cfg.run_dir()
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])  # a kill of the disk, not of the process
    fit(cfg, resume="auto")
    out = capsys.readouterr().out
    assert f"{run / 'last.pt'}" in out and "skipping it" in out and "at step 10 of epoch 1" in out
    assert (run / "last.damaged.pt").exists() and load_checkpoint(run / "last.prev.pt")["progress"]["step"] == 10
    reference = tiny_config(epochs=1, out_dir=str(tmp_path / "straight"))
    fit(reference)
    assert_same_run(load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt"))


def test_resume_refuses_a_different_run(tiny_config, tmp_path):
    cfg = tiny_config(epochs=1)
    fit(cfg)
    with pytest.raises(ReslabError, match="cannot resume: the checkpoint has batch_size=32"):
        fit(tiny_config(epochs=1, batch_size=16), resume=cfg.run_dir() / "last.pt")


def test_early_stopping_restores_the_best_model(tiny_config, monkeypatch):
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])  # best at epoch 2; patience 2 stops after epoch 4
    real = trainer_module.evaluate

    def scripted_eval(model, batches, **kwargs):
        result = real(model, batches, **kwargs)
        if batches is validation["loader"]:
            result.accuracy = next(scripted)
        return result

    validation = {}
    real_loaders = parts.build_loaders

    def capture(*args):
        train, val, test = real_loaders(*args)
        validation["loader"] = val
        return train, val, test

    monkeypatch.setattr(trainer_module, "evaluate", scripted_eval)
    monkeypatch.setattr(parts, "build_loaders", capture)
    cfg = tiny_config(epochs=6, patience=2)
    results = fit(cfg)
    assert results["stopped_early"] and results["epochs_run"] == 4 and results["best_epoch"] == 2
    last, best = load_checkpoint(cfg.run_dir() / "last.pt"), load_checkpoint(cfg.run_dir() / "best.pt")
    assert last["epoch"] == 3 and best["epoch"] == 1
    for key, value in last["best"]["state"].items():
        assert torch.equal(best["model"][key], value), key  # best.pt holds epoch 2's weights...
    assert any(not torch.equal(best["model"][k], v) for k, v in last["model"].items())  # ...not the last ones
    # Resuming a run that early stopping ended trains nothing more.
    assert fit(tiny_config(epochs=6, patience=2), resume=cfg.run_dir() / "last.pt")["epochs_run"] == 4


def _existing_paths_named(message):
    import re
    from pathlib import Path

    paths = [Path(p) for p in re.findall(r"(/\S+?\.pt)\b", message)]
    return paths, all(p.is_file() for p in paths)


def test_a_diverging_step_is_caught_where_it_happens_and_named(tiny_config):
    with pytest.raises(ReslabError) as err:
        fit(tiny_config(epochs=2, lr=1e30))
    message = str(err.value)
    # Step 1 is finite (the loss of random weights); its update blows the weights up: step 2 diverges.
    assert message.startswith("training diverged at step 2 of epoch 1: the loss was ")
    assert "went non-finite first" in message or "the loss itself" in message
    paths, exist = _existing_paths_named(message)
    assert paths == [] and exist and "Lower --lr" in message  # nothing was saved yet: no file is pointed to


def test_a_bad_step_and_those_queued_after_it_never_reach_the_weights(tiny_config, monkeypatch):
    """The host looks only every 10 steps: the fused optimizer must skip the bad first step and the 9 run after
    it by itself, so the weights the host finds are still the initial ones."""
    step, diagnose, seen = trainer_module.Trainer._step, guard.diagnose, {}

    def counted_step(self, x, y):
        assert not self.host_checked  # the sync-free path, not the host looking at each step
        if self.state.step == 0:
            seen["initial"] = [p.detach().clone() for p in self.state.model.parameters()]
        seen["steps"] = seen.get("steps", 0) + 1
        step(self, x, y)

    def capture(model, *args, **kwargs):
        seen["found"] = [p.detach().clone() for p in model.parameters()]
        return diagnose(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "_step", counted_step)
    monkeypatch.setattr(guard, "diagnose", capture)
    with pytest.raises(ReslabError, match="at step 1 of epoch 1"):
        fit(tiny_config(epochs=1, max_loss=0.5, sync_every_steps=10))
    assert seen["steps"] == 10
    assert all(torch.equal(a, b) for a, b in zip(seen["initial"], seen["found"], strict=True))


def test_an_exploding_loss_stops_the_run(tiny_config):
    with pytest.raises(ReslabError, match=r"at step 1 of epoch 1: the loss was 2\.\d+ \(above --max-loss 0\.5\)"):
        fit(tiny_config(epochs=1, max_loss=0.5))


def test_a_model_with_non_finite_statistics_is_never_saved(tiny_config, monkeypatch):
    """A NaN in a BatchNorm running variance after epoch 2 (the loss stayed finite): best.pt keeps epoch 1."""
    real = trainer_module.evaluate
    calls = {"n": 0}

    def poisoned(model, batches, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            dict(model.named_buffers())["bn1.running_var"][0] = float("nan")
        return real(model, batches, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate", poisoned)
    cfg = tiny_config(epochs=3)
    with pytest.raises(ReslabError, match=r"diverged after epoch 2: bn1\.running_var holds non-finite values") as err:
        fit(cfg)
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(cfg.run_dir() / name)
        floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
        assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in floats)
    paths, exist = _existing_paths_named(str(err.value))
    assert paths and exist


def test_a_non_finite_validation_loss_is_never_the_best_model(tiny_config, monkeypatch):
    real = trainer_module.evaluate

    def nan_validation(model, batches, **kwargs):
        result = real(model, batches, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            result.loss = float("nan")
        return result

    calls = {"n": 0}
    monkeypatch.setattr(trainer_module, "evaluate", nan_validation)
    cfg = tiny_config(epochs=3)
    with pytest.raises(ReslabError, match=r"diverged after epoch 2: the validation loss is nan"):
        fit(cfg)
    assert load_checkpoint(cfg.run_dir() / "best.pt")["epoch"] == 0


def test_augmentation_only_on_training_split(tiny_config):
    from reslab.data import load_dataset
    from reslab.train import runtime

    cfg = tiny_config()
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=False)
    train, val, test = parts.build_loaders(bundle, cfg, runtime.setup("cpu", "off", False))
    assert train.train and train.augment.crop_padding == 2
    assert not val.train and not test.train  # evaluation loaders never augment (tests/data/test_augment.py)


def test_tensorboard_holds_scalars_histograms_and_images(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(epochs=2, log_every_steps=4)  # 15 steps an epoch
    fit(cfg)
    events = EventAccumulator(str(cfg.run_dir() / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss/train", "lr"):  # every 4 optimizer steps
        assert [e.step for e in events.Scalars(tag)] == [4, 8, 12, 16, 20, 24, 28], tag
    for tag in ("loss/val", "accuracy/train", "accuracy/val", "grad_norm/conv1.weight"):  # at each epoch's end
        assert [e.step for e in events.Scalars(tag)] == [15, 30], tag
    assert "weights/conv1.weight" in tags["histograms"] and "weights/fc.bias" in tags["histograms"]
    assert tags["images"] == ["inputs/train"]
    val_acc = [e.value for e in events.Scalars("accuracy/val")]
    history = load_checkpoint(cfg.run_dir() / "last.pt")["history"]
    assert val_acc == pytest.approx([r["val_acc"] for r in history])


@pytest.mark.parametrize(  # every optimizer and every schedule at least once (not all 12 pairs: minutes here)
    ("optimizer", "schedule"), [("sgd", "step"), ("adam", "cosine"), ("adamw", "onecycle"), ("sgd", "constant")]
)
def test_every_optimizer_and_schedule_trains(tiny_config, optimizer, schedule):
    lr = 0.05 if optimizer == "sgd" else 2e-3
    results = fit(
        tiny_config(
            epochs=2, optimizer=optimizer, schedule=schedule, lr=lr, step_size=1, warmup_epochs=0.5, label_smoothing=0.1
        )
    )
    assert results["test_acc"] > 0.2


def test_refuses_to_overwrite_a_run(tiny_config):
    fit(tiny_config(epochs=1))
    with pytest.raises(ReslabError, match=r"already holds a run; continue it with --resume .*last\.pt"):
        fit(tiny_config(epochs=1))
    assert fit(tiny_config(epochs=1, overwrite=True))["epochs_run"] == 1


def _image_folder_config(tmp_path, **overrides):
    """A ResNet-8 on the image folder at tmp_path/images, 2 epochs of batches of 8."""
    from reslab.train import TrainConfig

    values = dict(
        model="resnet20",
        model_args={"layers": [1, 1, 1]},
        dataset="imagefolder",
        data_dir=str(tmp_path / "images"),
        image_size=16,
        in_chans=3,
        epochs=2,
        batch_size=8,
        lr=0.05,
        device="cpu",
        quiet=True,
        num_workers=1,
        out_dir=str(tmp_path / "run"),
    )
    return TrainConfig(**{**values, **overrides})


def test_trains_on_an_image_folder(tmp_path):
    from tests.data.fixtures import write_image_folder

    write_image_folder(tmp_path / "images", split_dirs=("train", "test"), per_class=16, size=20)
    empty, text = tmp_path / "images" / "train" / "cat" / "empty.png", tmp_path / "images" / "test" / "dog" / "x.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image")
    cfg = _image_folder_config(tmp_path)
    with pytest.raises(ReslabError, match=r"2 of \d+ images are bad: .*empty\.png \(empty file \(0 bytes\)\)"):
        fit(dataclasses.replace(cfg, on_bad_image="fail"))  # before any training
    assert not (tmp_path / "run" / "last.pt").exists()
    results = fit(cfg)  # skip, the default: the bad files are left out and listed
    assert results["epochs_run"] == 2 and results["test_acc"] is not None
    listing = (tmp_path / "run" / "bad_images.txt").read_text()
    assert f"{empty}\tempty file (0 bytes)" in listing and f"{text}\tnot an image" in listing
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["dataset"]["classes"] == ["cat", "dog", "fish"] and best["dataset"]["image_size"] == (16, 16)


def test_resuming_on_changed_data_is_refused(tmp_path, signal_at_step):
    from tests.data.fixtures import write_image_folder

    write_image_folder(tmp_path / "images", per_class=16, size=12)
    cfg = _image_folder_config(tmp_path, image_size=8, num_workers=0)
    signal_at_step(2)
    with pytest.raises(TrainingStopped):
        fit(cfg)
    signal_at_step(None)
    next((tmp_path / "images" / "cat").iterdir()).unlink()  # one image fewer: every split would change
    with pytest.raises(ReslabError, match=r"the data changed since .*last\.pt was saved \(images per split then"):
        fit(cfg, resume="auto")


def test_the_sync_free_loop_gives_the_same_run_as_looking_after_every_step(tiny_config, tmp_path):
    """The host reading each step at once, or only at the end of each epoch, changes nothing that is computed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for every in (1, 1000):
        cfg = tiny_config(epochs=2, sync_every_steps=every, log_every_steps=4, out_dir=str(tmp_path / str(every)))
        runs[every] = (fit(cfg), load_checkpoint(cfg.run_dir() / "last.pt"))
        events = EventAccumulator(str(cfg.run_dir() / "tensorboard"))
        events.Reload()
        runs[every] += ([(e.step, e.value) for e in events.Scalars("loss/train")],)
    (a, last_a, curve_a), (b, last_b, curve_b) = runs[1], runs[1000]
    assert_same_run(last_a, last_b)
    assert a["test_acc"] == b["test_acc"] and a["test_loss"] == b["test_loss"]
    assert curve_a == curve_b and [s for s, _ in curve_a] == [4, 8, 12, 16, 20, 24, 28]


def test_new_training_options_resume_exactly(tiny_config, tmp_path, signal_at_step):
    """Weight average, random erasing, progressive sizes, translate TTA and lr scaling: stopped and resumed
    mid-epoch, the run ends as one that never stopped."""
    options = dict(
        ema_decay=0.9,
        random_erasing=0.5,
        progressive_sizes=[20, 28],
        tta_flip=True,
        tta_translate=1,
        lr_reference_batch=64,
        epochs=2,
    )
    straight = tiny_config(out_dir=str(tmp_path / "straight"), **options)
    expected = fit(straight)
    cut = tiny_config(out_dir=str(tmp_path / "cut"), save_every_steps=5, **options)
    signal_at_step(8)
    with pytest.raises(TrainingStopped):
        fit(cut)
    signal_at_step(None)
    resumed = fit(cut, resume="auto")
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert_same_run(a, b)
    assert all(torch.equal(v, b["ema"]["module"][k]) for k, v in a["ema"]["module"].items())
    assert expected["test_acc"] == resumed["test_acc"] and expected["best_weights"] == resumed["best_weights"]
    assert b["scheduler"]["base_lrs"][0] == pytest.approx(0.05 * 32 / 64)  # lr 0.05 is for batch 64; this is 32


def test_the_auto_checkpoint_interval_leaves_out_the_first_steps(tiny_config, monkeypatch):
    """A slow first step (torch.compile compiling, kernels warming up) must not make a run checkpoint every few
    steps: the interval is timed on the steps after the first look."""
    import time

    step, decided = trainer_module.Trainer._step, []

    def slow_first_step(self, x, y):
        if self.state.step == 0:
            time.sleep(1.0)
        step(self, x, y)

    def decide(self, rt):
        decided.append((self.steps_run, self.seconds_run))
        self.every_steps = 1000
        return 1000, 1.0

    monkeypatch.setattr(trainer_module.Trainer, "_step", slow_first_step)
    monkeypatch.setattr(budget.SaveInterval, "decide", decide)
    fit(tiny_config(epochs=1, sync_every_steps=2, save_every_steps=0))
    (steps, seconds), *_ = decided
    assert steps == 6 and seconds < 1.0  # steps 3 to 8; the first window (steps 1 and 2) and its sleep left out


def test_a_checkpoint_from_before_fused_optimizers_resumes_fused(tiny_config, monkeypatch, signal_at_step):
    """Resuming must keep the fused optimizer that the device-side divergence check needs."""
    cfg = tiny_config(epochs=2, optimizer="adam")
    signal_at_step(15)
    with pytest.raises(TrainingStopped):
        fit(cfg)
    signal_at_step(None)
    last = cfg.run_dir() / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    for group in ckpt["optimizer"]["param_groups"]:
        group["fused"] = None  # as torch wrote it before reslab used fused optimizers
    torch.save(ckpt, last)
    step, fused = trainer_module.Trainer._step, []

    def look(self, x, y):
        fused.append([g["fused"] for g in self.state.optimizer.param_groups] + [self.host_checked])
        step(self, x, y)

    monkeypatch.setattr(trainer_module.Trainer, "_step", look)
    fit(cfg, resume="auto")
    assert fused and all(f == [True, True, False] for f in fused)
