"""The training loss around the trained weights (Li et al. 2018, "Visualizing the Loss Landscape of Neural
Nets"), along filter-normalized random directions.

A random direction d in weight space means little by itself: a ReLU net with BN is invariant to the scale
of each filter, so a step of the same size changes a small filter a lot and a large one hardly at all. Li
et al. (Sec. 4) therefore rescale each filter of d to the norm of the same filter of the weights,
``d_i <- d_i / ||d_i|| * ||theta_i||``, and leave BN parameters and biases alone (direction zero). Plotted
along such directions, ``L(theta + a d1 + b d2)`` of nets of different widths and depths compare, and Li
et al. see the loss of deep plain nets turn chaotic and sharp where their ResNet twins stay smooth and
convex-looking (their Fig. 5).

Here: BN in eval mode (its running statistics), cross-entropy on a fixed, seeded subset of the real training
images the nets trained on, the same seeded directions for every net whose parameter shapes match (resnet56 and
plain56 do: option-A shortcuts have no parameters). Each point of the 1-D curve is a mean over its images with
a standard error; the 2-D surface, 17x17 forward passes, uses the first few of those images (a picture).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import Subject, channels_last, load_subjects, mean_se, nets_studied, real_images
from reslab.explain.options import NETS_AND_IMAGES, declare

# `reslab explain landscape`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "the loss around the trained weights on filter-normalized directions (Li et al. 2018)"
OPTIONS = declare(
    *NETS_AND_IMAGES,
    grid_images=dict(type=int, default=None, help="of those images, how many each 2-D grid point uses"),
    points=dict(type=int, default=None, help="points along the 1-D line (default 41)"),
    grid=dict(type=int, default=None, help="points per side of the 2-D grid (default 21)"),
    span=dict(type=float, default=None, help="the plot covers -span..span times the direction"),
)

Directions = dict[str, Tensor]  # parameter name -> a direction of its shape
# Defaults, for both nets within 2 minutes on a 2-core CPU: 21 x 256 + 17 x 17 x 32 image passes per net (69 s
# for the two on a busy 2-core CPU, one thread).
DEFAULT_IMAGES = 256  # the 1-D curve's: the shipped nets' loss at the weights to about +-0.04 (standard error)
DEFAULT_GRID_IMAGES = 32  # the 2-D surface's (a picture; the first of the curve's images)
DEFAULT_POINTS = 21  # along d1: steps of 0.1 of the span's 1, so -1, -0.5, 0, 0.5, 1 are sampled
DEFAULT_GRID = 17  # per side of the 2-D grid: steps of 0.125
COMPARED_AT = (-1.0, -0.5, 0.0, 0.5, 1.0)  # in units of the span: where the summary compares the nets


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
def _losses(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """Each image's cross-entropy (N,) float64 on the CPU, and the accuracy, of ``model`` on all of x
    (N, C, H, W), y (N,) in one forward."""
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    return losses.double().cpu(), int((logits.argmax(1) == y).sum()) / len(y)


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
    subject: Subject,
    d1: Directions,
    d2: Directions,
    *,
    x: Tensor,
    y: Tensor,
    points: int,
    grid: int,
    span: float,
    grid_images: int,
) -> tuple[dict, dict[float, Tensor]]:
    """The loss of one net at its weights, along d1 (1-D, mean and standard error over the images) and over the
    (d1, d2) plane (2-D, on the first ``grid_images``). Also returns each image's loss at ``COMPARED_AT``."""
    start = time.perf_counter()
    model = subject.model.eval()  # BN with running statistics: the loss is a function of the weights only
    line = _coordinates(points, span)
    axis = _coordinates(grid, span)
    origin_losses, origin_accuracy = _losses(model, x, y)
    kept = {0.0: origin_losses}
    line_loss, line_se, line_acc = [], [], []
    with _displaced(model, d1, d2) as move:
        for a in line:
            move(a, 0.0)
            losses, acc = (origin_losses, origin_accuracy) if a == 0.0 else _losses(model, x, y)
            mean, se = mean_se(losses)
            line_loss.append(mean)
            line_se.append(se)
            line_acc.append(acc)
            if a != 0.0 and any(abs(a - c * span) < 1e-9 for c in COMPARED_AT):
                kept[a / span] = losses
        surface = []
        for b in axis:
            row = []
            for a in axis:
                move(a, b)
                row.append(_losses(model, x[:grid_images], y[:grid_images])[0].mean().item())
            surface.append(row)
    origin_loss, origin_se = mean_se(origin_losses)
    return {
        **subject.describe(),
        "residual": bool(model.config["residual"]),
        "images": len(y),
        "origin": {"loss": origin_loss, "loss_se": origin_se, "accuracy": origin_accuracy},
        "line": {"alpha": line, "loss": line_loss, "loss_se": line_se, "accuracy": line_acc},
        # loss[j][i] at (alpha[i], beta[j]), on the first grid_images images
        "surface": {"alpha": axis, "beta": axis, "loss": surface, "images": min(grid_images, len(y))},
        "seconds": time.perf_counter() - start,
    }, kept


