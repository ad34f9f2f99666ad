"""What the experiments share: the models they look at, real images to feed them, the uncertainty of what they
measure, and how results are saved.

A "subject" is a model under study. ``load_subjects`` chooses them in this order:

1. ``--checkpoint(s)``: trained checkpoints of your own runs;
2. ``--runs-dir DIR``: ``DIR/<name>/best.pt`` for each model name (where ``reslab explain degradation`` trains);
3. by default, the reference twins shipped inside the package (``reference``: plain-20/56 and ResNet-20/56
   trained on Fashion-MNIST), so every experiment studies trained nets from a fresh clone (issue 16);
4. ``--fresh``: freshly initialized models of the registry, seeded and untrained.

Either way a subject comes with the normalization of its data and how its training split the images.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.data import DatasetInfo, load_dataset
from reslab.data.augment import normalize
from reslab.data.datasets import IN_MEMORY_LOADERS
from reslab.device import pick_device
from reslab.errors import ReslabError
from reslab.models import ResNet, create_model, get_spec

SHIPPED_TWINS = ("plain20", "resnet20", "plain56", "resnet56")  # what `reslab explain all` studies


@dataclass
class Subject:
    """A model under study (in eval mode, on ``device``) and the data it belongs to."""

    label: str  # e.g. "resnet56" (the registry name)
    model: ResNet
    info: DatasetInfo  # classes and the normalization the model expects
    source: str  # "shipped reference weights (resnet56.safetensors)", a checkpoint's path, or "fresh (seed 0)"
    kind: str  # "shipped", "checkpoint" or "fresh"
    # How training split its data (val_ratio, seed, and the training subset of a short run): its "training
    # images" are the ones it trained on, not its validation images. A fresh model trained on nothing: all count.
    val_ratio: float = 0.0
    split_seed: int = 0
    train_subset: int = 0

    @property
    def trained(self) -> bool:
        return self.kind != "fresh"

    @property
    def training_split(self) -> dict[str, Any]:
        """``real_images``' keywords that pick the images this model trained on."""
        return {"val_ratio": self.val_ratio, "split_seed": self.split_seed, "train_subset": self.train_subset}

    def describe(self) -> dict[str, Any]:
        """What each result records about the net it studied (``nets_studied`` reads it)."""
        return {"label": self.label, "source": self.source, "kind": self.kind, "trained": self.trained}


