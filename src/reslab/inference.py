"""Use a trained checkpoint: evaluate it on a dataset split, or predict the classes of image files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from reslab.analysis.plots import plot_confusion_matrix
from reslab.data import DatasetInfo, FolderBatchLoader, TensorBatchLoader, load_dataset
from reslab.data.datasets import recorded_data_dir
from reslab.data.folder import eval_transform, whole_image_folder
from reslab.errors import ReslabError
from reslab.train.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.train.engine import EvalResult, evaluate
from reslab.train.runtime import pick_amp, pick_device


def _info(ckpt: dict[str, Any]) -> DatasetInfo:
    d = dict(ckpt["dataset"])
    d["image_size"] = tuple(d["image_size"])
    return DatasetInfo(**d)


def evaluate_checkpoint(
    path: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 1000,
) -> tuple[EvalResult, dict[str, Any]]:
    """Accuracy, per-class accuracy and confusion matrix of a checkpoint on ``split`` ("test" or "val").

    Writes ``eval_<split>.json`` and ``confusion_<split>.png`` to ``out_dir`` (default: the checkpoint's folder).
    """
    if split not in ("test", "val"):
        raise ReslabError(f"--split must be test or val, not {split!r}")
    ckpt = load_checkpoint(path)
    cfg, info = ckpt["config"], _info(ckpt)
    name = dataset or cfg["dataset"]
    trained_on = Path(cfg["data_dir"]).resolve() if cfg["data_dir"] else None
    if name == "imagefolder" and data_dir and Path(data_dir).resolve() != trained_on:
        if split == "val":
            raise ReslabError("--split val needs the folder the model was trained on; another folder is all test")
        # Another folder than the one trained on: every image in it (or in its test/ folder) is scored.
        data, in_memory = whole_image_folder(data_dir, info.classes), False
    else:
        bundle = load_dataset(
            name,
            data_dir=data_dir or recorded_data_dir(cfg["data_dir"]),
            val_ratio=cfg["val_ratio"],
            seed=cfg["seed"],
            download=cfg["download"],
            image_size=cfg.get("image_size"),
            in_chans=cfg.get("in_chans"),
        )
        if bundle.info.classes != info.classes:
            raise ReslabError(f"{name} has classes {bundle.info.classes[:5]}..., the checkpoint {info.classes[:5]}...")
        data, in_memory = {"test": bundle.test, "val": bundle.val}[split], bundle.in_memory
        if data is None:
            raise ReslabError(f"{name} has no {split} split here")
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev, memory_format=torch.channels_last)
    # Normalize with the statistics the model was trained with, not the reloaded split's.
    if in_memory:
        loader = TensorBatchLoader(data, info, batch_size=batch_size, train=False, device=dev, channels_last=True)
    else:
        data.transform = eval_transform(info.image_size[0], info.channels, info.mean, info.std)
        loader = FolderBatchLoader(
            data,
            batch_size=batch_size,
            train=False,
            device=dev,
            channels_last=True,
            num_workers=cfg.get("num_workers", 2),
        )
    amp = pick_amp(cfg.get("amp", "auto"), dev)
    result = evaluate(
        model, loader, num_classes=info.num_classes, device=dev, amp_dtype=amp, tta_flip=cfg.get("tta_flip", False)
    )
    out = Path(out_dir) if out_dir else Path(path).parent
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(path),
        "dataset": name,
        "split": split,
        "images": int(result.confusion.sum()),
        "accuracy": result.accuracy,
        "loss": result.loss,
        "per_class_accuracy": dict(zip(info.classes, result.per_class_accuracy, strict=True)),
        "classes": info.classes,
        "confusion_matrix": result.confusion.tolist(),
    }
    files = {"json": out / f"eval_{split}.json", "png": out / f"confusion_{split}.png"}
    files["json"].write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion_matrix(
        result.confusion,
        info.classes,
        files["png"],
        title=f"{ckpt['model_name']} on {name} {split}: {result.accuracy:.2%}",
    )
    report["files"] = {k: str(v) for k, v in files.items()}
    return result, report


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def predict_images(
    path: str | Path, images: list[str | Path], *, topk: int = 3, device: str = "auto"
) -> list[Prediction]:
    """Top-k classes of image files. Any size and mode (L, RGB, RGBA, P, ...) becomes what the model expects."""
    ckpt = load_checkpoint(path)
    info = _info(ckpt)
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev)
    to_input = eval_transform(info.image_size[0], info.channels, info.mean, info.std)
    if info.image_size[0] != info.image_size[1]:
        raise ReslabError("predict supports models trained on square images")
    batch = []
    for image_path in images:
        try:
            with Image.open(image_path) as im:
                batch.append(to_input(im))
        except FileNotFoundError:
            raise ReslabError(f"image not found: {image_path}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ReslabError(f"{image_path} is not a readable image: {err}") from None
    k = max(1, min(topk, info.num_classes))
    with torch.no_grad():
        probs = model(torch.stack(batch).to(dev)).float().softmax(dim=1)
    values, indices = probs.topk(k, dim=1)
    return [
        Prediction(str(p), [(info.classes[i], v) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)])
        for p, vals, idx in zip(images, values, indices, strict=True)
    ]
