"""Fine-tuning pretrained ResNets: torchvision's own weights through --weights FILE and --weights imagenet (from
the torch hub cache, no network), adapted heads and stems, frozen parts that stay bit-identical (BatchNorm
statistics too), --finetune's two phases, per-part learning rates, the preprocessing that travels with the
weights, lr-find, and one line for each bad input."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from reslab.checkpoint import load_checkpoint
from reslab.cli import main
from reslab.models import ResNet, create_model
from reslab.models.pretrained import adapt_input_channels
from reslab.train import TrainConfig
from reslab.train.optim import param_groups
from tests.data.fixtures import write_image_folder

RESNET18_FILE = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name  # resnet18-f37072fd.pth


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Three classes of small RGB images, split into train / val / test."""
    return write_image_folder(
        tmp_path_factory.mktemp("pets"), per_class=8, size=24, split_dirs=("train", "val", "test")
    )


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory) -> dict[str, Path]:
    """torchvision's own resnet18 and resnet50 state dicts (built here by torchvision, ImageNet's 1000 classes)."""
    out = tmp_path_factory.mktemp("torchvision")
    files = {}
    for name in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)()
        files[name] = out / f"{name}.pth"
        torch.save(model.state_dict(), files[name])
    return files


def train(folder: Path, out: Path, *flags: str) -> int:
    base = ["train", "--dataset", "imagefolder", "--data-dir", str(folder), "--image-size", "32", "--epochs", "1"]
    # lr 0.001: torchvision's untrained nets give large logits, which lr 0.1 turns into a diverged run
    run = ["--batch-size", "8", "--lr", "0.001", "--device", "cpu", "--quiet", "--num-workers", "0"]
    run += ["--hist-every", "0"]
    return main([*base, *run, "--out-dir", str(out), *flags])


