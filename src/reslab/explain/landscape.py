"""The training loss around the trained weights (Li et al. 2018, "Visualizing the Loss Landscape of Neural
Nets"), along filter-normalized random directions.

A random direction d in weight space means little by itself: a ReLU net with BN is invariant to the scale
of each filter, so a step of the same size changes a small filter a lot and a large one hardly at all. Li
et al. (Sec. 4) therefore rescale each filter of d to the norm of the same filter of the weights,
``d_i <- d_i / ||d_i|| * ||theta_i||``, and leave BN parameters and biases alone (direction zero). Plotted
along such directions, ``L(theta + a d1 + b d2)`` of nets of different widths and depths compare, and Li
et al. see the loss of deep plain nets turn chaotic and sharp where their ResNet twins stay smooth and
convex-looking (their Fig. 5).

Here: BN in eval mode (its running statistics), cross-entropy on a fixed, seeded subset of real training
images, the same seeded directions for every net whose parameter shapes match (resnet56 and plain56 do:
option-A shortcuts have no parameters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import DEFAULT_RUNS_DIR, Subject, load_subjects, real_images

Directions = dict[str, Tensor]  # parameter name -> a direction of its shape


def _filter_normalized(direction: Tensor, weight: Tensor) -> Tensor:
    """``direction`` (out, ...) with each filter (output slice) rescaled to the norm of ``weight``'s same
    filter (Li et al. 2018, Sec. 4, eq. 1). A linear layer's rows are its filters."""
    d = direction.flatten(1)
    w = weight.detach().flatten(1)
    scale = w.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + 1e-10)
    return (d * scale).view_as(direction)


def _directions(model: nn.Module, seed: int) -> tuple[Directions, Directions]:
    """Two filter-normalized Gaussian directions over every parameter of ``model``.

    Weights of convolutions and linear layers (every parameter with more than one dimension) get a random
    direction, drawn in ``named_parameters`` order from one generator seeded by ``seed``, so two nets with
    the same parameter shapes get the same directions. BN parameters and biases get zero: Li et al. find
    that moving them changes little, and a BN scale of zero would kill its channel.
    """
    generator = torch.Generator().manual_seed(seed)
    params = list(model.named_parameters())
    pair = []
    for _ in range(2):
        direction = {}
        for name, p in params:
            if p.dim() > 1:
                drawn = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                direction[name] = _filter_normalized(drawn.to(p.device), p)
            else:
                direction[name] = torch.zeros_like(p, requires_grad=False)
        pair.append(direction)
    return pair[0], pair[1]


