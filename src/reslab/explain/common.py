"""What the experiments share: the models they look at, real images to feed them, and how results are saved.

A "subject" is a model under study: a trained checkpoint when one is given or found in the runs folder
(``runs/degradation/<name>/best.pt``, what ``reslab explain degradation`` leaves), otherwise a freshly
initialized model of the registry, seeded. Either way it comes with the normalization of its data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.data import DatasetInfo, load_dataset
from reslab.data.augment import normalize
from reslab.data.datasets import IN_MEMORY_LOADERS
from reslab.errors import ReslabError
from reslab.models import ResNet, create_model, get_spec
from reslab.train.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.train.runtime import pick_device

DEFAULT_RUNS_DIR = "runs/degradation"  # where `reslab explain degradation` trains its models


@dataclass
class Subject:
    """A model under study (in eval mode, on ``device``) and the data it belongs to."""

    label: str  # e.g. "resnet56" (the registry name)
    model: ResNet
    info: DatasetInfo  # classes and the normalization the model expects
    source: str  # the checkpoint's path, or "fresh (seed 0)"
    trained: bool
    # How training split its data (the checkpoint's val_ratio and seed): its "training images" exclude the
    # validation images it never trained on. A fresh model trained on nothing: all training images count.
    val_ratio: float = 0.0
    split_seed: int = 0


def device_of(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps`` -> a torch device, or a one-line ReslabError."""
    return pick_device(name)


def _check_in_memory(dataset: str) -> None:
    if dataset not in IN_MEMORY_LOADERS:
        raise ReslabError(f"explain works on in-memory datasets ({', '.join(IN_MEMORY_LOADERS)}), not {dataset!r}")


def dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """The classes and training-split normalization of ``dataset`` (as ``reslab train`` computes them)."""
    _check_in_memory(dataset)
    return load_dataset(dataset, data_dir=data_dir, download=False).info


def load_subject(
    *,
    checkpoint: str | Path | None = None,
    model: str | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **model_args: Any,
) -> Subject:
    """One model: from ``checkpoint`` when given, else ``create_model(model)`` fresh for ``dataset``, seeded.

    ``model_args`` (e.g. ``layers=[1, 1, 1]``) apply to a fresh model only.
    """
    dev = device if isinstance(device, torch.device) else device_of(device)
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        info = DatasetInfo(**{**ckpt["dataset"], "image_size": tuple(ckpt["dataset"]["image_size"])})
        net = model_from_checkpoint(ckpt)
        cfg = ckpt["config"]
        return Subject(
            ckpt["model_name"], net.to(dev).eval(), info, str(checkpoint), True, cfg["val_ratio"], cfg["seed"]
        )
    if model is None:
        raise ReslabError("name a model or pass --checkpoint")
    get_spec(model)  # an unknown name fails before any data is read
    info = dataset_info(dataset, data_dir)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=info.num_classes, in_chans=info.channels, **model_args)
    return Subject(model, net.to(dev).eval(), info, f"fresh (seed {seed})", False)


def load_subjects(
    models: list[str],
    *,
    checkpoints: list[str] | None = None,
    runs_dir: str | Path | None = DEFAULT_RUNS_DIR,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[Subject]:
    """Several models: the given checkpoints, or each name's ``<runs_dir>/<name>/best.pt`` where it exists,
    else a fresh model. Pass ``runs_dir=None`` to always start fresh."""
    if checkpoints:
        return [load_subject(checkpoint=c, device=device) for c in checkpoints]
    subjects = []
    for name in models:
        found = Path(runs_dir) / name / "best.pt" if runs_dir else None
        if found is not None and found.is_file():
            subjects.append(load_subject(checkpoint=found, device=device))
        else:
            subjects.append(load_subject(model=name, dataset=dataset, data_dir=data_dir, seed=seed, device=device))
    return subjects


def real_images(
    info: DatasetInfo,
    *,
    split: str = "test",
    count: int = 512,
    seed: int = 0,
    data_dir: str | None = None,
    device: str | torch.device = "cpu",
    val_ratio: float = 0.0,
    split_seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``count`` images of ``info.name``'s ``split`` ("train" or "test"), chosen by ``seed``, normalized with
    ``info``'s mean and std (the model's own): (count, C, H, W) float32 and labels (count,) int64.

    "train" means the images training saw: pass the model's ``val_ratio`` and ``split_seed`` (a Subject's) to
    leave out its validation images.
    """
    _check_in_memory(info.name)
    bundle = load_dataset(info.name, data_dir=data_dir, val_ratio=val_ratio, seed=split_seed, download=False)
    data = bundle.train if split == "train" else bundle.test
    if data is None:
        raise ReslabError(f"{info.name} has no {split} split here")
    count = min(count, len(data))
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    x = normalize(data.images[index], mean, std)
    return x.to(device), data.labels[index].to(device)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (as it is: set train/eval before) on normalized images ``x``."""
    correct = sum(
        int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
    )
    return correct / max(len(y), 1)


def residual_blocks(model: ResNet) -> list[tuple[str, nn.Module]]:
    """Every block of every stage with its name (``layer1.0``, ...), in forward order."""
    stages = zip(model.stage_names, model.stages(), strict=True)
    return [(f"{name}.{i}", block) for name, stage in stages for i, block in enumerate(stage)]


def line_style(result: dict[str, Any], name: str) -> dict[str, Any]:
    """Matplotlib style of model ``name`` in ``result["models"]``: one color per depth, plain dashed, residual
    solid (the papers' convention)."""
    depths = sorted({m["depth"] for m in result["models"].values()})
    model = result["models"][name]
    return dict(color=f"C{depths.index(model['depth'])}", linestyle="-" if model["residual"] else "--", label=name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf / nan
    if isinstance(value, Path):
        return str(value)
    return value


def save(
    what: str, result: dict[str, Any], figures: list[Path], summary: list[str], out_dir: str | Path
) -> dict[str, Path]:
    """Write ``<what>.json`` (the numbers and the summary) and ``index.html`` (figures and summary).

    Returns the paths written: ``{"json": ..., "html": ...}``.
    """
    from reslab.analysis.html import Page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{what}.json"
    json_path.write_text(json.dumps(_jsonable({"experiment": what, "summary": summary, **result}), indent=2) + "\n")
    page = Page(f"reslab explain {what}")
    page.text(summary)
    for fig in figures:
        page.image(fig, caption=fig.name)
    page.link(json_path.name, "all numbers (JSON)")
    html_path = page.write(out / "index.html")
    if out.name == what:  # the default layout, explain/<what>/: keep explain/index.html over all of them
        _write_overview(out.parent)
    return {"json": json_path, "html": html_path}


def _write_overview(root: Path) -> Path:
    """``root/index.html``: each experiment found under ``root`` with its summary and a link to its page."""
    from reslab.analysis.html import Page
    from reslab.explain import EXPERIMENTS

    page = Page("reslab explain: residual learning, measured")
    for what in EXPERIMENTS:
        numbers = root / what / f"{what}.json"
        if (root / what / "index.html").is_file() and numbers.is_file():
            page.heading(what)
            page.text(json.loads(numbers.read_text()).get("summary", []))
            page.link(f"{what}/index.html", f"the {what} page, with its figures")
    return page.write(root / "index.html")
