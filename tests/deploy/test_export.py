"""``reslab export`` and the deployment paths of eval and predict, on the trained fixture model."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.cli import main
from reslab.data import load_dataset
from reslab.deploy.export import check_onnx, read_onnx_metadata
from reslab.inference import calibration_batches


@pytest.fixture(scope="module")
def exported(checkpoint_path):
    """(the fp32 ONNX file of ``reslab export``, what the command printed)."""
    out = checkpoint_path.parent / "fp32.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(checkpoint_path), "--out", str(out)]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def onnx_path(exported):
    return exported[0]


def test_onnx_has_a_dynamic_batch_and_matches_pytorch_at_several_batch_sizes(onnx_path, trained):
    import onnx

    _, model = trained
    graph_input = onnx.load(str(onnx_path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # a named, free dimension: not fixed at 2
    differences = check_onnx(onnx_path, model, input_shape=(1, 28, 28), batch_sizes=(1, 3, 16))
    assert max(differences.values()) < 1e-4, differences


def test_export_prints_what_it_folded_and_the_differences(exported):
    out = exported[1]
    assert "fp32, dynamic batch; 7 BatchNorms folded" in out
    assert "largest logit difference: batch 1: " in out and "batch 16: " in out


def test_another_program_uses_the_onnx_file_alone(onnx_path, checkpoint_path, tmp_path):
    """Only onnxruntime, numpy and PIL: the file says how to normalize and what the classes are."""
    import onnxruntime

    from reslab.inference import predict_images

    test = load_dataset("fashion-mnist", val_ratio=0.0, download=False).test
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i, 0].numpy()).save(paths[-1])
    meta = read_onnx_metadata(onnx_path)
    classes, mean, std = (json.loads(meta[f"reslab.{k}"]) for k in ("classes", "mean", "std"))
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] for p in paths]) / 255
    x = ((pixels - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]).astype(np.float32)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    by_onnx = [classes[i] for i in logits.argmax(1)]
    by_reslab = [p.top[0][0] for p in predict_images(checkpoint_path, paths, device="cpu")]
    assert by_onnx == by_reslab and meta["reslab.model"] == "resnet20"


def test_int8_onnx_export(checkpoint_path, trained, tmp_path, capsys):
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(checkpoint_path), "--int8", "--out", str(out), "--calibration-images", "128"]) == 0
    assert "int8 ONNX Runtime vs fp32 PyTorch on training images, largest logit difference" in capsys.readouterr().out
    assert read_onnx_metadata(out)["reslab.precision"] == "int8"
    images = calibration_batches(trained[0], images=16)[0]
    differences = check_onnx(out, trained[1], input_shape=(1, 28, 28), batch_sizes=(1, 7), images=images)
    assert max(differences.values()) < 0.5  # logits span about +-10


def test_safetensors_export_loads_back_with_its_metadata(checkpoint_path, trained, tmp_path):
    from safetensors import safe_open

    from reslab.models import ResNet, read_state_dict

    out = tmp_path / "w.safetensors"
    assert main(["export", str(checkpoint_path), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    model = ResNet(**json.loads(meta["reslab.config"]))
    model.load_state_dict(read_state_dict(out))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained[1](x))
    assert len(json.loads(meta["reslab.classes"])) == 10


def test_int8_safetensors_is_a_one_line_error(checkpoint_path, capsys):
    assert main(["export", str(checkpoint_path), "--format", "safetensors", "--int8"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_eval_and_predict_take_a_precision(checkpoint_path, trained, tmp_path, capsys):
    assert main(["eval", str(checkpoint_path), "--out-dir", str(tmp_path), "--precision", "fp32"]) == 0
    folded = json.loads((tmp_path / "eval_test.json").read_text())
    assert folded["precision"] == "fp32" and folded["images"] == 10_000
    # The fixture was trained and tested in float32: the folded copy scores the same, to a float-rounding flip.
    assert abs(folded["accuracy"] - trained[0]["results"]["test_acc"]) <= 2e-4
    test = load_dataset("fashion-mnist", val_ratio=0.0, download=False).test
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i, 0].numpy()).save(paths[-1])
    capsys.readouterr()
    assert main(["predict", str(checkpoint_path), *map(str, paths), "--topk", "1", "--device", "cpu"]) == 0
    eager = capsys.readouterr().out
    assert main(["predict", str(checkpoint_path), *map(str, paths), "--topk", "1", "--precision", "int8"]) == 0
    int8 = capsys.readouterr().out
    assert [line.split()[1] for line in int8.splitlines()] == [line.split()[1] for line in eager.splitlines()]


def test_int8_on_a_gpu_is_refused_before_any_work(checkpoint_path, capsys, monkeypatch):
    import reslab.inference

    monkeypatch.setattr(reslab.inference, "pick_device", lambda _: torch.device("cuda"))
    assert main(["eval", str(checkpoint_path), "--precision", "int8"]) == 2
    assert "int8 runs on the CPU" in capsys.readouterr().err