@torch.inference_mode()
def _loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on all of x (N, C, H, W), y (N,) in one forward."""
    logits = model(x)
    return F.cross_entropy(logits, y).item(), int((logits.argmax(1) == y).sum()) / len(y)


@contextmanager
def _displaced(model: nn.Module, d1: Directions, d2: Directions) -> Iterator[Callable[[float, float], None]]:
    """Yields ``move(a, b)``, which sets the weights to ``theta + a * d1 + b * d2`` in place (theta: the weights
    on entry). On exit every weight is ``theta`` again, bit for bit, even on an error."""
    moving = {name: p for name, p in model.named_parameters() if d1[name].any() or d2[name].any()}
    with torch.no_grad():
        theta = {name: p.detach().clone() for name, p in moving.items()}

    def move(a: float, b: float) -> None:
        with torch.no_grad():
            for name, p in moving.items():
                # From theta every time, never by increments, so no rounding piles up across the grid.
                p.copy_(theta[name] + a * d1[name] + b * d2[name])

    try:
        yield move
    finally:
        with torch.no_grad():
            for name, p in moving.items():
                p.copy_(theta[name])


def _coordinates(count: int, span: float) -> list[float]:
    """``count`` evenly spaced points in [-span, span]; the middle one is exactly 0 when ``count`` is odd."""
    if count == 1:
        return [0.0]
    half = (count - 1) / 2
    return [span * (i - half) / half for i in range(count)]


def _measure_subject(
    subject: Subject, d1: Directions, d2: Directions, *, x: Tensor, y: Tensor, points: int, grid: int, span: float
) -> dict:
    """The loss of one net at its weights, along d1 (1-D) and over the (d1, d2) plane (2-D)."""
    start = time.perf_counter()
    model = subject.model.eval()  # BN with running statistics: the loss is a function of the weights only
    line = _coordinates(points, span)
    axis = _coordinates(grid, span)
    origin_loss, origin_acc = _loss(model, x, y)
    with _displaced(model, d1, d2) as move:
        line_loss, line_acc = [], []
        for a in line:
            move(a, 0.0)
            loss, acc = _loss(model, x, y)
            line_loss.append(loss)
            line_acc.append(acc)
        surface = []
        for b in axis:
            row = []
            for a in axis:
                move(a, b)
                row.append(_loss(model, x, y)[0])
            surface.append(row)
    return {
        "label": subject.label,
        "source": subject.source,
        "trained": subject.trained,
        "origin": {"loss": origin_loss, "accuracy": origin_acc},
        "line": {"alpha": line, "loss": line_loss, "accuracy": line_acc},
        "surface": {"alpha": axis, "beta": axis, "loss": surface},  # loss[j][i] at (alpha[i], beta[j])
        "seconds": time.perf_counter() - start,
    }


def _check(images: int, points: int, grid: int, span: float) -> None:
    if images < 1:
        raise ReslabError(f"--images must be at least 1, not {images}")
    if points < 3 or grid < 3:
        raise ReslabError(f"--points ({points}) and --grid ({grid}) must be at least 3")
    if not span > 0:
        raise ReslabError(f"--span must be positive, not {span}")


def measure(
    *,
    models: Sequence[str] = ("resnet56", "plain56"),
    checkpoints: list[str] | None = None,
    runs_dir: str | None = DEFAULT_RUNS_DIR,
    images: int = 32,
    points: int = 41,
    grid: int = 21,
    span: float = 1.0,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Training loss of each net at ``theta + a d1 + b d2`` for a, b in [-span, span] (Li et al. 2018).

    Args:
        models: registry names; each is ``<runs_dir>/<name>/best.pt`` where that exists, else a fresh model.
        checkpoints: trained checkpoints to use instead of ``models``.
        images: training images the loss is averaged over (a fixed subset chosen by ``seed``). Each point
            is one forward pass over all of them, and there are ``points + grid**2`` points per net.
        points: points of the 1-D curve along d1; grid: points per side of the 2-D grid over (d1, d2).
        span: the largest step, in units of the directions (1 = each filter moved by its own norm).
        seed: chooses the images and the directions (the same directions for nets of the same shapes).

    Returns ``{"models": [...]}``, per net: ``origin`` (loss, accuracy), ``line`` (alpha, loss, accuracy)
    and ``surface`` (alpha, beta, loss[j][i] at alpha[i], beta[j]).
    """
    _check(images, points, grid, span)
    subjects = load_subjects(
        list(models),
        checkpoints=checkpoints,
        runs_dir=runs_dir,
        dataset=dataset,
        data_dir=data_dir,
        seed=seed,
        device=device,
    )
    nets = []
    for subject in subjects:
        dev = next(subject.model.parameters()).device
        x, y = real_images(
            subject.info,
            split="train",
            count=images,
            seed=seed,
            data_dir=data_dir,
            device=dev,
            val_ratio=subject.val_ratio,
            split_seed=subject.split_seed,
        )
        d1, d2 = _directions(subject.model, seed)
        nets.append(_measure_subject(subject, d1, d2, x=x, y=y, points=points, grid=grid, span=span))
        nets[-1]["images"] = len(y)
    return {
        "paper": "Li et al. 2018, Visualizing the Loss Landscape of Neural Nets",
        "split": "train",
        "images": nets[0]["images"],
        "points": points,
        "grid": grid,
        "span": span,
        "seed": seed,
        "directions": "Gaussian, filter-normalized (each filter scaled to its weight's filter norm); "
        "BN parameters and biases zero; BN in eval mode",
        "models": nets,
    }