def part_tensors(state: dict, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def test_torchvision_resnet18_fine_tunes_with_frozen_parts_bit_identical(folder, torchvision_files, tmp_path, capsys):
    source = torch.load(torchvision_files["resnet18"], weights_only=True)
    flags = ["--model", "resnet18", "--weights", str(torchvision_files["resnet18"]), "--freeze", "stem,layer1,layer2"]
    assert train(folder, tmp_path / "run", *flags) == 0
    out = capsys.readouterr().out
    assert "fc.weight re-initialized: (1000, 512) in the weights, (3, 512) here" in out
    assert "frozen for the whole run: stem, layer1, layer2 (BatchNorm statistics too)" in out
    trained = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    for key, value in part_tensors(source, frozen).items():  # weights, BN running mean / var / batch count
        assert torch.equal(trained[key], value), key
    moved = [k for k, v in part_tensors(source, ("layer3.", "layer4.")).items() if not torch.equal(trained[k], v)]
    assert any(k.endswith("running_mean") for k in moved) and any(k.endswith("conv1.weight") for k in moved)


def test_torchvision_resnet50_finetune_trains_the_head_first_then_everything(
    folder, torchvision_files, tmp_path, capsys
):
    flags = ["--model", "resnet50", "--weights", str(torchvision_files["resnet50"]), "--finetune", "1"]
    # Untrained, torchvision's ResNet-50 has logits in the hundreds: its first losses are no sign of divergence.
    assert train(folder, tmp_path / "run", *flags, "--epochs", "2", "--max-loss", "1e9") == 0
    assert "epoch 2: training stem, layer1, layer2, layer3, layer4, head; frozen: none" in capsys.readouterr().out
    epochs = [json.loads(line)["norms"] for line in (tmp_path / "run" / "grad_norms.jsonl").read_text().splitlines()]
    assert epochs[0]["fc.weight"] > 0 and epochs[0]["layer4.2.conv3.weight"] == 0 == epochs[0]["conv1.weight"]
    assert epochs[1]["layer4.2.conv3.weight"] > 0 and epochs[1]["conv1.weight"] > 0


def test_imagenet_weights_load_from_the_hub_cache_and_their_preprocessing_is_what_predict_applies(
    folder, torchvision_files, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / RESNET18_FILE).write_bytes(torchvision_files["resnet18"].read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = create_model("resnet18", weights="imagenet", num_classes=3)
    source = torch.load(torchvision_files["resnet18"], weights_only=True)
    assert torch.equal(model.layer3[0].conv1.weight, source["layer3.0.conv1.weight"])
    flags = ["--model", "resnet18", "--weights", "imagenet", "--no-download", "--amp", "off"]  # predict: float32
    assert train(folder, tmp_path / "run", *flags) == 0
    assert "input as the weights expect it: mean (0.485, 0.456, 0.406)" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    info = ckpt["dataset"]
    assert info["mean"] == [0.485, 0.456, 0.406] or tuple(info["mean"]) == (0.485, 0.456, 0.406)
    assert info["image_size"][0] == 32 and info["resize"] == round(256 * 32 / 224)  # --image-size scales both
    image = next((folder / "test" / "dog").iterdir())
    from reslab.inference import predict_images

    predicted = predict_images(tmp_path / "run" / "best.pt", [image], topk=3, device="cpu")[0]
    by_hand = torchvision.transforms.Compose(
        [
            torchvision.transforms.Resize(info["resize"]),
            torchvision.transforms.CenterCrop(32),
            torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(info["mean"], info["std"]),
        ]
    )
    from reslab.checkpoint import model_from_checkpoint

    with Image.open(image) as im:
        x = by_hand(im.convert("RGB"))[None]
    with torch.no_grad():
        probs = model_from_checkpoint(ckpt)(x).softmax(1)[0]
    assert predicted.top[0][1] == pytest.approx(float(probs.max()), abs=1e-4)


def test_a_grayscale_stem_from_rgb_weights_sees_gray_as_rgb_sees_it_repeated():
    rgb = torch.randn(64, 3, 7, 7)
    gray = torch.rand(2, 1, 32, 32)
    expected = torch.nn.functional.conv2d(gray.repeat(1, 3, 1, 1), rgb, stride=2, padding=3)
    got = torch.nn.functional.conv2d(gray, adapt_input_channels(rgb, 1), stride=2, padding=3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    two = adapt_input_channels(rgb, 5)  # the general case: filters cycled, scaled by 3/5
    assert two.shape == (64, 5, 7, 7) and torch.allclose(two[:, 3], rgb[:, 0] * 3 / 5)


def test_layer_decay_gives_each_part_a_fraction_of_the_next_ones_lr():
    model = create_model("resnet18", num_classes=3)
    model.freeze(["stem"])
    groups = param_groups(model, 1e-4, lr=0.1, layer_decay=0.5)
    lrs = {round(g["lr"], 6) for g in groups}
    assert lrs == {0.1, 0.05, 0.025, 0.0125, 0.00625}  # head, layer4 .. layer1; the frozen stem has no group
    assert all(p.requires_grad for g in groups for p in g["params"])
    frozen = {id(p) for p in model.conv1.parameters()}
    assert not frozen & {id(p) for g in groups for p in g["params"]}


def test_frozen_batchnorm_stays_in_inference_mode_whatever_train_says():
    model = ResNet(block="basic", layers=(1, 1), widths=(8, 16), stem="cifar", num_classes=3)
    model.freeze(["stem", "layer1"])
    model.train()
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(4, 3, 8, 8))
    assert torch.equal(model.layer1[0].bn1.running_mean, before)


def folder_hashes(path: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_lr_find_suggests_a_rate_and_leaves_the_run_it_starts_from_unchanged(folder, tmp_path, capsys):
    assert train(folder, tmp_path / "run", "--model", "resnet20", "--model-arg", "layers=[1,1,1]") == 0
    before = folder_hashes(tmp_path / "run")
    flags = ["--model", "resnet20", "--model-arg", "layers=[1,1,1]", "--weights", str(tmp_path / "run" / "best.pt")]
    lr_find = ["lr-find", "--dataset", "imagefolder", "--data-dir", str(folder), "--batch-size", "8"]
    code = main([*lr_find, *flags, "--device", "cpu", "--range-steps", "40", "--out-dir", str(tmp_path / "lr")])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("suggested lr ") and "steepest fall of the smoothed loss" in line
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert found["lrs"][0] == pytest.approx(1e-7) and found["lrs"][0] < found["suggestion"] < found["minimum_lr"]
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 0
    assert folder_hashes(tmp_path / "run") == before


class Payload:
    pass


def _truncated(tmp_path: Path, files: dict) -> Path:
    data = files["resnet18"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.pth"


def _pickled_code(tmp_path: Path, files: dict) -> Path:
    torch.save({"weights": Payload()}, tmp_path / "code.pth")
    return tmp_path / "code.pth"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "resnet34", "--weights", "{resnet18}"], "does not fit the model: keys"),
        (["--model", "resnet18", "--weights", "{truncated}"], "is not a readable PyTorch file"),
        (["--model", "resnet18", "--weights", "{pickled}"], "holds Python objects"),
        (["--model", "resnet50_v1", "--weights", "{resnet50}"], "pass --force-weights"),
        (["--model", "resnet18", "--weights", "{resnet18}", "--freeze", "layer9"], "--freeze layer9: resnet18 has"),
        (["--model", "resnet18", "--weights", "{resnet18}", "--finetune", "2"], "finetune 2 leaves no epoch"),
        (["--model", "resnet18", "--weights", "imagenet", "--no-download"], "not in the torch hub cache"),
        (["--model", "resnet20", "--weights", "imagenet"], "torchvision publishes no ImageNet weights for resnet20"),
    ],
)
def test_bad_weights_and_options_are_one_line_and_write_nothing(
    flags, message, folder, torchvision_files, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    paths = {
        "resnet18": torchvision_files["resnet18"],
        "resnet50": torchvision_files["resnet50"],
        "truncated": _truncated(tmp_path, torchvision_files),
        "pickled": _pickled_code(tmp_path, torchvision_files),
    }
    flags = [f.format(**{k: str(v) for k, v in paths.items()}) for f in flags]
    assert train(folder, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_lr_find_refuses_a_folder_that_exists(folder, tmp_path, capsys):
    (tmp_path / "lr").mkdir()
    flags = ["--dataset", "imagefolder", "--data-dir", str(folder), "--out-dir", str(tmp_path / "lr")]
    assert main(["lr-find", *flags, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists: lr-find writes only a new folder" in err and len(err.splitlines()) == 1
    assert list((tmp_path / "lr").iterdir()) == []


def test_finetune_options_are_checked_when_read():
    from reslab import ReslabError
    from reslab.train import from_dict

    with pytest.raises(ReslabError, match="give --weights too"):
        from_dict({"finetune": 1})
    with pytest.raises(ReslabError, match="mean and std go together"):
        from_dict({"mean": [0.5], "std": [0.2, 0.3]})
    assert TrainConfig().layer_decay == 0.0


def test_a_finetune_run_resumed_mid_way_is_bit_identical_without_its_weights_file(
    tiny_config, tmp_path, signal_at_step
):
    from reslab.train import fit
    from reslab.train.signals import TrainingStopped
    from tests.train.test_trainer import assert_same_run

    fit(tiny_config(epochs=1, out_dir=str(tmp_path / "source")))  # a reslab checkpoint to start from
    weights = tmp_path / "weights.pt"
    weights.write_bytes((tmp_path / "source" / "best.pt").read_bytes())
    options = dict(epochs=3, weights=str(weights), finetune=1, layer_decay=0.5, schedule="onecycle")
    fit(tiny_config(**options, out_dir=str(tmp_path / "straight")))
    cut = tiny_config(**options, out_dir=str(tmp_path / "cut"), save_every_steps=4)
    signal_at_step(10)  # step 10 of the head-only first epoch (15 steps an epoch)
    with pytest.raises(TrainingStopped):
        fit(cut)
    signal_at_step(None)
    weights.unlink()  # a resumed run takes everything from its checkpoint
    fit(cut, resume="auto")
    straight, resumed = (load_checkpoint(tmp_path / n / "last.pt") for n in ("straight", "cut"))
    assert_same_run(straight, resumed)
    assert straight["dataset"] == resumed["dataset"]


def test_bad_freeze_names_leave_an_older_run_alone_even_with_overwrite(folder, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"an older run")
    flags = ["--model", "resnet20", "--freeze", "layer4", "--overwrite"]
    assert train(folder, run, *flags) == 2
    assert "--freeze layer4: resnet20 has the parts stem, layer1, layer2, layer3" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == b"an older run"
