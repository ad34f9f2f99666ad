"""Lesion study: delete and reorder blocks of a network at test time (Veit et al. 2016, "Residual networks
behave like ensembles of relatively shallow networks", Sec. 4).

Veit et al. find that deleting one block of a trained ResNet barely moves its test error (their Fig. 3),
that the error grows smoothly with the number of deleted blocks (Fig. 5a) and that swapping blocks hurts
little (Fig. 5b), whereas removing one layer of a plain network drops it to chance. Their reading: a ResNet
acts as an ensemble of the 2^n paths through its blocks, most of them short, so no single block is vital.

What "deleted" means here:

- a residual block keeps only its shortcut: ``y = merge(0, shortcut(x))``. In v1 the ReLU after the sum
  stays, but it acts on ``shortcut(x) >= 0`` (the block's input is a ReLU output), so the block is exactly
  ``y = x``; with option-A shortcuts a downsampling block becomes the strided, zero-padded identity, so
  every block can be deleted (Veit et al. could not delete the projection blocks of their ImageNet net);
- a plain block becomes ``y = x``; where it changes shape (the first block of stages 2 and 3) it becomes
  the same option-A map (subsample, zero-pad the new channels), so both nets lose the same operation at
  the same 27 places and their curves compare block for block.

A lesion replaces ``block.forward`` for the duration of a ``with`` block (``lesion_surgery.lesioned``) and
always puts it back; the model is never copied.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import (
    Subject,
    binomial_se,
    channels_last,
    load_subjects,
    mean_se,
    nets_studied,
    real_images,
    residual_blocks,
)
from reslab.explain.lesion_surgery import keeps_shape, predictions
from reslab.explain.options import NETS_AND_IMAGES, declare

# `reslab explain lesion`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "delete and swap blocks at test time (Veit et al. 2016)"
OPTIONS = declare(
    *NETS_AND_IMAGES,
    draws=dict(type=int, default=None, help="random draws per number of deleted blocks"),
)

# Numbers of randomly deleted blocks (capped at the net's block count), doubling to 16 of a 56-layer net's 27,
# where both nets are near chance (Veit's Fig. 5a). k = 1 needs no draws: it is the mean of every single deletion.
K_STEPS = (2, 4, 8, 16)
DEFAULT_DRAWS = 3  # random sets per k: enough to show the spread over draws, which the summary reports
# Test images for every lesion: one accuracy's binomial standard error is then under 1 point above 80% accuracy
# (0.96 at the shipped plain-56's 82%, 0.73 at ResNet-56's 91%), the lesion-to-intact drops' paired errors far
# less; 1,000 images took 57.5 s for the two 56-layer nets' lesions on this 2-core CPU (`reslab explain all`).
DEFAULT_IMAGES = 1600


# --- which lesions, and their accuracies ------------------------------------------------------------------------


def _adjacent_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Neighbouring blocks of one stage that both keep their shape (what Veit et al. may swap), each block in
    one pair at most: every stage is covered at about half the cost of all 22 pairs of a 56-layer net."""
    pairs: list[tuple[str, str]] = []
    for (a, block_a), (b, block_b) in itertools.pairwise(residual_blocks(model)):
        same_stage = a.split(".")[0] == b.split(".")[0]
        if same_stage and keeps_shape(block_a) and keeps_shape(block_b) and (not pairs or pairs[-1][1] != a):
            pairs.append((a, b))
    return pairs


def _random_deletions(names: list[str], draws: int, seed: int) -> tuple[list[int], list[list[str]]]:
    """k values and, for each k, ``draws`` random sets of k block names (seeded: the same for every net of
    the same block count). Returns (ks, sets) with ``sets`` ordered k by k, draw by draw."""
    ks = [k for k in K_STEPS if k <= len(names)]
    generator = torch.Generator().manual_seed(seed)
    sets = [
        [names[i] for i in sorted(torch.randperm(len(names), generator=generator)[:k].tolist())]
        for k in ks
        for _ in range(draws)
    ]
    return ks, sets