# --- figure and text --------------------------------------------------------------------------------------------


def _at(net: dict, alpha: float) -> float:
    """The 1-D loss at the sampled point nearest to ``alpha``."""
    line = net["line"]
    i = min(range(len(line["alpha"])), key=lambda k: abs(line["alpha"][k] - alpha))
    return line["loss"][i]


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Two PNGs: the 1-D curves of all nets in one panel (log loss), and their 2-D contours side by side
    with the same (log-spaced) levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nets = result["models"]
    names = [f"{n['label']}{'' if n['trained'] else ' (fresh)'}" for n in nets]
    fig, ax = plt.subplots(figsize=(6, 4))
    for net, name in zip(nets, names, strict=True):
        ax.plot(net["line"]["alpha"], net["line"]["loss"], label=name)
    ax.set(yscale="log", xlabel="step along d1 (filter-normalized)", ylabel="training loss (cross-entropy)")
    ax.set_title(f"1-D loss, {result['images']} training images (Li et al. 2018)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    line_path = Path(out_dir) / "landscape_1d.png"
    fig.savefig(line_path, dpi=100)
    plt.close(fig)

    surfaces = [np.asarray(n["surface"]["loss"], dtype=float) for n in nets]
    finite = np.concatenate([s[np.isfinite(s)] for s in surfaces])
    levels = np.geomspace(max(finite.min(), 1e-3), max(finite.max(), 2 * finite.min(), 1e-2), 16)
    fig, axes = plt.subplots(1, len(nets), figsize=(4.6 * len(nets), 4.2), squeeze=False)
    for ax, net, name, surface in zip(axes[0], nets, names, surfaces, strict=True):
        a, b = net["surface"]["alpha"], net["surface"]["beta"]
        contour = ax.contour(
            a,
            b,
            np.clip(surface, levels[0], levels[-1]),
            levels=levels,
            cmap="viridis",
            norm=matplotlib.colors.LogNorm(levels[0], levels[-1]),
            linewidths=0.8,
        )
        ax.clabel(contour, levels[::3], fontsize=6, fmt="%.2g")
        ax.plot(0, 0, "r*", ms=8)
        ax.set(xlabel="d1", ylabel="d2", title=name, aspect="equal")
    fig.suptitle("2-D training loss over filter-normalized directions (same levels)", fontsize=10)
    fig.tight_layout()
    surface_path = Path(out_dir) / "landscape_2d.png"
    fig.savefig(surface_path, dpi=100)
    plt.close(fig)
    return [line_path, surface_path]


def summarize(result: dict) -> list[str]:
    """Per net: loss at the weights, how fast it rises along d1 (at +-span/2 and +-span), and the 2-D range."""
    nets = result["models"]
    fresh = [n["label"] for n in nets if not n["trained"]]
    span = result["span"]
    lines = [
        f"Loss landscape (Li et al. 2018): cross-entropy on {result['images']} training images, "
        f"{result['points']} points along d1 and a {result['grid']}x{result['grid']} grid over d1, d2 in "
        f"[-{span:g}, {span:g}]; {result['directions']}"
        + (f". FRESH, untrained: {', '.join(fresh)} (train them with `reslab explain degradation`)" if fresh else "")
    ]
    for net in nets:
        origin = net["origin"]["loss"]
        half = (_at(net, -span / 2), _at(net, span / 2))
        full = (_at(net, -span), _at(net, span))
        surface = [v for row in net["surface"]["loss"] for v in row]
        lines.append(
            f"{net['label']} ({net['source']}): loss {origin:.4g} (accuracy {net['origin']['accuracy']:.1%}) at the "
            f"weights; along d1 {half[0]:.4g} / {half[1]:.4g} at -/+{span / 2:g}, {full[0]:.4g} / {full[1]:.4g} "
            f"at -/+{span:g}; over the grid {min(surface):.4g} .. {max(surface):.4g} ({net['seconds']:.0f} s)"
        )
    return lines
