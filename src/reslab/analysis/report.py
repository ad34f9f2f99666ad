"""The run report: ``report.html``, one self-contained page of what a training run left in its folder (issue 6).

It is built from the run folder's files alone (``best.pt``, ``last.pt``, ``results.json``) and the test split
of the dataset the checkpoint names, so the end of ``reslab train`` and ``reslab report RUN_DIR`` write the
same page. The figures are embedded in the page and also saved next to it:

- ``curves.png`` (loss and accuracy per epoch) and ``lr.png`` (the learning rate);
- ``eval_test.json`` and ``confusion_test.png``: exactly what ``reslab eval`` writes for the test split;
- ``test_predictions.png`` and ``test_misclassified.png``: test images with their predicted classes;
- ``grad_norms.png``: the gradient norm of every layer over training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from reslab.analysis.html import Page
from reslab.analysis.plots import plot_history
from reslab.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.data import DatasetInfo, TensorBatchLoader, TensorSplit, load_dataset
from reslab.data.datasets import recorded_data_dir
from reslab.device import pick_amp, pick_device
from reslab.errors import ReslabError
from reslab.inference import evaluate_checkpoint
from reslab.train.engine import autocast, predict_logits

GRID_IMAGES = 32  # 4 rows of 8: enough to see what the model gets right and wrong, few enough to read
SAMPLE_IMAGES = 1000  # test images predicted for the grids; the whole test set is scored by evaluate_checkpoint
SAMPLE_SEED = 0  # the same images in every report of every run, so two runs' pages compare image by image
RIGHT, WRONG = "#1a7f37", "#c62828"  # title colors of correct and wrong predictions


def write_report(run_dir: str | Path, *, device: str = "auto", data_dir: str | None = None) -> Path:
    """Write ``<run_dir>/report.html`` and its PNG files from the run's files; returns the page's path.

    Args:
        run_dir: a folder written by ``reslab train`` (it must hold ``best.pt``).
        device: where the test images are scored (``auto``, ``cpu``, ``cuda``, ...).
        data_dir: where the dataset's files are, when not where the run found them.
    """
    run = Path(run_dir)
    if not (run / "best.pt").is_file():
        raise ReslabError(f"{run} holds no training run (no best.pt); `reslab train --out-dir {run}` makes one")
    best = load_checkpoint(run / "best.pt")
    # last.pt holds every epoch, also when the best model is an earlier one or the run was interrupted.
    log = load_checkpoint(run / "last.pt") if (run / "last.pt").is_file() else best
    results = _read_results(run)
    title = f"{best['model_name']} on {best['dataset']['name']}"
    page = Page(f"Run report: {title}")
    _summary(page, run, best, results)
    _curves(page, run, log["history"], title)
    if results is not None and results["test_acc"] is None:
        page.heading("Test set").text("This run had no test split: no per-class accuracy and no test images.")
    else:
        _test_accuracy(page, run, device, data_dir)
        _test_images(page, run, best, device, data_dir)
    _gradient_norms(page, run, log.get("grad_norms", []), best["model"])
    _config(page, best["config"])
    return page.write(run / "report.html")


def _read_results(run: Path) -> dict[str, Any] | None:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _summary(page: Page, run: Path, best: dict, results: dict | None) -> None:
    page.text(f"Run folder {run.resolve()}; the model is best.pt (epoch {best['epoch'] + 1}).")
    if results is None:
        page.text("The run has not finished (no results.json yet): the page shows the epochs completed so far.")
        return
    stopped = " (stopped early)" if results["stopped_early"] else ""
    rows = [
        ("test accuracy", _percent(results["test_acc"])),
        ("best validation accuracy", _percent(results["best_val_acc"])),
        ("best epoch", f"{results['best_epoch']} of {results['epochs_run']}{stopped}"),
        ("training time", f"{results['train_seconds']:.1f} s ({results['wall_seconds']:.1f} s wall clock)"),
        ("device", f"{results['device']}, {results['amp']}"),
    ]
    page.heading("Summary").table(["", ""], rows)


def _curves(page: Page, run: Path, history: list[dict], title: str) -> None:
    page.heading("Training curves")
    if not history:
        page.text("No epoch has been completed.")
        return
    page.image(
        plot_history(history, run / "curves.png", title=title),
        caption="Loss and accuracy per epoch. Training numbers are measured on augmented images while the "
        "model trains (BatchNorm in training mode); validation numbers in evaluation mode.",
    )
    page.image(plot_learning_rate(history, run / "lr.png"), caption="The learning rate at the end of each epoch.")


def plot_learning_rate(history: list[dict], path: Path) -> Path:
    """Save the learning rate of each epoch's records (``epoch``, ``lr``) as a small line plot."""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot([r["epoch"] + 1 for r in history], [r["lr"] for r in history], marker="o")
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _test_accuracy(page: Page, run: Path, device: str, data_dir: str | None) -> None:
    result, report = evaluate_checkpoint(run / "best.pt", data_dir=data_dir, split="test", out_dir=run, device=device)
    page.heading(f"Test set: {result.accuracy:.2%} of {report['images']} images")
    accuracy, images = report["per_class_accuracy"], result.confusion.sum(dim=1).tolist()
    rows = [(name, f"{acc:.2%}", n) for (name, acc), n in zip(accuracy.items(), images, strict=True)]
    page.table(["class", "accuracy", "images"], rows)
    page.text(most_confused(result.confusion, report["classes"]))
    page.image(
        report["files"]["png"],
        caption="Confusion matrix of the test set: rows are true classes, columns predictions; the color is "
        "the fraction of the row, the numbers are image counts.",
    )