def device_of(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` | ``mps`` -> a torch device, or a one-line ReslabError."""
    return pick_device(name)


def check_in_memory(dataset: str) -> None:
    """A one-line ReslabError for a dataset that is not held in memory (explain reads images by index)."""
    if dataset not in IN_MEMORY_LOADERS:
        raise ReslabError(f"explain works on in-memory datasets ({', '.join(IN_MEMORY_LOADERS)}), not {dataset!r}")


def dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """The classes and training-split normalization of ``dataset`` (as ``reslab train`` computes them)."""
    check_in_memory(dataset)
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
        cfg = ckpt["config"]
        return Subject(
            label=ckpt["model_name"],
            model=model_from_checkpoint(ckpt).to(dev).eval(),
            info=DatasetInfo.from_dict(ckpt["dataset"]),
            source=str(checkpoint),
            kind="checkpoint",
            val_ratio=cfg["val_ratio"],
            split_seed=cfg["seed"],
            train_subset=cfg.get("train_subset") or 0,
        )
    if model is None:
        raise ReslabError("name a model or pass --checkpoint")
    get_spec(model)  # an unknown name fails before any data is read
    info = dataset_info(dataset, data_dir)
    torch.manual_seed(seed)
    net = create_model(model, num_classes=info.num_classes, in_chans=info.channels, **model_args)
    return Subject(label=model, model=net.to(dev).eval(), info=info, source=f"fresh (seed {seed})", kind="fresh")


def load_shipped(name: str, *, device: str | torch.device = "cpu") -> Subject:
    """The reference twin ``name`` shipped with reslab, trained, its SHA-256 checked (``reference.load_weights``)."""
    from reslab.explain import reference

    dev = device if isinstance(device, torch.device) else device_of(device)
    net, entry = reference.load_weights(name)
    split = entry["split"]
    return Subject(
        label=name,
        model=net.to(dev).eval(),
        info=DatasetInfo.from_dict(entry["dataset"]),
        source=f"shipped reference weights ({entry['file']})",
        kind="shipped",
        val_ratio=split["val_ratio"],
        split_seed=split["seed"],
        train_subset=split.get("train_subset") or 0,
    )


def load_subjects(
    models: Iterable[str],
    *,
    checkpoints: list[str] | None = None,
    runs_dir: str | Path | None = None,
    fresh: bool = False,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[Subject]:
    """Several models, in the order of the module docstring: ``checkpoints``; else each name's
    ``<runs_dir>/<name>/best.pt``; else (``fresh``) fresh seeded models; else the shipped trained weights.

    Every name is checked before any model is loaded: an unknown one, or one without shipped weights, is a
    one-line ReslabError.
    """
    models = list(models)
    check_choice(checkpoints=checkpoints, runs_dir=runs_dir, fresh=fresh)
    if checkpoints:
        return [load_subject(checkpoint=c, device=device) for c in checkpoints]
    for name in models:
        get_spec(name)  # an unknown name is called unknown, not "not shipped"
    if runs_dir is not None:
        return [load_subject(checkpoint=Path(runs_dir) / name / "best.pt", device=device) for name in models]
    check_in_memory(dataset)
    if fresh:
        return [
            load_subject(model=name, dataset=dataset, data_dir=data_dir, seed=seed, device=device) for name in models
        ]
    check_shipped(models, dataset)
    return [load_shipped(name, device=device) for name in models]


def check_choice(*, checkpoints: list[str] | None, runs_dir: str | Path | None, fresh: bool) -> None:
    """One of --checkpoint(s), --runs-dir and --fresh at most: each names where the weights come from."""
    choices = (("--checkpoints", checkpoints), ("--runs-dir", runs_dir), ("--fresh", fresh))
    given = [flag for flag, value in choices if value]
    if len(given) > 1:
        raise ReslabError(
            f"{' and '.join(given)} exclude each other: each says where the weights come from "
            "(trained checkpoints, a runs folder, or fresh untrained nets)"
        )


def check_shipped(models: Iterable[str], dataset: str = "fashion-mnist") -> None:
    """A one-line ReslabError for a name without shipped weights, or a dataset they were not trained on."""
    from reslab.explain import reference

    reference.check_shipped(list(models))
    trained_on = {entry["dataset"]["name"] for entry in reference.manifest()["models"].values()}
    if dataset not in trained_on:
        raise ReslabError(
            f"the shipped nets were trained on {', '.join(sorted(trained_on))}, not {dataset}; "
            "pass --fresh for untrained nets, or --checkpoints of your own runs"
        )


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
    train_subset: int = 0,
) -> tuple[Tensor, Tensor]:
    """``count`` images of ``info.name``'s ``split`` ("train" or "test"), chosen by ``seed``, normalized with
    ``info``'s mean and std (the model's own): (count, C, H, W) float32 and labels (count,) int64.

    "train" means the images training saw: pass the model's ``Subject.training_split`` (its ``val_ratio``,
    ``split_seed`` and ``train_subset``) to leave out its validation images and the ones a subset left out.
    """
    from reslab.data.types import subset_of_train

    check_in_memory(info.name)
    bundle = load_dataset(info.name, data_dir=data_dir, val_ratio=val_ratio, seed=split_seed, download=False)
    data = bundle.train if split == "train" else bundle.test
    if split == "train" and train_subset:
        data = subset_of_train(bundle, train_subset, split_seed)  # as the trainer chose it (same seed)
    if data is None:
        raise ReslabError(f"{info.name} has no {split} split here")
    count = min(count, len(data))
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    x = normalize(data.images[index], mean, std)
    return x.to(device), data.labels[index].to(device)


def channels_last(model: nn.Module, *tensors: Tensor) -> tuple[nn.Module, ...]:
    """``model`` (in place) and ``tensors`` in the channels-last memory format, on a CPU; as they are elsewhere.

    The numbers are the same to float32 rounding (tested in tests/models); inference of ResNet-56 on 28x28
    images ran 1.5x faster here (1 thread, 250 images a batch: 495 against 334 images/s).
    """
    if next(model.parameters()).device.type != "cpu":
        return (model, *tensors)
    model.to(memory_format=torch.channels_last)
    return (model, *(t.contiguous(memory_format=torch.channels_last) for t in tensors))


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


# --- uncertainty ----------------------------------------------------------------------------------------------


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy (or error) ``p`` measured on ``n`` independent images: sqrt(p (1 - p) / n)."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else math.nan


def mean_se(values: Tensor) -> tuple[float, float]:
    """The mean of per-image values (N,) and its standard error, std / sqrt(N) (std with N - 1; nan for N < 2).

    Two results on the same images compare by the mean_se of their per-image differences (a paired error,
    smaller than the two errors combined when the images that are hard for one are hard for the other).
    """
    values = values.double().flatten()
    n = len(values)
    se = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return values.mean().item(), se


def nets_studied(nets: Iterable[dict[str, Any]]) -> str:
    """One line naming the nets a result studied and where their weights came from (``Subject.describe``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for net in nets:
        groups.setdefault(net["kind"], []).append(net)
    parts = []
    if "shipped" in groups:
        names = ", ".join(n["label"] for n in groups["shipped"])
        parts.append(f"{names}: trained, the reference weights shipped with reslab (reslab/explain/reference_nets)")
    if "checkpoint" in groups:
        parts.append("trained checkpoints: " + ", ".join(f"{n['label']} ({n['source']})" for n in groups["checkpoint"]))
    if "fresh" in groups:
        names = ", ".join(n["label"] for n in groups["fresh"])
        parts.append(
            f"{names}: FRESH, untrained ({groups['fresh'][0]['source']}); without --fresh the shipped trained nets "
            "are studied"
        )
    return "Nets studied: " + "; ".join(parts) + "."


# --- results on disk ------------------------------------------------------------------------------------------


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
    what: str,
    result: dict[str, Any],
    figures: list[Path],
    summary: list[str],
    out_dir: str | Path,
    *,
    provenance: dict[str, Any],
) -> dict[str, Path]:
    """Write ``<what>.json`` (``provenance``: ``reslab.machine.record()``'s command, commit, date and machine;
    the numbers and the summary) and ``index.html`` (figures and summary).

    Returns the paths written: ``{"json": ..., "html": ...}``.
    """
    from reslab.analysis.html import Page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{what}.json"
    numbers = {"provenance": provenance, "experiment": what, "summary": summary, **result}
    json_path.write_text(json.dumps(_jsonable(numbers), indent=2) + "\n")
    page = Page(f"reslab explain {what}")
    page.text(summary)
    for fig in figures:
        page.image(fig, caption=fig.name)
    page.link(json_path.name, "all numbers (JSON)")
    html_path = page.write(out / "index.html")
    if out.name == what:  # the default layout, explain/<what>/: keep explain/index.html over all of them
        write_overview(out.parent)
    return {"json": json_path, "html": html_path}


def write_overview(root: Path) -> Path:
    """``root/index.html``: each experiment found under ``root`` with its summary and a link to its page, and the
    times of the last ``reslab explain all`` (``root/all.json``) when there is one."""
    from reslab.analysis.html import Page
    from reslab.explain import EXPERIMENTS

    page = Page("reslab explain: residual learning, measured")
    for what in EXPERIMENTS:
        numbers = root / what / f"{what}.json"
        if (root / what / "index.html").is_file() and numbers.is_file():
            page.heading(what)
            page.text(json.loads(numbers.read_text()).get("summary", []))
            page.link(f"{what}/index.html", f"the {what} page, with its figures")
    timings = root / "all.json"
    if timings.is_file():
        run = json.loads(timings.read_text())
        load = run.get("load_average_at_start")
        busy = f", load average {load:.1f} at the start" if load is not None else ""
        where = run.get("provenance", run)  # an all.json from before provenance has date and machine on top
        page.heading(f"Times of `reslab explain all` ({where['date']}, {where['machine']['cpu']}{busy})")
        rows = [(what, f"{seconds:.1f}") for what, seconds in run["seconds"].items()]
        page.table(["experiment", "seconds"], [*rows, ("all", f"{run['total_seconds']:.1f}")])
        page.link(timings.name, "the times and the machine (JSON)")
    return page.write(root / "index.html")


def run_all(
    out_root: str | Path = "explain",
    *,
    device: str = "cpu",
    seed: int | None = None,
    data_dir: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every experiment at its defaults on the shipped nets, each into ``out_root/<what>/``; then
    ``out_root/all.json`` (each experiment's seconds, the total, the machine) and ``out_root/index.html``.

    ``degradation`` trains nothing here: it shows the shipped twins' own training run (``shipped=True``).
    ``options`` adds keywords to one experiment's ``measure`` (``{"lesion": {"images": 100}}``).
    Returns the contents of all.json.
    """
    from reslab.explain import EXPERIMENTS, reference
    from reslab.machine import record as machine_record

    check_shipped(SHIPPED_TWINS)  # before anything is written
    provenance = machine_record(device_of(device), command="reslab explain all")
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work inflates the times
    root = Path(out_root)
    shared = {k: v for k, v in dict(device=device, seed=seed, data_dir=data_dir).items() if v is not None}
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    for what in EXPERIMENTS:
        module = importlib.import_module(f"reslab.explain.{what}")
        kwargs = {"shipped": True} if what == "degradation" else dict(shared)
        begun = time.perf_counter()
        result = module.measure(**{**kwargs, **(options or {}).get(what, {})})
        (root / what).mkdir(parents=True, exist_ok=True)
        summary = module.summarize(result)
        save(what, result, module.plot(result, root / what), summary, root / what, provenance=provenance)
        seconds[what] = round(time.perf_counter() - begun, 1)
        echo(f"== {what} ({seconds[what]:.1f} s)")
        for line in summary:
            echo(line)
    record = {
        "provenance": provenance,
        "seconds": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
        "load_average_at_start": load_at_start,
        "shipped_weights": {k: reference.manifest()[k] for k in ("command", "commit", "date", "steps")},
    }
    (root / "all.json").write_text(json.dumps(record, indent=2) + "\n")
    write_overview(root)
    echo(
        "times: "
        + ", ".join(f"{what} {s:.1f} s" for what, s in seconds.items())
        + f"; all {record['total_seconds']:.1f} s"
    )
    return record
