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
    from tests.data.fixtures import learnable_images

    arr = learnable_images(np.array([3]), 40, 1, 0)[0, 0]  # class 3's bar pattern, at 40x40
    image = Image.fromarray(arr)
    image = image.convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 257)
    path = tmp_path / f"x.{'png'}"
    image.save(path)
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
        (
            ["train", "--dataset", "cifar10", "--data-dir", "/nonexistent", "--no-download"],
            "cifar10: cifar-10-batches-py",
        ),
        (["eval", "README.md"], "README.md is not a readable reslab checkpoint"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path):
    result = run_cli(*args, env={"RESLAB_DATA": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_unknown_recipe_key_suggests_the_right_one(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet20\nepochz: 3\n")
    result = run_cli("train", "--recipe", str(recipe))
    assert result.returncode == 2 and "unknown option(s) epochz (did you mean epochs?)" in result.stderr


def test_predict_unreadable_image(trained, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_cli("predict", str(trained / "best.pt"), str(bad))
    assert result.returncode == 2 and "bad.png is not a readable image" in result.stderr
