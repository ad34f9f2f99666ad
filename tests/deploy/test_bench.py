"""``reslab bench``: timm's columns, the baselines in the same run, the machine it ran on."""

import csv
import json

import pytest
import torch

from reslab.cli import main
from reslab.deploy.bench import torchvision_twin
from reslab.models import create_model

TIMM_COLUMNS = {"infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size", "infer_gmacs"}


def test_bench_writes_every_backend_with_ratios(checkpoint_path, tmp_path):
    quick = ["-b", "2", "--iters", "1", "--warmup", "1", "--no-torchcompile", "--threads", "2", "--backend", "torch"]
    out = tmp_path / "bench.json"
    assert main(["bench", str(checkpoint_path), *quick, "--precision", "fp32", "int8", "--results-file", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["backend"] for r in rows] == [
        "reslab (no torchvision twin) eager",
        "reslab (no torchvision twin) channels-last + autocast",
        "onnxruntime",
        "reslab torch eager, folded",
        "reslab onnxruntime QDQ",
    ]
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "fp32", "fp32", "int8"]
    assert TIMM_COLUMNS | {"param_count", "ratio", "gflops", "peak_share"} <= set(rows[0])
    assert rows[0]["ratio"] == 1.0 and all(r["infer_samples_per_sec"] > 0 for r in rows)
    assert rows[0]["infer_img_size"] == 28 and rows[0]["infer_batch_size"] == 2
    assert report["peaks"]["fp32"] > 0 and report["provenance"]["machine"]["threads"] == 2
    assert "cpu_flags" in report["provenance"]["machine"] and report["provenance"]["command"].startswith("reslab bench")


def test_bench_csv_and_training(tmp_path):
    out = tmp_path / "bench.csv"
    args = ["bench", "resnet20", "-b", "4", "--iters", "1", "--warmup", "1", "--no-torchcompile", "--no-baselines"]
    assert main([*args, "--bench", "train", "--results-file", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert float(row["train_samples_per_sec"]) > 0 and row["train_img_size"] == "32"


def test_torchvision_twin_holds_the_same_weights():
    model = create_model("resnet18", num_classes=10).eval()
    twin = torchvision_twin(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    assert torchvision_twin(create_model("resnet50_v1", num_classes=10)) is None  # stride on the 1x1: no twin
    assert torchvision_twin(create_model("preact_resnet18", num_classes=10)) is None


@pytest.mark.parametrize(
    "flags", [["resnet19"], ["resnet20", "-b", "0"], ["resnet20", "--img-size", "0"], ["resnet20", "--threads", "0"]]
)
def test_bad_bench_requests_are_one_line_errors(capsys, flags):
    assert main(["bench", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reslab: error:") and err.count("\n") == 1
