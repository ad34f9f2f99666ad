"""What the experiments share, and `reslab explain` on the command line: which nets are studied (the shipped
trained ones by default), the uncertainty helpers, files written, one-line errors, and `reslab explain all`."""

import json
import math

import pytest
import torch

from reslab.cli import main
from reslab.data import load_dataset
from reslab.data.types import subset_of_train
from reslab.explain import EXPERIMENTS, reference
from reslab.explain.common import (
    binomial_se,
    dataset_info,
    load_subject,
    load_subjects,
    mean_se,
    nets_studied,
    real_images,
    run_all,
)
from reslab.models import create_model
from tests.data.fixtures import write_mnist_like
from tests.explain.conftest import SHIPPED_SPLIT, TINY_SHIPPED, save_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("fashion"), n_train=100, n_test=20)


def _normalized(images, info):
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    return {tuple(((img.float() / 255 - mean[:, None, None]) / std[:, None, None]).flatten()[:50].tolist())
            for img in images}  # fmt: skip


def test_training_images_of_a_checkpoint_leave_out_its_validation_images(data, tmp_path):
    info = dataset_info("fashion-mnist", str(data))
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1])
    subject = load_subject(checkpoint=save_checkpoint(tmp_path / "best.pt", model, info, val_ratio=0.2, seed=3))
    assert subject.trained and subject.kind == "checkpoint" and (subject.val_ratio, subject.split_seed) == (0.2, 3)
    kw = dict(split="train", count=1000, data_dir=str(data))
    seen, _ = real_images(subject.info, **kw, **subject.training_split)
    everything, _ = real_images(subject.info, **kw)
    assert len(seen) == 80 and len(everything) == 100
    # The 80 are the ones `reslab train` trained on: the same stratified split as the trainer's.
    train = load_dataset("fashion-mnist", data_dir=str(data), val_ratio=0.2, seed=3).train
    expected = _normalized(train.images, info)
    assert all(tuple(x.flatten()[:50].tolist()) in expected for x in seen)


def test_shipped_nets_are_the_default_and_say_so(shipped):
    subjects = load_subjects(["resnet20", "plain56"], data_dir=shipped)
    assert [s.label for s in subjects] == ["resnet20", "plain56"]
    for subject in subjects:
        assert subject.kind == "shipped" and subject.trained
        assert subject.source == f"shipped reference weights ({subject.label}.safetensors)"
        expected, _ = reference.load_weights(subject.label)
        assert all(torch.equal(a, b) for a, b in zip(subject.model.state_dict().values(),
                                                     expected.state_dict().values(), strict=True))  # fmt: skip
        assert not subject.model.training and subject.info.image_size == (28, 28)
    line = nets_studied(s.describe() for s in subjects)
    assert line.startswith("Nets studied: resnet20, plain56: trained, the reference weights shipped with reslab")


def test_a_shipped_nets_training_images_are_its_training_subset(shipped):
    (subject,) = load_subjects(["resnet20"], data_dir=shipped)
    assert subject.training_split == {"val_ratio": 0.1, "split_seed": 0, "train_subset": 60}
    seen, _ = real_images(subject.info, split="train", count=1000, data_dir=shipped, **subject.training_split)
    bundle = load_dataset("fashion-mnist", data_dir=shipped, val_ratio=SHIPPED_SPLIT["val_ratio"], seed=0)
    subset = subset_of_train(bundle, 60, 0)
    assert len(seen) == 60 and {tuple(x.flatten()[:50].tolist()) for x in seen} == _normalized(
        subset.images, subject.info
    )


def test_fresh_gives_seeded_untrained_nets(data, shipped):
    a, b = (load_subjects(["resnet20"], fresh=True, data_dir=str(data), seed=5)[0] for _ in range(2))
    assert not a.trained and a.kind == "fresh" and a.source == "fresh (seed 5)"
    pairs = zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert "FRESH, untrained (fresh (seed 5))" in nets_studied([a.describe()])


def test_a_runs_dir_is_read_and_a_missing_run_is_an_error(data, tmp_path):
    info = dataset_info("fashion-mnist", str(data))
    (tmp_path / "resnet20").mkdir()
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1])
    save_checkpoint(tmp_path / "resnet20" / "best.pt", model, info)
    (subject,) = load_subjects(["resnet20"], runs_dir=tmp_path)
    assert subject.kind == "checkpoint" and subject.source == str(tmp_path / "resnet20" / "best.pt")
    with pytest.raises(Exception, match="checkpoint not found"):  # no silent fresh stand-in
        load_subjects(["plain20"], runs_dir=tmp_path)


def test_uncertainty_helpers_on_known_cases():
    assert binomial_se(0.9, 1000) == pytest.approx(math.sqrt(0.9 * 0.1 / 1000)) == pytest.approx(0.0094868, abs=1e-7)
    assert binomial_se(0.5, 2500) == pytest.approx(0.01)
    mean, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(torch.tensor([1.0, 2, 3, 4]).std().item() / 2)
    assert math.isnan(mean_se(torch.tensor([1.0]))[1])


