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

A lesion replaces ``block.forward`` for the duration of a ``with`` block (``_lesioned``) and always puts
it back; the model is never copied.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import DEFAULT_RUNS_DIR, Subject, load_subjects, real_images, residual_blocks
from reslab.models.blocks import ZeroPadShortcut

# Numbers of randomly deleted blocks (capped at the net's block count): dense where Veit's Fig. 5a bends,
# sparse up to 20, beyond which every net is near chance. With 5 draws, a 56-layer net's 90 lesions cost
# about 46 full forward passes (the untouched leading blocks run once for all lesions, see _predictions).
K_STEPS = (1, 2, 4, 6, 8, 12, 16, 20)
BATCH_SIZE = 250  # images per forward: large enough for the CPU's convolutions, small enough to keep memory low

Lesion = dict[str, Any]  # {"delete": [block names], "swap": [(name, name), ...]}


# --- the lesion itself ---------------------------------------------------------------------------------------


def _geometry(block: nn.Module) -> tuple[int, int, int]:
    """(input channels, output channels, stride) of a block's residual branch (its convolutions, in order)."""
    convs = [m for name, m in block.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith("downsample")]
    return convs[0].in_channels, convs[-1].out_channels, math.prod(c.stride[0] for c in convs)


def _keeps_shape(block: nn.Module) -> bool:
    in_channels, out_channels, stride = _geometry(block)
    return in_channels == out_channels and stride == 1


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """shortcut(x) without computing the residual branch, so a deleted block costs (almost) nothing."""
    if block.downsample is None:
        return x
    if block.preact and not isinstance(block.downsample, ZeroPadShortcut):
        return block.paths(x)[1]  # a v2 projection sees BN-ReLU(x), which only paths() computes
    return block.downsample(x)


def _deleted_forward(block: nn.Module):
    """The forward of ``block`` with its residual branch set to zero (see the module docstring)."""
    if block.residual:

        def forward(x: Tensor) -> Tensor:
            identity = _shortcut(block, x)
            return block.merge(torch.zeros_like(identity), identity)

        return forward
    in_channels, out_channels, stride = _geometry(block)
    if in_channels == out_channels and stride == 1:
        return lambda x: x
    # No identity to fall back on: use the residual twin's option-A map, so both nets lose the same thing.
    return ZeroPadShortcut(in_channels=in_channels, out_channels=out_channels, stride=stride).forward


@contextmanager
def _lesioned(
    model: nn.Module, *, delete: Sequence[str] = (), swap: Sequence[tuple[str, str]] = ()
) -> Iterator[nn.Module]:
    """Within the ``with`` block, the blocks named in ``delete`` are deleted and each pair in ``swap`` runs in
    exchanged places (both blocks must keep their input's shape). Every ``forward`` is restored on exit, even
    on an error.

    Names are ``residual_blocks``' (``layer1.0``, ...).
    """
    blocks = dict(residual_blocks(model))
    unknown = [n for n in [*delete, *(n for pair in swap for n in pair)] if n not in blocks]
    if unknown:
        raise ValueError(f"no block named {unknown[0]!r}; the blocks are {', '.join(blocks)}")
    saved: list[tuple[nn.Module, Any]] = []  # (block, the instance's own forward before, or None)

    def set_forward(block: nn.Module, forward) -> None:
        saved.append((block, block.__dict__.get("forward")))
        block.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's

    try:
        for name in delete:
            set_forward(blocks[name], _deleted_forward(blocks[name]))
        for a, b in swap:
            if not (_keeps_shape(blocks[a]) and _keeps_shape(blocks[b])):
                raise ValueError(f"{a} and {b} cannot be swapped: a block that changes shape has one place")
            forward_a, forward_b = blocks[a].forward, blocks[b].forward
            set_forward(blocks[a], forward_b)
            set_forward(blocks[b], forward_a)
        yield model
    finally:
        for block, previous in reversed(saved):
            if previous is None:
                del block.forward
            else:
                block.forward = previous


# --- measuring many lesions on the same images ----------------------------------------------------------------


