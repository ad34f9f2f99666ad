"""Use a trained checkpoint: evaluate it on a dataset split, or predict the classes of image files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reslab.analysis.plots import plot_confusion_matrix
from reslab.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.data import DataBundle, DatasetInfo, FolderBatchLoader, TensorBatchLoader, load_dataset
from reslab.data.datasets import recorded_data_dir
from reslab.data.folder import TransformSubset, info_transform, whole_image_folder
from reslab.data.verify import DEFAULT_MAX_IMAGE_PIXELS, read_image
from reslab.device import pick_amp, pick_device
from reslab.errors import ReslabError
from reslab.train.engine import EvalResult, autocast, evaluate


def _max_pixels(cfg: dict[str, Any]) -> int:
    """The run's decompression-bomb limit: image files are read for eval and predict as training read them."""
    return cfg.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS


def _bundle(ckpt: dict[str, Any], name: str, data_dir: str | None) -> DataBundle:
    """The checkpoint's dataset (or ``name``), split as in training, with the classes the model knows."""
    cfg, info = ckpt["config"], DatasetInfo.from_dict(ckpt["dataset"])
    bundle = load_dataset(
        name,
        data_dir=data_dir or recorded_data_dir(cfg["data_dir"]),
        val_ratio=cfg["val_ratio"],
        seed=cfg["seed"],
        download=cfg["download"],
        image_size=cfg.get("image_size"),
        in_chans=cfg.get("in_chans"),
        on_bad_image=cfg.get("on_bad_image", "skip"),
        max_image_pixels=_max_pixels(cfg),
    )
    if bundle.info.classes != info.classes:
        raise ReslabError(f"{name} has classes {bundle.info.classes[:5]}..., the checkpoint {info.classes[:5]}...")
    return bundle


def _split(ckpt: dict[str, Any], name: str, data_dir: str | None, split: str) -> tuple[Any, bool]:
    """(the images of ``split``, whether they are held in memory)."""
    cfg, info = ckpt["config"], DatasetInfo.from_dict(ckpt["dataset"])
    trained_on = Path(cfg["data_dir"]).resolve() if cfg["data_dir"] else None
    if name == "imagefolder" and data_dir and Path(data_dir).resolve() != trained_on:
        if split == "val":
            raise ReslabError("--split val needs the folder the model was trained on; another folder is all test")
        # Another folder than the one trained on: every image in it (or in its test/ folder) is scored.
        return whole_image_folder(data_dir, info.classes, max_image_pixels=_max_pixels(cfg)), False
    bundle = _bundle(ckpt, name, data_dir)
    data = {"test": bundle.test, "val": bundle.val, "train": bundle.train}[split]
    if data is None:
        raise ReslabError(f"{name} has no {split} split here")
    return data, bundle.in_memory


def _loader(ckpt: dict[str, Any], data: Any, in_memory: bool, device: torch.device, batch_size: int):
    """Fixed-order batches (x normalized with the training statistics, y) of ``data`` on ``device``."""
    info = DatasetInfo.from_dict(ckpt["dataset"])
    if in_memory:
        return TensorBatchLoader(data, info, batch_size=batch_size, train=False, device=device, channels_last=True)
    data.transform = info_transform(info)
    workers = ckpt["config"].get("num_workers", 2)
    return FolderBatchLoader(
        data, batch_size=batch_size, train=False, device=device, channels_last=True, num_workers=workers
    )


def checkpoint_batches(
    ckpt: dict[str, Any],
    *,
    split: str = "test",
    data_dir: str | None = None,
    device: torch.device | None = None,
    batch_size: int = 1000,
):
    """Fixed-order (x, y) batches of the checkpoint's own dataset's ``split`` ("train", "val" or "test"),
    normalized with the training statistics: x (B, C, H, W) float on ``device`` (default: the CPU), y (B,)
    class indices."""
    data, in_memory = _split(ckpt, ckpt["config"]["dataset"], data_dir, split)
    return _loader(ckpt, data, in_memory, device or torch.device("cpu"), batch_size)


