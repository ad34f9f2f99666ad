"""The shipped reference twins: plain-20, ResNet-20, plain-56 and ResNet-56 trained on Fashion-MNIST.

They are what ``reslab explain`` studies when no checkpoint is given, so a lesion study or a loss landscape is
measured on trained nets from a fresh clone, in seconds. They were trained by the committed command
``python benchmarks/reference_twins.py`` (the degradation experiment at a longer budget; its manifest records
the command, commit, machine, seconds, every epoch's metrics and the final errors) and are stored as
safetensors with their SHA-256, checked at every load.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from reslab.errors import ReslabError

FOLDER = Path(__file__).parent / "reference_nets"
MANIFEST = FOLDER / "manifest.json"


@functools.cache
def _manifest_at(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def manifest() -> dict[str, Any] | None:
    """The shipped manifest (command, commit, machine, per-model metrics, files and checksums), or None."""
    return _manifest_at(MANIFEST)


def shipped() -> tuple[str, ...]:
    """Registry names of the models shipped with trained weights."""
    found = manifest()
    return tuple(found["models"]) if found else ()


def check_shipped(names: list[str] | tuple[str, ...]) -> None:
    """One line naming what is shipped, for a name that is not."""
    missing = [n for n in names if n not in shipped()]
    if missing:
        have = ", ".join(shipped()) or "none (the package was installed without reslab/explain/reference_nets)"
        raise ReslabError(
            f"no shipped trained weights for {', '.join(missing)} (shipped: {have}); "
            "pass --checkpoint(s) of your own runs, or --fresh for untrained nets"
        )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_weights(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped model ``name`` (eval mode, on the CPU) and its manifest entry, after checking its SHA-256."""
    from safetensors.torch import load_file

    from reslab.models import ResNet

    check_shipped([name])
    entry = manifest()["models"][name]
    path = FOLDER / entry["file"]
    if not path.is_file():
        raise ReslabError(f"the shipped weights {path} are missing; reinstall reslab")
    if sha256(path) != entry["sha256"]:
        raise ReslabError(f"the shipped weights {path} fail their SHA-256 check (damaged or changed); reinstall reslab")
    model = ResNet(**entry["model_config"])
    model.load_state_dict(load_file(str(path)))  # strict: every tensor, no other
    return model.eval(), entry


def test_accuracy(name: str, *, images: int | None = None, data_dir: str | None = None) -> tuple[float, int]:
    """(accuracy, images) of the shipped model ``name`` on the first ``images`` Fashion-MNIST test images (all
    10,000 when None), in float32 with BatchNorm in inference mode: what its manifest records, checked again."""
    from reslab.data import load_dataset
    from reslab.data.loaders import TensorBatchLoader
    from reslab.data.types import DatasetInfo
    from reslab.train import evaluate

    model, entry = load_weights(name)
    info = DatasetInfo.from_dict(entry["dataset"])
    test = load_dataset(info.name, data_dir=data_dir, val_ratio=0.0, download=False).test
    if images is not None:
        test = test.subset(torch.arange(min(images, len(test))))
    loader = TensorBatchLoader(test, info, batch_size=1000, train=False, device=torch.device("cpu"))
    result = evaluate(model, loader, num_classes=info.num_classes, device=torch.device("cpu"), amp_dtype=None)
    return result.accuracy, len(test)