def test_explain_command_writes_numbers_figure_page_and_overview(tmp_path, capsys):
    out = tmp_path / "explain" / "block"
    assert main(["explain", "block", "--block", "basic", "--shape", "2", "8", "6", "6", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads((out / "block.json").read_text())
    assert numbers["experiment"] == "block" and numbers["shape"] == [2, 8, 6, 6]
    assert numbers["provenance"]["machine"]["fp32_matmul_gflops"] > 0  # the machine a claim holds on
    assert numbers["summary"][0] in printed and (out / "block.png").is_file()
    assert numbers["uncertainty"].startswith("none to estimate: these are exact numerical checks")
    page = (out / "index.html").read_text()
    assert page.count("<img") == 1 and "block.json" in page
    overview = (tmp_path / "explain" / "index.html").read_text()
    assert 'href="block/index.html"' in overview


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["responses", "--models", "resnet21"], "unknown model 'resnet21'"),
        (["lesion", "--models", "resnet110"], "no shipped trained weights for resnet110 (shipped: plain20"),
        (["lesion", "--images", "0"], "--images"),
        (["lesion", "--fresh", "--checkpoints", "a.pt"], "--checkpoints and --fresh exclude each other"),
        (["gradients", "--fresh", "--checkpoints", "a.pt"], "--checkpoints and --fresh exclude each other"),
        (["landscape", "--runs-dir", "runs", "--fresh"], "--runs-dir and --fresh exclude each other"),
        (["responses", "--dataset", "cifar10"], "the shipped nets were trained on fashion-mnist, not cifar10"),
        (["degradation", "--depths", "20", "20"], "at least two different depths"),
        (["landscape", "--checkpoints", "missing.pt"], "checkpoint not found: missing.pt"),
        (["gradients", "--dataset", "imagefolder"], "explain works on in-memory datasets"),
        (["block", "--block-name", "layer1.0", "--model", "resnet110"], "no shipped trained weights for resnet110"),
    ],
)
def test_user_errors_are_one_line_and_write_nothing(args, message, shipped, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", *args, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_a_damaged_shipped_file_is_one_line(shipped, monkeypatch, tmp_path, capsys):
    entry = reference.manifest()["models"]["resnet56"]
    monkeypatch.setitem(entry, "sha256", "0" * 64)
    out = tmp_path / "out"
    assert main(["explain", "lesion", "--images", "4", "--data-dir", shipped, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resnet56.safetensors fail their SHA-256 check" in err and not out.exists()


TINY = {
    "block": dict(block="basic", shape=(2, 8, 6, 6)),
    "gradients": dict(depths=(8,), steps=1, batch_size=4, probes=2),
    "responses": dict(images=8),
    "lesion": dict(images=8, draws=2),
    "landscape": dict(images=4, grid_images=2, points=3, grid=3),
}


def test_explain_all_writes_every_experiment_an_index_and_its_times(shipped, tmp_path):
    printed = []
    record = run_all(tmp_path / "x", data_dir=shipped, options=TINY, echo=printed.append)
    root = tmp_path / "x"
    assert list(record["seconds"]) == list(EXPERIMENTS) and record["total_seconds"] >= max(record["seconds"].values())
    assert json.loads((root / "all.json").read_text()) == record and record["provenance"]["machine"]["cpu"]
    index = (root / "index.html").read_text()
    for what in EXPERIMENTS:
        assert f'href="{what}/index.html"' in index and (root / what / f"{what}.json").is_file()
        assert any(line.startswith(f"== {what} (") for line in printed)
    assert "Times of `reslab explain all`" in index and printed[-1].startswith("times: block ")
    # Trained nets everywhere; degradation shows the shipped run, trained nothing.
    lesion = json.loads((root / "lesion" / "lesion.json").read_text())
    assert {net["kind"] for net in lesion["models"]} == {"shipped"}
    degradation = json.loads((root / "degradation" / "degradation.json").read_text())
    assert degradation["steps"] == 30 and set(degradation["runs"]) == set(TINY_SHIPPED)
    assert not (tmp_path / "runs").exists()


def test_explain_without_an_experiment_runs_them_all(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr("reslab.explain.common.run_all", lambda root, **kw: calls.append((root, kw)))
    assert main(["explain"]) == 0
    assert main(["explain", "all", "--out-dir", str(tmp_path), "--seed", "2"]) == 0
    assert [str(root) for root, _ in calls] == ["explain", str(tmp_path)]
    assert calls[1][1] == {"device": "cpu", "seed": 2, "data_dir": None}


def test_explain_all_without_shipped_weights_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(reference, "MANIFEST", tmp_path / "none.json")
    assert main(["explain", "all", "--out-dir", str(tmp_path / "x")]) == 2
    assert "no shipped trained weights for plain20" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_package_ships_the_four_trained_twins():
    from reslab.explain.common import SHIPPED_TWINS

    assert set(reference.shipped()) == set(SHIPPED_TWINS)
    for subject in load_subjects(SHIPPED_TWINS):  # every file passes its SHA-256 check
        assert subject.kind == "shipped" and subject.model.depth == int(subject.label[-2:])
        assert subject.model.config["residual"] == subject.label.startswith("resnet")


def test_the_overview_reads_an_all_json_from_before_provenance(tmp_path):
    """An explain/ folder from an earlier version keeps working: its all.json had date and machine on top."""
    from reslab.explain.common import write_overview

    old = {
        "date": "2026-12-01 10:00:00",
        "machine": {"cpu": "AMD EPYC"},
        "seconds": {"block": 5.0},
        "total_seconds": 5.0,
    }
    (tmp_path / "all.json").write_text(json.dumps(old))
    assert "2026-12-01 10:00:00, AMD EPYC" in write_overview(tmp_path).read_text()