def _average(correct: Tensor, intact: Tensor) -> dict[str, float]:
    """The mean accuracy over several lesions and its drop from the intact net, each with its standard error
    over the images (per image: the share of the lesions that got it right; paired with the intact net's).

    correct: (L, N) 1.0 where lesion l classifies image n right; intact: (N,) the same for the intact net.
    """
    per_image = correct.mean(0)
    accuracy, se = mean_se(per_image)
    drop, drop_se = mean_se(intact - per_image)
    return {"accuracy": accuracy, "se": se, "drop": drop, "drop_se": drop_se}


def _accuracies(correct: Tensor) -> tuple[list[float], list[float]]:
    """Each lesion's accuracy (L,) from (L, N) 0/1 rows, and its binomial standard error."""
    n = correct.shape[1]
    accuracy = correct.mean(1).tolist()
    return accuracy, [binomial_se(a, n) for a in accuracy]


def _by_k(correct: Tensor, intact: Tensor, ks: list[int], sets: list[list[str]], draws: int) -> dict[str, Any]:
    """Random deletions grouped by k: per-draw accuracies, their mean with its error over the images, and the
    spread over the draws (which blocks were drawn), both part of the mean's uncertainty."""
    groups = [correct[i * draws : (i + 1) * draws] for i in range(len(ks))]
    averages = [_average(g, intact) for g in groups]
    per_draw = [g.mean(1).tolist() for g in groups]
    std = [statistics.stdev(a) if draws > 1 else math.nan for a in per_draw]
    return {
        "k": ks,
        "deleted": [sets[i * draws : (i + 1) * draws] for i in range(len(ks))],
        "accuracy": per_draw,
        "mean": [a["accuracy"] for a in averages],
        "se": [a["se"] for a in averages],  # over images, for these draws
        "std": std,  # over draws
        "se_draws": [s / math.sqrt(draws) for s in std],
        "drop": [a["drop"] for a in averages],
        "drop_se": [a["drop_se"] for a in averages],
    }


def _measure_subject(subject: Subject, *, images: int, draws: int, seed: int, data_dir: str | None) -> dict:
    """Accuracy of one net intact, with each block deleted, with k random blocks deleted, with pairs swapped;
    each with its standard error over the images."""
    start = time.perf_counter()
    device = next(subject.model.parameters()).device
    x, y = real_images(subject.info, split="test", count=images, seed=seed, data_dir=data_dir, device=device)
    model, x = channels_last(subject.model.eval(), x)
    named = residual_blocks(model)
    names = [name for name, _ in named]
    ks, random_sets = _random_deletions(names, draws, seed)
    pairs = _adjacent_pairs(model)
    lesions = (
        [{}] + [{"delete": [n]} for n in names] + [{"delete": s} for s in random_sets] + [{"swap": [p]} for p in pairs]
    )
    correct = (predictions(model, x, lesions) == y.cpu()).double()  # (lesions, images)
    intact, single, rest = correct[0], correct[1 : 1 + len(names)], correct[1 + len(names) :]
    random_rows, swap_rows = rest[: len(random_sets)], rest[len(random_sets) :]
    single_accuracy, single_se = _accuracies(single)
    swap_accuracy, swap_se = _accuracies(swap_rows)
    return {
        **subject.describe(),
        "images": len(y),
        "residual": bool(model.config["residual"]),
        "blocks": names,
        "downsampling": [name for name, block in named if not keeps_shape(block)],
        "chance": 1.0 / subject.info.num_classes,
        "baseline": intact.mean().item(),
        "baseline_se": binomial_se(intact.mean().item(), len(y)),
        "single": single_accuracy,
        "single_se": single_se,
        "single_mean": _average(single, intact),  # k = 1 over every block: the exact mean, no draws
        "random": _by_k(random_rows, intact, ks, random_sets, draws),
        "swaps": {
            "pairs": [list(p) for p in pairs],
            "accuracy": swap_accuracy,
            "se": swap_se,
            "mean": _average(swap_rows, intact) if len(pairs) else None,
        },
        "seconds": time.perf_counter() - start,
    }


