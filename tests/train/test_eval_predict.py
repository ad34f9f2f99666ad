"""The user's commands end to end on a tiny trained model: train, eval, predict, samples, and their errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslab.cli import main
from tests.data.bad_files import png_header, truncated_jpeg

TINY = [
    "--model",
    "resnet20",
    "--model-arg",
    "layers=[1,1,1]",
    "--dataset",
    "fashion-mnist",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--device",
    "cpu",
    "--quiet",
    "--no-download",
    "--crop-padding",
    "2",
]


@pytest.fixture(scope="module")
def trained(tiny_fashion, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--data-dir", str(tiny_fashion), "--out-dir", str(run)]) == 0
    return run


def test_train_writes_checkpoint_and_curves(trained):
    assert (trained / "best.pt").is_file() and (trained / "curves.png").is_file()
    assert json.loads((trained / "results.json").read_text())["test_acc"] > 0.5


def test_eval_reports_accuracy_per_class_and_confusion(trained, tiny_fashion, capsys, tmp_path):
    assert main(["eval", str(trained / "best.pt"), "--data-dir", str(tiny_fashion), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval_test.json").read_text())
    assert report["images"] == 80 and len(report["confusion_matrix"]) == 10
    assert sum(map(sum, report["confusion_matrix"])) == 80
    results = json.loads((trained / "results.json").read_text())
    assert report["accuracy"] == pytest.approx(results["test_acc"])  # the same model, the same number
    assert "Ankle boot" in out and (tmp_path / "confusion_test.png").stat().st_size > 1000


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_predict_any_image_mode_and_size(trained, tmp_path, capsys, mode):
    from reslab.data.folder import eval_transform
    from tests.data.fixtures import learnable_images

    arr = learnable_images(np.array([3]), 40, 1, 0)[0, 0]  # class 3's stripes, at 40x40
    gray = Image.fromarray(arr)
    image = Image.fromarray(arr.astype(np.uint16) * 257) if mode == "I;16" else gray.convert(mode)
    path = tmp_path / "x.png"
    image.save(path)
    # Whatever the mode, the model sees what it would see for the grayscale image.
    to_input = eval_transform(28, 1, (0.5,), (0.5,))
    with Image.open(path) as reloaded:
        assert (to_input(reloaded) - to_input(gray)).abs().max() < 0.05
    assert main(["predict", str(trained / "best.pt"), str(path), "--topk", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{path}: ") and line.count("%") == 2


def test_samples_then_predict(trained, tiny_fashion, tmp_path, capsys):
    assert main(["samples", "--data-dir", str(tiny_fashion), "--count", "3", "--out-dir", str(tmp_path)]) == 0
    files = capsys.readouterr().out.split()
    assert len(files) == 3 and all(Path(f).is_file() for f in files)
    assert main(["predict", str(trained / "best.pt"), *files]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "reslab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "missing.pt", "x.png"], "checkpoint not found: missing.pt"),
        (["train", "--recipe", "nope.yaml"], "recipe not found: nope.yaml"),
        (["train", "--epochs", "0"], "epochs must be at least 1"),
        (["train", "--dataset", "cifar10", "--no-download"], "cifar10: cifar-10-batches-py"),
        (["train", "--data-dir", "/nonexistent"], "--data-dir /nonexistent does not exist"),
        (["eval", "src"], "src is a folder, not a checkpoint"),
        (["train", "--resume", "src"], "src is a folder, not a checkpoint"),
        (["eval", "README.md"], "README.md is not a readable reslab checkpoint"),
        (["train", "--momentum", "-1"], "momentum must be in [0, 1), not -1.0"),
        (["train", "--model-arg", "num_classes=3"], "model_args cannot set num_classes: the dataset decides them"),
        (["train", "--device", "mps"], "device mps was asked for, but Apple's MPS is not available here"),
        (["train", "--out-dir", "/proc/x", "--dataset", "synthetic", "--epochs", "1"], "/proc/x"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path, monkeypatch, capsys):
    # In this process (each `python -m reslab` costs seconds of imports here); the test below runs a real one.
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("reslab: error: ") and err.count("\n") == 1 and message in err


def test_a_user_error_in_a_real_process_is_one_line_and_status_2(tmp_path):
    result = run_cli("train", "--dataset", "cifar10", "--no-download", env={"RESLAB_DATA": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "cifar10: cifar-10-batches-py" in result.stderr


def test_unknown_recipe_key_suggests_the_right_one(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet20\nepochz: 3\n")
    assert main(["train", "--recipe", str(recipe)]) == 2
    assert "unknown option(s) epochz (did you mean epochs?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("bad.png", b"not an image", "not an image: "),
        ("empty.png", b"", "empty file (0 bytes)"),
        ("truncated.jpg", truncated_jpeg(), "truncated: "),
        ("bomb.png", png_header(12_000, 12_000), "too large: 12000x12000 pixels is above --max-image-pixels"),
        ("missing.png", None, "unreadable: No such file or directory"),
    ],
)
def test_predict_reads_image_files_through_trainings_checks(trained, tmp_path, capsys, name, content, reason):
    """predict meets a bad file as training does (``data.verify.read_image``): one line naming it and why."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert main(["predict", str(trained / "best.pt"), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reslab: error: {path}: {reason}") and err.count("\n") == 1, err


