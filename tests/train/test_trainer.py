"""fit(): seeding, early stopping, checkpoints and exact resume, TensorBoard logs."""

import json

import pytest
import torch

from reslab import ReslabError
from reslab.train import fit, load_checkpoint
from reslab.train import trainer as trainer_module


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


def test_resume_continues_exactly(tiny_config, tmp_path, monkeypatch):
    straight = tiny_config(
        epochs=3, out_dir=str(tmp_path / "straight"), model_args={"layers": [1, 1, 1], "drop_path_rate": 0.2}
    )
    fit(straight)

    # The same run, interrupted (Ctrl-C) during its third epoch, then resumed from last.pt.
    real = trainer_module.train_one_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    cut = tiny_config(epochs=3, out_dir=str(tmp_path / "cut"), model_args=straight.model_args)
    monkeypatch.setattr(trainer_module, "train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(cut)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1  # two epochs kept
    monkeypatch.setattr(trainer_module, "train_one_epoch", real)
    fit(cut, resume=tmp_path / "cut" / "last.pt")

    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")

    def numbers(history):
        return [(r["train_loss"], r["train_acc"], r["val_loss"], r["val_acc"], r["lr"]) for r in history]

    assert numbers(a["history"]) == numbers(b["history"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


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
    real_loaders = trainer_module._loaders

    def capture(*args):
        train, val, test = real_loaders(*args)
        validation["loader"] = val
        return train, val, test

    monkeypatch.setattr(trainer_module, "evaluate", scripted_eval)
    monkeypatch.setattr(trainer_module, "_loaders", capture)
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


def test_a_diverging_run_stops_with_a_clear_error(tiny_config):
    with pytest.raises(ReslabError, match=r"the training loss became nan in epoch 1; lower --lr"):
        fit(tiny_config(epochs=2, lr=1e30))


def test_augmentation_only_on_training_split(tiny_config):
    from reslab.data import load_dataset
    from reslab.train import runtime

    cfg = tiny_config()
    bundle = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=False)
    train, val, test = trainer_module._loaders(bundle, cfg, runtime.setup("cpu", "off", False))
    assert train.loader.train and train.loader.augment.crop_padding == 2
    assert not val.train and not test.train  # evaluation loaders never augment (tests/data/test_augment.py)


def test_tensorboard_holds_scalars_histograms_and_images(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(epochs=2)
    fit(cfg)
    events = EventAccumulator(str(cfg.run_dir() / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss/train", "loss/val", "accuracy/train", "accuracy/val", "lr", "grad_norm/conv1.weight"):
        assert tag in tags["scalars"], tag
        assert [e.step for e in events.Scalars(tag)] == [0, 1]
    assert "weights/conv1.weight" in tags["histograms"] and "weights/fc.bias" in tags["histograms"]
    assert tags["images"] == ["inputs/train"]
    val_acc = [e.value for e in events.Scalars("accuracy/val")]
    history = load_checkpoint(cfg.run_dir() / "last.pt")["history"]
    assert val_acc == pytest.approx([r["val_acc"] for r in history])


@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle", "constant"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
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


def test_trains_on_an_image_folder(tmp_path):
    from reslab.train import TrainConfig
    from tests.data.fixtures import write_image_folder

    write_image_folder(tmp_path / "images", split_dirs=("train", "test"), per_class=16, size=20)
    cfg = TrainConfig(
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
    results = fit(cfg)
    assert results["epochs_run"] == 2 and results["test_acc"] is not None
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["dataset"]["classes"] == ["cat", "dog", "fish"] and best["dataset"]["image_size"] == (16, 16)
