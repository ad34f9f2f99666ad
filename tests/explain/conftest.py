import dataclasses
import json
from pathlib import Path

import pytest
import torch

from reslab.checkpoint import FORMAT
from reslab.data import DatasetInfo
from reslab.train import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP's spin-waiting
    # made these tests about 10x slower with two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_checkpoint(path: Path, model, info: DatasetInfo, **config) -> Path:
    """A reslab checkpoint of ``model`` as `reslab train` writes it (the fields explain reads), without training."""
    cfg = TrainConfig(model=model.name, **config)
    ckpt = {
        "format": FORMAT,
        "model_name": cfg.model,
        "model_config": model.config,
        "dataset": dataclasses.asdict(info),
        "config": cfg.to_dict(),
        "model": model.state_dict(),
    }
    torch.save(ckpt, path)
    return path


# The four shipped twins as tiny nets (the 20s one block per stage, the 56s two), in the files and manifest that
# benchmarks/reference_twins.py writes: tests of "shipped by default" run in milliseconds and whether or not the
# real weights are in the checkout.
TINY_SHIPPED = {"plain20": [1, 1, 1], "resnet20": [1, 1, 1], "plain56": [2, 2, 2], "resnet56": [2, 2, 2]}
SHIPPED_SPLIT = {"val_ratio": 0.1, "seed": 0, "train_subset": 60}


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, "train_images": 60, "train_acc": 0.5 + 0.1 * e, "val_acc": 0.4 + 0.1 * e}
            for e in range(epochs)]  # fmt: skip


def write_shipped(folder: Path, data: Path) -> Path:
    """A reference_nets folder with tiny nets for ``data`` (an MNIST-like folder): safetensors and manifest."""
    from safetensors.torch import save_file

    from reslab.explain.common import dataset_info
    from reslab.explain.reference import sha256
    from reslab.models import create_model

    folder.mkdir(parents=True)
    info = dataclasses.asdict(dataset_info("fashion-mnist", str(data)))
    models = {}
    for i, (name, layers) in enumerate(TINY_SHIPPED.items()):
        torch.manual_seed(i)
        model = create_model(name, num_classes=10, in_chans=1, layers=layers)
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        final = {split: {"error": 0.1 * (i + 1), "se": 0.01, "images": 60} for split in ("train", "test")}
        models[name] = {"file": path.name, "sha256": sha256(path), "bytes": path.stat().st_size,
                        "model_config": model.config, "dataset": info, "split": SHIPPED_SPLIT,
                        "history": _history(3), "final": final,
                        "results": {"train_seconds": 1.0, "device": "cpu", "amp": None}}  # fmt: skip
    manifest = {"command": "python benchmarks/reference_twins.py", "commit": "0" * 40, "date": "2025-01-01",
                "machine": {"cpu": "test"}, "seconds": 4.0, "budget": "1m", "steps": 30,
                "recipe": {"dataset": "fashion-mnist", "batch_size": 128}, "models": models}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="session")
def shipped_files(tmp_path_factory) -> tuple[Path, Path]:
    from tests.data.fixtures import write_mnist_like

    root = tmp_path_factory.mktemp("shipped")
    data = write_mnist_like(root / "fashion", n_train=100, n_test=40)
    return write_shipped(root / "reference_nets", data), data


@pytest.fixture
def shipped(shipped_files, monkeypatch) -> str:
    """The tiny shipped twins in place of the package's; returns the folder of their (MNIST-like) data."""
    from reslab.explain import reference

    folder, data = shipped_files
    monkeypatch.setattr(reference, "FOLDER", folder)
    monkeypatch.setattr(reference, "MANIFEST", folder / "manifest.json")
    return str(data)
