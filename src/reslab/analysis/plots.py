"""Plots saved as PNG with matplotlib's non-interactive backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from torch import Tensor


def plot_confusion_matrix(confusion: Tensor, classes: list[str], path: Path, title: str = "") -> Path:
    """Save a (C, C) confusion matrix (rows: true class, columns: prediction), normalized per row."""
    counts = confusion.float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = max(6.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    f"{int(counts[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path, title: str = "") -> Path:
    """Save loss and accuracy curves (train and validation) from a run's per-epoch records."""
    epochs = [r["epoch"] + 1 for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if any(r.get(key) is not None for r in history):
            ax_loss.plot(epochs, [r.get(key) for r in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        if any(r.get(key) is not None for r in history):
            ax_acc.plot(epochs, [r.get(key) for r in history], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