def test_resume_from_the_command_line(trained, tiny_fashion, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    assert main(["train", "--resume", str(copy / "best.pt")]) == 2
    assert "holds a model, not a training state; resume from the run's last.pt" in capsys.readouterr().err
    from reslab.checkpoint import load_checkpoint
    from reslab.errors import ReslabError
    from reslab.train import ResumePoint, TrainConfig, fit

    cfg = TrainConfig(**{**load_checkpoint(copy / "last.pt")["config"], "out_dir": str(copy)})
    best = ResumePoint(copy / "best.pt", load_checkpoint(copy / "best.pt"))  # read already, by a caller of fit
    with pytest.raises(ReslabError, match=r"best\.pt holds a model, not a training state"):
        fit(cfg, resume=best)
    assert main(["train", "--resume", str(copy / "last.pt"), "--lr", "0.5"]) == 2
    assert "cannot resume: the checkpoint has lr=0.05, this run 0.5" in capsys.readouterr().err
    # A finished run resumed with more patience: nothing left to train, and it writes to the copy, not the original.
    before = (trained / "last.pt").stat().st_mtime_ns
    assert main(["train", "--resume", str(copy / "last.pt"), "--data-dir", str(tiny_fashion), "--patience", "2"]) == 0
    assert (trained / "last.pt").stat().st_mtime_ns == before
    assert json.loads((copy / "results.json").read_text())["epochs_run"] == 3


def test_recipe_numbers_written_as_yaml_text(tiny_fashion, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5e-4\nepochs: 1\noptimizer: adam\n")  # YAML reads 1e-3 as text
    args = ["train", "--recipe", str(recipe), *TINY[:4], "--device", "cpu", "--quiet", "--no-download"]
    assert main([*args, "--data-dir", str(tiny_fashion), "--out-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs_run"] == 1


def test_eval_on_another_image_folder_scores_every_image(tmp_path):
    from tests.data.fixtures import write_image_folder

    write_image_folder(tmp_path / "train_imgs", split_dirs=("train",), per_class=12, size=20)
    write_image_folder(tmp_path / "other", per_class=5, size=20, seed=1)  # flat: 15 images
    run = tmp_path / "run"
    args = [
        "train",
        "--model",
        "resnet20",
        "--model-arg",
        "layers=[1,1,1]",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(tmp_path / "train_imgs"),
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--quiet",
        "--num-workers",
        "0",
        "--out-dir",
        str(run),
    ]
    assert main(args) == 0
    assert main(["eval", str(run / "best.pt"), "--data-dir", str(tmp_path / "other"), "--out-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "eval_test.json").read_text())["images"] == 15