def calibration_batches(
    ckpt: dict[str, Any], *, data_dir: str | None = None, images: int = 512, batch_size: int = 64
) -> list[Tensor]:
    """``images`` normalized images of the checkpoint's own training split (a seeded random choice, never
    validation or test images), in CPU batches, to calibrate int8. ``data_dir``: where that dataset is now,
    if not where training found it."""
    if images < 1:
        raise ReslabError(f"--calibration-images must be at least 1, not {images}")
    bundle = _bundle(ckpt, ckpt["config"]["dataset"], data_dir)
    data = bundle.train
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:images]
    if bundle.in_memory:
        data = data.subset(pick)
    else:  # a TransformSubset of the training files, with the evaluation transform that _loader sets
        chosen = pick.tolist() if data.indices is None else [data.indices[i] for i in pick.tolist()]
        data = TransformSubset(data.folder, chosen, None)
    return [x.float().contiguous() for x, _ in _loader(ckpt, data, bundle.in_memory, torch.device("cpu"), batch_size)]


def inference_model(
    ckpt: dict[str, Any],
    device: torch.device,
    *,
    precision: str | None = None,
    backend: str = "auto",
    compile: bool = False,
    data_dir: str | None = None,
) -> tuple[torch.nn.Module, torch.dtype | None]:
    """(model, autocast dtype): the checkpoint's model as trained (eager, its own autocast), or with
    ``precision`` the ``reslab.deploy.optimize`` copy (folded, cast, optionally compiled; int8 calibrated on
    the training images)."""
    from reslab.deploy import optimize

    if precision == "int8" and device.type != "cpu":  # before the calibration images are loaded
        raise ReslabError("int8 runs on the CPU (ONNX Runtime): add --device cpu, or use bf16 on a GPU")
    model = model_from_checkpoint(ckpt).to(device)
    if precision is None:
        return model.to(memory_format=torch.channels_last), pick_amp(ckpt["config"].get("amp", "auto"), device)
    info = DatasetInfo.from_dict(ckpt["dataset"])
    calibration = calibration_batches(ckpt, data_dir=data_dir) if precision == "int8" else None
    shape = (info.channels, *info.image_size)
    fast = optimize(model, precision, backend=backend, compile=compile, calibration=calibration, input_shape=shape)
    return fast, None


def evaluate_checkpoint(
    path: str | Path,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 1000,
    precision: str | None = None,
    backend: str = "auto",
    compile: bool = False,
) -> tuple[EvalResult, dict[str, Any]]:
    """Accuracy, per-class accuracy and confusion matrix of a checkpoint on ``split`` ("test" or "val").

    ``precision`` (fp32, bf16, int8) evaluates ``reslab.deploy.optimize``'s inference copy instead of the
    model as trained. Writes ``eval_<split>.json`` and ``confusion_<split>.png`` to ``out_dir`` (default: the
    checkpoint's folder).
    """
    if split not in ("test", "val"):
        raise ReslabError(f"--split must be test or val, not {split!r}")
    ckpt = load_checkpoint(path)
    cfg, info = ckpt["config"], DatasetInfo.from_dict(ckpt["dataset"])
    name = dataset or cfg["dataset"]
    data, in_memory = _split(ckpt, name, data_dir, split)
    dev = pick_device(device)
    # int8 calibrates on the training split: in data_dir only when that holds the dataset trained on.
    same_data = name == cfg["dataset"] and name != "imagefolder"
    calibration_dir = data_dir if same_data else None
    model, amp = inference_model(
        ckpt, dev, precision=precision, backend=backend, compile=compile, data_dir=calibration_dir
    )
    # Normalize with the statistics the model was trained with, not the reloaded split's.
    loader = _loader(ckpt, data, in_memory, dev, batch_size)
    result = evaluate(
        model,
        loader,
        num_classes=info.num_classes,
        device=dev,
        amp_dtype=amp,
        tta_flip=cfg.get("tta_flip", False),
        tta_translate=cfg.get("tta_translate", 0),
    )
    out = Path(out_dir) if out_dir else Path(path).parent
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(path),
        "dataset": name,
        "split": split,
        "precision": precision or "as trained",
        "backend": getattr(model, "backend", "torch eager"),
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