def _run_from(model: nn.Module, blocks: list[nn.Module], start: int, h: Tensor) -> Tensor:
    """Blocks ``start, start + 1, ...`` then the head, as ``model.forward`` runs them:
    (B, C, H, W), the input of block ``start`` -> logits (B, num_classes)."""
    for block in blocks[start:]:
        h = block(h)
    if model.final_bn is not None:  # v2's last BN-ReLU (ResNet.forward_features)
        h = torch.relu(model.final_bn(h))
    return model.forward_head(h)


@torch.inference_mode()
def _predictions(model: nn.Module, x: Tensor, lesions: list[Lesion], batch_size: int = BATCH_SIZE) -> Tensor:
    """The class the model predicts for each image under each lesion: (L, N) int64 for x (N, C, H, W).

    Blocks before the first one a lesion touches compute what the intact model computes, so lesions are
    visited in order of that block and share one pass through the untouched blocks (about halving the cost).
    """
    names = [name for name, _ in residual_blocks(model)]
    blocks = [block for _, block in residual_blocks(model)]
    index = {name: i for i, name in enumerate(names)}
    starts = [
        min(
            [index[n] for n in lesion.get("delete", ())] + [index[n] for p in lesion.get("swap", ()) for n in p],
            default=len(blocks),
        )
        for lesion in lesions
    ]
    predicted = torch.empty(len(lesions), len(x), dtype=torch.long)
    for offset in range(0, len(x), batch_size):
        h, at = model.forward_stem(x[offset : offset + batch_size]), 0
        for j in sorted(range(len(lesions)), key=starts.__getitem__):
            for block in blocks[at : starts[j]]:
                h = block(h)
            at = max(at, starts[j])
            with _lesioned(model, **lesions[j]):
                logits = _run_from(model, blocks, at, h)
            predicted[j, offset : offset + len(logits)] = logits.argmax(1).cpu()
    return predicted


def _adjacent_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Neighbouring blocks of one stage that both keep their shape: what Veit et al. may swap."""
    named = residual_blocks(model)
    return [
        (a, b)
        for (a, block_a), (b, block_b) in itertools.pairwise(named)
        if a.split(".")[0] == b.split(".")[0] and _keeps_shape(block_a) and _keeps_shape(block_b)
    ]


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


def _measure_subject(subject: Subject, *, images: int, draws: int, seed: int, data_dir: str | None) -> dict:
    """Accuracy of one net intact, with each block deleted, with k random blocks deleted, with pairs swapped."""
    start = time.perf_counter()
    model = subject.model.eval()
    device = next(model.parameters()).device
    x, y = real_images(subject.info, split="test", count=images, seed=seed, data_dir=data_dir, device=device)
    named = residual_blocks(model)
    names = [name for name, _ in named]
    ks, random_sets = _random_deletions(names, draws, seed)
    pairs = _adjacent_pairs(model)
    lesions = (
        [{}] + [{"delete": [n]} for n in names] + [{"delete": s} for s in random_sets] + [{"swap": [p]} for p in pairs]
    )
    correct = [int(c) / len(y) for c in (_predictions(model, x, lesions) == y.cpu()).sum(1)]
    single, rest = correct[1 : 1 + len(names)], correct[1 + len(names) :]
    by_k = [rest[i * draws : (i + 1) * draws] for i in range(len(ks))]
    return {
        "label": subject.label,
        "images": len(y),
        "source": subject.source,
        "trained": subject.trained,
        "residual": bool(model.config["residual"]),
        "blocks": names,
        "downsampling": [name for name, block in named if not _keeps_shape(block)],
        "chance": 1.0 / subject.info.num_classes,
        "baseline": correct[0],
        "single": single,
        "random": {
            "k": ks,
            "deleted": [random_sets[i * draws : (i + 1) * draws] for i in range(len(ks))],
            "accuracy": by_k,
            "mean": [statistics.fmean(a) for a in by_k],
            "std": [statistics.pstdev(a) for a in by_k],
        },
        "swaps": {"pairs": [list(p) for p in pairs], "accuracy": rest[len(random_sets) :]},
        "seconds": time.perf_counter() - start,
    }


def measure(
    *,
    models: Sequence[str] = ("resnet56", "plain56"),
    checkpoints: list[str] | None = None,
    runs_dir: str | None = DEFAULT_RUNS_DIR,
    images: int = 200,
    draws: int = 5,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Test accuracy of each net intact and lesioned (Veit et al. 2016), on ``images`` real test images.

    Args:
        models: registry names; each is ``<runs_dir>/<name>/best.pt`` where that exists, else a fresh model.
        checkpoints: trained checkpoints to use instead of ``models``.
        images: test images every lesion is measured on (the same ones for every lesion).
        draws: random sets of deleted blocks per k (k in ``K_STEPS``, up to the block count).

    Returns ``{"models": [per-net numbers], ...}``: ``baseline``, ``single`` (one accuracy per block, in
    ``blocks`` order), ``random`` (``k``, per-draw ``accuracy``, ``mean``, ``std``), ``swaps`` (``pairs``,
    ``accuracy``).
    """
    if images < 1:
        raise ReslabError(f"--images must be at least 1, not {images}")
    if draws < 1:
        raise ReslabError(f"--draws must be at least 1, not {draws}")
    subjects = load_subjects(
        list(models),
        checkpoints=checkpoints,
        runs_dir=runs_dir,
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
        "models": nets,
    }