def _comparisons(nets: list[dict], kept: list[dict[float, Tensor]], same_images: bool) -> list[dict]:
    """Plain minus residual loss at each of ``COMPARED_AT`` (Li et al.: the residual net's minimum is wider, so
    the plain net's loss rises faster), with the standard error of the per-image differences when both nets saw
    the same images (paired), else the two standard errors combined."""
    residual = next((i for i, n in enumerate(nets) if n["residual"]), None)
    plain = next((i for i, n in enumerate(nets) if not n["residual"]), None)
    if residual is None or plain is None:
        return []
    out = []
    for at in sorted(set(kept[residual]) & set(kept[plain])):
        r, p = kept[residual][at], kept[plain][at]
        if same_images:
            difference, se = mean_se(p - r)
        else:
            (mp, sp), (mr, sr) = mean_se(p), mean_se(r)
            difference, se = mp - mr, math.hypot(sp, sr)
        labels = {"plain": nets[plain]["label"], "residual": nets[residual]["label"]}
        out.append({"at": at, **labels, "difference": difference, "se": se, "paired": same_images})
    return out


def _check(images: int, grid_images: int, points: int, grid: int, span: float) -> None:
    if images < 2:
        raise ReslabError(f"--images must be at least 2 (a standard error needs two), not {images}")
    if grid_images < 1:
        raise ReslabError(f"--grid-images must be at least 1, not {grid_images}")
    if points < 3 or grid < 3:
        raise ReslabError(f"--points ({points}) and --grid ({grid}) must be at least 3")
    if not span > 0:
        raise ReslabError(f"--span must be positive, not {span}")


