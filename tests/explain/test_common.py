"""What the experiments share, and `reslab explain` on the command line: files written, one-line errors."""

import json

import pytest
import torch

from reslab.cli import main
from reslab.explain.common import dataset_info, load_subject, load_subjects, real_images
from reslab.models import create_model
from tests.data.fixtures import write_mnist_like
from tests.explain.conftest import save_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("fashion"), n_train=100, n_test=20)


def test_training_images_of_a_checkpoint_leave_out_its_validation_images(data, tmp_path):
    info = dataset_info("fashion-mnist", str(data))
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1])
    subject = load_subject(checkpoint=save_checkpoint(tmp_path / "best.pt", model, info, val_ratio=0.2, seed=3))
    assert subject.trained and (subject.val_ratio, subject.split_seed) == (0.2, 3)
    kw = dict(split="train", count=1000, data_dir=str(data))
    seen, _ = real_images(subject.info, **kw, val_ratio=subject.val_ratio, split_seed=subject.split_seed)
    everything, _ = real_images(subject.info, **kw)
    assert len(seen) == 80 and len(everything) == 100
    # The 80 are the ones `reslab train` trained on: the same stratified split as the trainer's.
    from reslab.data import load_dataset

    train = load_dataset("fashion-mnist", data_dir=str(data), val_ratio=0.2, seed=3).train
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    expected = {tuple(((img.float() / 255 - mean[:, None, None]) / std[:, None, None]).flatten()[:50].tolist())
                for img in train.images}  # fmt: skip
    assert all(tuple(x.flatten()[:50].tolist()) in expected for x in seen)


def test_a_missing_run_falls_back_to_a_fresh_seeded_model(data, tmp_path):
    a, b = (load_subjects(["resnet20"], runs_dir=tmp_path, data_dir=str(data), seed=5)[0] for _ in range(2))
    assert not a.trained and a.source == "fresh (seed 5)"
    pairs = zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_explain_command_writes_numbers_figure_page_and_overview(tmp_path, capsys):
    out = tmp_path / "explain" / "block"
    assert main(["explain", "block", "--block", "basic", "--shape", "2", "8", "6", "6", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    numbers = json.loads((out / "block.json").read_text())
    assert numbers["experiment"] == "block" and numbers["shape"] == [2, 8, 6, 6]
    assert numbers["summary"][0] in printed and (out / "block.png").is_file()
    page = (out / "index.html").read_text()
    assert page.count("<img") == 1 and "block.json" in page
    overview = (tmp_path / "explain" / "index.html").read_text()
    assert 'href="block/index.html"' in overview


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["responses", "--models", "resnet21"], "unknown model 'resnet21'"),
        (["lesion", "--images", "0"], "--images"),
        (["degradation", "--depths", "20", "20"], "at least two different depths"),
        (["landscape", "--checkpoints", "missing.pt"], "checkpoint not found: missing.pt"),
        (["gradients", "--dataset", "imagefolder"], "explain works on in-memory datasets"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path, capsys):
    assert main(["explain", *args, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