# --- figure and text --------------------------------------------------------------------------------------------


def plot(result: dict, out_dir: Path) -> list[Path]:
    """One PNG, three panels: accuracy with each single block deleted, accuracy vs number of deleted blocks
    (mean and min-max over draws), and accuracy with each adjacent pair swapped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_one, ax_k, ax_swap) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, net in enumerate(result["models"]):
        style = dict(color=f"C{i}", marker="o", ms=3, label=f"{net['label']}{'' if net['trained'] else ' (fresh)'}")
        where = {name: j for j, name in enumerate(net["blocks"])}  # x = position in forward order
        ax_one.plot(range(len(where)), net["single"], **style)
        ks, acc = net["random"]["k"], net["random"]["accuracy"]
        ax_k.plot([0, *ks], [net["baseline"], *net["random"]["mean"]], **style)
        ax_k.fill_between(ks, [min(a) for a in acc], [max(a) for a in acc], color=style["color"], alpha=0.2)
        ax_swap.plot([where[a] + 0.5 for a, _ in net["swaps"]["pairs"]], net["swaps"]["accuracy"], **style)
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
    ax_k.set(xlabel="blocks deleted at random", ylabel="test accuracy")
    ax_k.set_title(f"k blocks deleted (mean, min-max of {result['draws']} draws)", fontsize=10)
    ax_swap.set(xlabel="swapped pair (between its two blocks)", ylabel="test accuracy")
    ax_swap.set_title("two neighbouring blocks swapped", fontsize=10)
    fig.suptitle(f"Lesion study (Veit et al. 2016), {result['images']} test images", fontsize=11)
    fig.tight_layout()
    path = Path(out_dir) / "lesion.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def summarize(result: dict) -> list[str]:
    """A few lines: per net, intact accuracy, the effect of one deletion, of k deletions and of swaps."""
    nets = result["models"]
    fresh = [n["label"] for n in nets if not n["trained"]]
    lines = [
        f"Lesion study (Veit et al. 2016) on {result['images']} test images"
        + (f"; FRESH, untrained: {', '.join(fresh)} (train them with `reslab explain degradation`)" if fresh else ""),
        f"Deleted block: {result['deleted_block']}.",
    ]
    for net in nets:
        single = net["single"]
        worst = min(range(len(single)), key=single.__getitem__)
        ks, means = net["random"]["k"], net["random"]["mean"]
        shown = ", ".join(f"k={k}: {m:.1%}" for k, m in zip(ks, means, strict=True) if k in (1, 4, 8, 16))
        swaps = net["swaps"]["accuracy"]
        lines.append(
            f"{net['label']} ({net['source']}): intact {net['baseline']:.1%}; one block deleted: median "
            f"{statistics.median(single):.1%}, worst {single[worst]:.1%} ({net['blocks'][worst]}); "
            f"k random blocks deleted (mean): {shown}; adjacent pair swapped: median "
            f"{statistics.median(swaps) if swaps else float('nan'):.1%}, worst {min(swaps, default=float('nan')):.1%}"
        )
    # Binomial standard error of an accuracy near the intact one: differences below about twice it are noise.
    acc = max(n["baseline"] for n in nets)
    stderr = (acc * (1 - acc) / max(result["images"], 1)) ** 0.5
    lines.append(f"Chance is {nets[0]['chance']:.0%}; one accuracy's standard error here is about {stderr:.1%}.")
    return lines