def measure(
    *,
    models: Sequence[str] = ("resnet56", "plain56"),
    checkpoints: list[str] | None = None,
    runs_dir: str | None = None,
    fresh: bool = False,
    images: int = DEFAULT_IMAGES,
    grid_images: int = DEFAULT_GRID_IMAGES,
    points: int = DEFAULT_POINTS,
    grid: int = DEFAULT_GRID,
    span: float = 1.0,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Training loss of each net at ``theta + a d1 + b d2`` for a, b in [-span, span] (Li et al. 2018).

    Args:
        models: registry names: the shipped trained nets, or ``<runs_dir>/<name>/best.pt``, or (``fresh``)
            fresh seeded models (``common.load_subjects``).
        checkpoints: trained checkpoints to use instead of ``models``.
        images: training images each point of the 1-D curve is averaged over (a fixed subset of the images
            the net trained on, chosen by ``seed``), with its standard error.
        grid_images: the first of those images, for each point of the 2-D grid (``grid**2`` forward passes).
        points: points of the 1-D curve along d1; grid: points per side of the 2-D grid over (d1, d2).
        span: the largest step, in units of the directions (1 = each filter moved by its own norm).
        seed: chooses the images and the directions (the same directions for nets of the same shapes).

    Returns ``{"models": [...], "comparisons": [...]}``, per net: ``origin`` (loss, loss_se, accuracy),
    ``line`` (alpha, loss, loss_se, accuracy) and ``surface`` (alpha, beta, ``loss[j][i]`` at ``(alpha[i], beta[j])``);
    ``comparisons``: plain minus residual loss at ``COMPARED_AT`` times ``span``, with its standard error.
    """
    _check(images, grid_images, points, grid, span)
    subjects = load_subjects(
        list(models),
        checkpoints=checkpoints,
        runs_dir=runs_dir,
        fresh=fresh,
        dataset=dataset,
        data_dir=data_dir,
        seed=seed,
        device=device,
    )
    nets, kept, seen = [], [], []
    for subject in subjects:
        dev = next(subject.model.parameters()).device
        split = dict(split="train", count=images, seed=seed, data_dir=data_dir, device=dev, **subject.training_split)
        x, y = real_images(subject.info, **split)
        d1, d2 = _directions(subject.model, seed)
        _, x = channels_last(subject.model, x)
        net, losses = _measure_subject(
            subject, d1, d2, x=x, y=y, points=points, grid=grid, span=span, grid_images=grid_images
        )
        nets.append(net)
        kept.append(losses)
        seen.append((x, y))
    same_images = all(torch.equal(x, seen[0][0]) and torch.equal(y, seen[0][1]) for x, y in seen)
    return {
        "paper": "Li et al. 2018, Visualizing the Loss Landscape of Neural Nets",
        "split": "train",
        "images": nets[0]["images"],
        "grid_images": nets[0]["surface"]["images"],
        "points": points,
        "grid": grid,
        "span": span,
        "seed": seed,
        "directions": "Gaussian, filter-normalized (each filter scaled to its weight's filter norm); "
        "BN parameters and biases zero; BN in eval mode",
        "uncertainty": "standard error of the mean loss over the images (std / sqrt(n)); a difference between "
        "two nets on the same images: of the per-image differences (paired)",
        "models": nets,
        "comparisons": _comparisons(nets, kept, same_images),
    }


# --- figure and text --------------------------------------------------------------------------------------------


def _at(net: dict, alpha: float) -> tuple[float, float]:
    """The 1-D loss and its standard error at the sampled point nearest to ``alpha``."""
    line = net["line"]
    i = min(range(len(line["alpha"])), key=lambda k: abs(line["alpha"][k] - alpha))
    return line["loss"][i], line["loss_se"][i]


def plot(result: dict, out_dir: Path) -> list[Path]:
    """Two PNGs: the 1-D curves of all nets in one panel (log loss, shaded: +- 2 standard errors), and their
    2-D contours side by side with the same (log-spaced) levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    nets = result["models"]
    names = [f"{n['label']}{'' if n['trained'] else ' (fresh)'}" for n in nets]
    fig, ax = plt.subplots(figsize=(6, 4))
    for net, name in zip(nets, names, strict=True):
        line = net["line"]
        (drawn,) = ax.plot(line["alpha"], line["loss"], label=name)
        low = [max(m - 2 * s, 1e-4) for m, s in zip(line["loss"], line["loss_se"], strict=True)]
        high = [m + 2 * s for m, s in zip(line["loss"], line["loss_se"], strict=True)]
        ax.fill_between(line["alpha"], low, high, color=drawn.get_color(), alpha=0.2, lw=0)
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
    fig.suptitle(
        f"2-D training loss over filter-normalized directions (same levels), {result['grid_images']} images",
        fontsize=10,
    )
    fig.tight_layout()
    surface_path = Path(out_dir) / "landscape_2d.png"
    fig.savefig(surface_path, dpi=100)
    plt.close(fig)
    return [line_path, surface_path]


def _with_se(value: tuple[float, float]) -> str:
    return f"{value[0]:.4g} +- {value[1]:.2g}"


def _verdict(result: dict) -> list[str]:
    """The plain net's loss minus the residual net's at each compared point, and Li et al.'s claim checked at
    the span's two ends."""
    comparisons = result["comparisons"]
    if not comparisons:
        return []
    c0 = comparisons[0]
    span = result["span"]
    shown = ", ".join(f"{c['at'] * span:+g}: {c['difference']:+.4g} +- {c['se']:.2g}" for c in comparisons)
    ends = [c for c in comparisons if abs(c["at"]) == 1.0]
    if all(c["difference"] > 2 * c["se"] for c in ends):
        verdict = "agrees"
    elif any(c["difference"] < -2 * c["se"] for c in ends):
        verdict = "disagrees"
    else:
        verdict = "within the uncertainty"
    paired = "paired over the same images" if c0["paired"] else "the two nets' errors combined"
    return [
        f"{c0['plain']} minus {c0['residual']} loss along d1 at {shown} ({paired}); Li et al.: around trained "
        f"weights the residual net's minimum is wider and flatter, the plain net's loss rises faster: {verdict}"
    ]


def summarize(result: dict) -> list[str]:
    """Per net: loss at the weights, how fast it rises along d1 (at +-span/2 and +-span), and the 2-D range;
    each 1-D value +- one standard error over the images; then plain against residual."""
    nets = result["models"]
    span = result["span"]
    lines = [
        f"Loss landscape (Li et al. 2018): cross-entropy on {result['images']} training images the nets trained "
        f"on (each 1-D point: mean +- one standard error over them), {result['points']} points along d1 and a "
        f"{result['grid']}x{result['grid']} grid over d1, d2 in [-{span:g}, {span:g}] on the first "
        f"{result['grid_images']} of them; {result['directions']}.",
        nets_studied(nets),
    ]
    for net in nets:
        origin = (net["origin"]["loss"], net["origin"]["loss_se"])
        surface = [v for row in net["surface"]["loss"] for v in row]
        lines.append(
            f"{net['label']}: loss {_with_se(origin)} (accuracy {net['origin']['accuracy']:.1%}) at the weights; "
            f"along d1 {_with_se(_at(net, -span / 2))} / {_with_se(_at(net, span / 2))} at -/+{span / 2:g}, "
            f"{_with_se(_at(net, -span))} / {_with_se(_at(net, span))} at -/+{span:g}; over the grid "
            f"{min(surface):.4g} .. {max(surface):.4g} ({net['seconds']:.0f} s)"
        )
    return lines + _verdict(result)