def measure(
    *,
    models: Sequence[str] = ("resnet56", "plain56"),
    checkpoints: list[str] | None = None,
    runs_dir: str | None = None,
    fresh: bool = False,
    images: int = DEFAULT_IMAGES,
    draws: int = DEFAULT_DRAWS,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Test accuracy of each net intact and lesioned (Veit et al. 2016), on ``images`` real test images.

    Args:
        models: registry names: the shipped trained nets, or ``<runs_dir>/<name>/best.pt``, or (``fresh``)
            fresh seeded models (``common.load_subjects``).
        checkpoints: trained checkpoints to use instead of ``models``.
        images: test images every lesion is measured on (the same ones for every lesion).
        draws: random sets of deleted blocks per k (k in ``K_STEPS``, up to the block count).

    Returns ``{"models": [per-net numbers], ...}``: ``baseline``, ``single`` (one accuracy per block, in
    ``blocks`` order), ``single_mean`` (their mean and its drop from ``baseline``), ``random`` (``k``,
    per-draw ``accuracy``, ``mean``, ``std`` over draws), ``swaps`` (``pairs``, ``accuracy``); every accuracy
    with its standard error over the images (``*_se``, ``se``).
    """
    if images < 1:
        raise ReslabError(f"--images must be at least 1, not {images}")
    if draws < 1:
        raise ReslabError(f"--draws must be at least 1, not {draws}")
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
    nets = [_measure_subject(s, images=images, draws=draws, seed=seed, data_dir=data_dir) for s in subjects]
    return {
        "paper": "Veit et al. 2016, Residual networks behave like ensembles of relatively shallow networks",
        "split": "test",
        "images": nets[0]["images"],
        "draws": draws,
        "seed": seed,
        "deleted_block": (
            "residual: y = merge(0, shortcut(x)) (v1 keeps the ReLU after the sum; it acts on shortcut(x) >= 0, "
            "so y = x, or the option-A zero-padded subsample in a downsampling block); plain: y = x, and the same "
            "option-A map where the block changes shape"
        ),
        "uncertainty": "one standard error over the test images: binomial sqrt(p (1 - p) / n) for one accuracy; "
        "for a mean over lesions and a drop from the intact net, the standard error of the per-image values "
        "(paired: the same images)",
        "models": nets,
    }


# --- figure and text --------------------------------------------------------------------------------------------


def plot(result: dict, out_dir: Path) -> list[Path]:
    """One PNG, three panels: accuracy with each single block deleted, accuracy vs number of deleted blocks
    (mean over draws, min-max shaded), and accuracy with each adjacent pair swapped; bars: one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_one, ax_k, ax_swap) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, net in enumerate(result["models"]):
        style = dict(color=f"C{i}", marker="o", ms=3, label=f"{net['label']}{'' if net['trained'] else ' (fresh)'}")
        where = {name: j for j, name in enumerate(net["blocks"])}  # x = position in forward order
        ax_one.errorbar(range(len(where)), net["single"], yerr=net["single_se"], capsize=2, **style)
        ks, acc, random = net["random"]["k"], net["random"]["accuracy"], net["random"]
        k_se = _k_se(random)
        ax_k.errorbar(
            [0, 1, *ks],
            [net["baseline"], net["single_mean"]["accuracy"], *random["mean"]],
            yerr=[net["baseline_se"], net["single_mean"]["se"], *k_se],
            capsize=2,
            **style,
        )
        ax_k.fill_between(ks, [min(a) for a in acc], [max(a) for a in acc], color=style["color"], alpha=0.2)
        swaps = net["swaps"]
        x_swaps = [where[a] + 0.5 for a, _ in swaps["pairs"]]
        ax_swap.errorbar(x_swaps, swaps["accuracy"], yerr=swaps["se"], capsize=2, **style)
        for ax in (ax_one, ax_swap):
            ax.axhline(net["baseline"], color=style["color"], ls="--", lw=1)
    blocks = result["models"][0]["blocks"]
    for ax in (ax_one, ax_swap):
        ax.set_xticks(range(len(blocks)), [b.removeprefix("layer") for b in blocks], rotation=90, fontsize=7)
        for name in result["models"][0]["downsampling"]:
            ax.axvline(blocks.index(name), color="gray", ls=":", lw=1)
    for ax in (ax_one, ax_k, ax_swap):
        ax.axhline(result["models"][0]["chance"], color="black", ls=":", lw=1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_one.set(xlabel="deleted block (dotted: downsampling)", ylabel="test accuracy")
    ax_one.set_title("one block deleted (dashed: intact)", fontsize=10)
    ax_k.set(xlabel="blocks deleted (k = 1: every single block)", ylabel="test accuracy")
    ax_k.set_title(f"k blocks deleted (mean, min-max of {result['draws']} draws)", fontsize=10)
    ax_swap.set(xlabel="swapped pair (between its two blocks)", ylabel="test accuracy")
    ax_swap.set_title("two neighbouring blocks swapped", fontsize=10)
    fig.suptitle(
        f"Lesion study (Veit et al. 2016), {result['images']} test images, bars: one standard error", fontsize=11
    )
    fig.tight_layout()
    path = Path(out_dir) / "lesion.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def _k_se(random: dict) -> list[float]:
    """Each k's standard error of the mean over draws: over the images and over the draws, combined."""
    return [math.hypot(a, b) if math.isfinite(b) else a for a, b in zip(random["se"], random["se_draws"], strict=True)]


def _points(value: float, se: float) -> str:
    """An accuracy and its standard error, in percent and points: ``91.2% +- 0.9``."""
    return f"{value:.1%} +- {100 * se:.1f}"


def _net_line(net: dict) -> str:
    single, mean = net["single"], net["single_mean"]
    worst = min(range(len(single)), key=single.__getitem__)
    random = net["random"]
    shown = ", ".join(
        f"k={k}: {_points(m, se)}" for k, m, se in zip(random["k"], random["mean"], _k_se(random), strict=True)
    )
    swaps = net["swaps"]
    swapped = (
        f"mean {_points(swaps['mean']['accuracy'], swaps['mean']['se'])} (drop {100 * swaps['mean']['drop']:.1f} "
        f"+- {100 * swaps['mean']['drop_se']:.1f} points), worst {min(swaps['accuracy']):.1%}"
        if swaps["mean"]
        else "none possible"
    )
    return (
        f"{net['label']}: intact {_points(net['baseline'], net['baseline_se'])}; one block deleted: mean "
        f"{_points(mean['accuracy'], mean['se'])} (drop {100 * mean['drop']:.1f} +- {100 * mean['drop_se']:.1f} "
        f"points), median {statistics.median(single):.1%}, worst {_points(single[worst], net['single_se'][worst])} "
        f"({net['blocks'][worst]}); k random blocks deleted (mean of draws, +- over images and draws): {shown}; "
        f"adjacent pair swapped: {swapped}"
    )


def _verdicts(nets: list[dict]) -> list[str]:
    """Veit et al.'s two contrasts, residual against plain, with the drops' standard errors."""
    residual = next((n for n in nets if n["residual"]), None)
    plain = next((n for n in nets if not n["residual"]), None)
    if residual is None or plain is None:
        return []
    lines = []
    for what, key in (("deleting one block", "single_mean"), ("swapping two neighbouring blocks", "swaps")):
        r, p = (net[key] if key == "single_mean" else net[key]["mean"] for net in (residual, plain))
        if r is None or p is None:
            continue
        gap, se = p["drop"] - r["drop"], math.hypot(p["drop_se"], r["drop_se"])
        verdict = "agrees" if gap > 2 * se else "disagrees (within two standard errors)"
        lines.append(
            f"{what} costs {residual['label']} {100 * r['drop']:.1f} +- {100 * r['drop_se']:.1f} points and "
            f"{plain['label']} {100 * p['drop']:.1f} +- {100 * p['drop_se']:.1f} (Veit et al.: a ResNet barely "
            f"notices, a plain net falls to chance): {verdict}"
        )
    return lines


def summarize(result: dict) -> list[str]:
    """A few lines: which nets, per net the intact accuracy and the effect of one deletion, of k deletions and
    of swaps, each +- one standard error; then the paper's contrasts."""
    nets = result["models"]
    n = result["images"]
    acc = max(net["baseline"] for net in nets)
    return [
        f"Lesion study (Veit et al. 2016) on {n} test images; +- is one standard error over the images "
        f"(one accuracy: binomial, {100 * binomial_se(acc, n):.1f} points at {acc:.1%}, at most "
        f"{100 * binomial_se(0.5, n):.1f}; a drop from the intact net: paired over the same images).",
        nets_studied(nets),
        f"Deleted block: {result['deleted_block']}.",
        *(_net_line(net) for net in nets),
        *_verdicts(nets),
        f"Chance is {nets[0]['chance']:.0%}.",
    ]