def most_confused(confusion: Tensor, classes: list[str], top: int = 3) -> list[str]:
    """Sentences naming the ``top`` largest off-diagonal cells of a (C, C) confusion matrix (rows: true)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, cells = off.flatten().topk(min(top, off.numel()))
    lines = []
    for count, cell in zip(counts.tolist(), cells.tolist(), strict=True):
        if count > 0:
            true, pred = divmod(cell, len(classes))
            lines.append(f"{classes[true]} taken for {classes[pred]}: {count} images.")
    return lines or ["No test image is misclassified."]


def _test_images(page: Page, run: Path, best: dict, device: str, data_dir: str | None) -> None:
    page.heading("Test images and their predictions")
    if best["config"]["dataset"] == "imagefolder":
        page.text("Image grids are drawn for in-memory datasets (MNIST, Fashion-MNIST, CIFAR), not image folders.")
        return
    sample = _test_sample(best, data_dir)
    predicted = predict(best, sample, device)
    classes = best["dataset"]["classes"]
    shown = torch.arange(min(GRID_IMAGES, len(sample)))
    titles, colors = _titles(classes, sample.labels[shown], predicted[shown])
    grid = plot_image_grid(sample.images[shown], titles, colors, run / "test_predictions.png")
    page.image(
        grid,
        caption="Test images drawn at random, each titled with its predicted class: green when "
        "right; red, with the true class below, when wrong.",
    )
    wrong = (predicted != sample.labels).nonzero().flatten()
    page.text(
        f"{len(wrong)} of these {len(sample)} randomly drawn test images are misclassified"
        + (f"; the first {min(len(wrong), GRID_IMAGES)} are below." if len(wrong) else ".")
    )
    if len(wrong):
        wrong = wrong[:GRID_IMAGES]
        titles, colors = _titles(classes, sample.labels[wrong], predicted[wrong])
        grid = plot_image_grid(sample.images[wrong], titles, colors, run / "test_misclassified.png")
        page.image(grid, caption="Misclassified test images: the prediction, and the true class below it.")


def _test_sample(best: dict, data_dir: str | None) -> TensorSplit:
    """Up to SAMPLE_IMAGES test images of the run's dataset, drawn with a fixed seed (uint8, as stored)."""
    cfg = best["config"]
    folder = data_dir or recorded_data_dir(cfg["data_dir"])
    bundle = load_dataset(cfg["dataset"], data_dir=folder, val_ratio=0.0, download=cfg["download"])
    index = torch.randperm(len(bundle.test), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    return bundle.test.subset(index[:SAMPLE_IMAGES])


@torch.no_grad()
def predict(best: dict, split: TensorSplit, device: str) -> Tensor:
    """The predicted class (N,) of each uint8 image of ``split``, scored as ``evaluate_checkpoint`` scores them:
    the checkpoint's normalization, mixed precision and test-time augmentation."""
    dev = pick_device(device)
    info = DatasetInfo.from_dict(best["dataset"])
    model = model_from_checkpoint(best).to(dev)
    cfg = best["config"]
    amp = pick_amp(cfg.get("amp", "auto"), dev)
    predicted = []
    for x, _ in TensorBatchLoader(split, info, batch_size=500, train=False, device=dev):
        with autocast(dev, amp):
            logits = predict_logits(model, x, flip=cfg.get("tta_flip", False), translate=cfg.get("tta_translate", 0))
        predicted.append(logits.argmax(dim=1).cpu())
    return torch.cat(predicted)


def _titles(classes: list[str], labels: Tensor, predicted: Tensor) -> tuple[list[str], list[str]]:
    titles, colors = [], []
    for true, pred in zip(labels.tolist(), predicted.tolist(), strict=True):
        titles.append(classes[pred] if pred == true else f"{classes[pred]}\n(true: {classes[true]})")
        colors.append(RIGHT if pred == true else WRONG)
    return titles, colors


def plot_image_grid(images: Tensor, titles: list[str], colors: list[str], path: Path, cols: int = 8) -> Path:
    """Save uint8 images (N, C, H, W), C = 1 or 3, in a grid of ``cols`` columns, each with a colored title.

    The images are pasted into one picture drawn by one axes: 32 axes take seconds to lay out on a small CPU.
    """
    n, c, h, w = images.shape
    rows = -(-n // cols)
    title_h, gap = int(h * 0.45), max(1, w // 6)  # room above each image for two lines of title
    cell_h, cell_w = h + title_h, w + gap
    canvas = np.full((rows * cell_h, cols * cell_w - gap, c), 255, dtype=np.uint8)  # (H, W, C), white
    fig = plt.figure(figsize=(cols * 1.35, cols * 1.35 * canvas.shape[0] / canvas.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    for i, (image, title, color) in enumerate(zip(images, titles, colors, strict=True)):
        y, x = (i // cols) * cell_h + title_h, (i % cols) * cell_w
        canvas[y : y + h, x : x + w] = image.permute(1, 2, 0).numpy()
        ax.text(x + w / 2, y - 0.5, title, ha="center", va="bottom", fontsize=7, color=color)
    ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def layer_gradient_norms(grad_norms: list[dict], weights: dict[str, Tensor]) -> tuple[list[str], np.ndarray]:
    """The layers (conv and linear weights: the parameters of more than one dimension, in forward order) and
    their mean gradient norms, (layers, epochs), from a run's per-epoch ``{"epoch", "norms"}`` records."""
    layers = [name for name in grad_norms[0]["norms"] if weights[name].ndim > 1]
    return layers, np.array([[record["norms"][name] for record in grad_norms] for name in layers])


def _gradient_norms(page: Page, run: Path, grad_norms: list[dict], weights: dict[str, Tensor]) -> None:
    page.heading("Gradient norms per layer")
    if not grad_norms:
        page.text("This run's checkpoints hold no gradient norms (it was trained before reslab kept them).")
        return
    layers, norms = layer_gradient_norms(grad_norms, weights)
    epochs = [record["epoch"] + 1 for record in grad_norms]
    page.image(
        plot_gradient_norms(layers, norms, epochs, run / "grad_norms.png"),
        caption="The L2 norm of each layer's weight gradient, averaged over the steps of an epoch (log scale), "
        "from the stem (left) to the classifier (right). Also in grad_norms.jsonl, for every parameter.",
    )
    for column in sorted({0, len(epochs) - 1}):
        low, high = norms[:, column].argmin(), norms[:, column].argmax()
        page.text(
            f"Epoch {epochs[column]}: from {norms[low, column]:.3g} ({layers[low]}) "
            f"to {norms[high, column]:.3g} ({layers[high]})."
        )


def plot_gradient_norms(layers: list[str], norms: np.ndarray, epochs: list[int], path: Path) -> Path:
    """Save (layers, epochs) gradient norms as lines over depth for a few epochs and a layers x epochs heatmap."""
    # Constrained layout keeps the two panels' layer axes aligned although only the heatmap has a colorbar.
    fig, (ax_lines, ax_map) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, layout="constrained")
    positive = np.ma.masked_less_equal(norms, 0)  # a layer that got no gradient has no place on a log scale
    picked = sorted({round(i) for i in np.linspace(0, len(epochs) - 1, min(len(epochs), 6))})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(picked)))
    for column, color in zip(picked, colors, strict=True):
        ax_lines.plot(positive[:, column], marker=".", color=color, label=f"epoch {epochs[column]}")
    ax_lines.set(yscale="log", ylabel="gradient norm", title="gradient norm by layer")
    ax_lines.grid(alpha=0.3, which="both")
    ax_lines.legend(fontsize=8)
    image = ax_map.imshow(
        positive.T,
        aspect="auto",
        cmap="magma",
        norm=LogNorm(),
        interpolation="nearest",
        extent=(-0.5, len(layers) - 0.5, epochs[-1] + 0.5, epochs[0] - 0.5),
    )
    ax_map.set(ylabel="epoch", title="gradient norm by layer and epoch")
    ax_map.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    fig.colorbar(image, ax=ax_map, fraction=0.03, pad=0.01, label="gradient norm")
    step = max(1, -(-len(layers) // 60))  # at most about 60 names fit under the plot
    ax_map.set_xticks(
        range(0, len(layers), step), [n.removesuffix(".weight") for n in layers[::step]], rotation=90, fontsize=7
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _config(page: Page, config: dict[str, Any]) -> None:
    rows = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value) for key, value in config.items()]
    page.heading("Configuration").text('The resolved training configuration (what ran, "auto" replaced).')
    page.table(["option", "value"], rows)