def compare_precisions(
    path: str | Path,
    precisions: tuple[str, ...] = ("fp32", "bf16", "int8"),
    *,
    split: str = "test",
    data_dir: str | None = None,
    backend: str = "auto",
    compile: bool = False,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """Accuracy on ``split`` of the eager fp32 model and of each deployment ``precision``, with each one's
    top-1 agreement with the eager fp32 model, its accuracy drop and the seconds its pass took (with
    ``compile``, the compilation included). No autocast, no test-time flip: each image is scored once."""
    ckpt = load_checkpoint(path)
    dev = pick_device(device)
    loader = checkpoint_batches(ckpt, split=split, data_dir=data_dir, device=dev)

    def predict(model: torch.nn.Module) -> tuple[Tensor, Tensor, float]:
        start, predictions, labels = time.perf_counter(), [], []
        with torch.no_grad():
            for x, y in loader:
                predictions.append(model(x).argmax(1))
                labels.append(y)
        return torch.cat(predictions), torch.cat(labels), time.perf_counter() - start

    reference, labels, seconds = predict(model_from_checkpoint(ckpt).to(dev))
    base = (reference == labels).float().mean().item()
    rows = {"eager fp32": {"accuracy": base, "agreement": 1.0, "accuracy_drop": 0.0, "seconds": seconds}}
    for precision in precisions:
        model, _ = inference_model(ckpt, dev, precision=precision, backend=backend, compile=compile, data_dir=data_dir)
        predicted, _, seconds = predict(model)
        accuracy = (predicted == labels).float().mean().item()
        agreement = (predicted == reference).float().mean().item()
        rows[precision] = {
            "backend": model.backend,
            "accuracy": accuracy,
            "agreement": agreement,
            "accuracy_drop": base - accuracy,
            "seconds": seconds,
        }
    return rows


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def predict_images(
    path: str | Path,
    images: list[str | Path],
    *,
    topk: int = 3,
    device: str = "auto",
    precision: str | None = None,
    backend: str = "auto",
    compile: bool = False,
    data_dir: str | None = None,
) -> list[Prediction]:
    """Top-k classes of image files. Any size and mode (L, RGB, RGBA, P, ...) becomes what the model expects.

    ``precision`` runs ``reslab.deploy.optimize``'s copy (int8 calibrates on the training images, found in
    ``data_dir`` or where training found them).
    """
    ckpt = load_checkpoint(path)
    info = DatasetInfo.from_dict(ckpt["dataset"])
    dev = pick_device(device)
    to_input = info_transform(info)
    if info.image_size[0] != info.image_size[1]:
        raise ReslabError("predict supports models trained on square images")
    # read_image: training's checks (empty, truncated, not an image, above --max-image-pixels), one line each
    max_pixels = _max_pixels(ckpt["config"])
    batch = []
    for image_path in images:
        with read_image(str(image_path), max_pixels=max_pixels) as im:
            batch.append(to_input(im))
    model, amp = inference_model(ckpt, dev, precision=precision, backend=backend, compile=compile, data_dir=data_dir)
    k = max(1, min(topk, info.num_classes))
    with torch.no_grad(), autocast(dev, amp):
        probs = model(torch.stack(batch).to(dev)).float().softmax(dim=1)
    values, indices = probs.topk(k, dim=1)
    return [
        Prediction(str(p), [(info.classes[i], v) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)])
        for p, vals, idx in zip(images, values, indices, strict=True)
    ]
