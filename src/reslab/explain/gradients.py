"""Gradient flow through plain and residual networks: per-layer gradient norms at initialization and after training.

He et al. 2016 ("Identity Mappings in Deep Residual Networks", eq. 5): in a residual unit ``y = x + F(x)`` the
gradient at the input is ``dL/dx = dL/dy (1 + dF/dx)``. The "1" reaches ``x`` through the shortcut whatever the
weights of ``F`` are, so part of the gradient at the top reaches every block without passing through a weight
layer (in v1 it passes each sum's ReLU). A plain twin has only the ``dL/dy dF/dx`` term, a product of the
Jacobians of every block above.

For each depth the plain twin and the ResNet are built from the same seed (they have the same parameters, so
they start from the same weights) and measured on one batch of real training images, in train mode (BatchNorm
with the batch's statistics, as in training):

- the L2 norm of every conv and fc weight gradient, in depth order;
- the L2 norm of ``dL/dx`` at each block's input (the first block's input is the stem's output);
- each block's split of that gradient between its two paths: the vector-Jacobian products of the shortcut and
  of the residual branch ``F`` with the gradient at the sum, which both paths receive (for v1, the sum before
  its ReLU). The two add up to autograd's ``dL/dx``; the largest relative difference is reported.

With BatchNorm, deep plain nets at initialization do not show a vanishing gradient: it grows block after block
toward the input (Yang et al. 2019, "A Mean Field Theory of Batch Normalization", predict this explosion), by
about 5e7 from the last block of plain-110 to its first, against about 1e2 in ResNet-110. The first SGD steps
then scale the early convs' weights up by orders of magnitude (plain-110's stem: norm 1.5 -> 4e5 in 10 steps); a conv
followed by BN gives the same output at any weight scale and a gradient divided by it, so after a few steps
the same net's early gradients have vanished (to 1e-2 .. 1e-5 of the last block's: those exploded steps amplify
float rounding, so the figure changes with the thread count). The ResNet's stay within a small factor throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import dataset_info, device_of, line_style, load_subjects, real_images, residual_blocks
from reslab.models import ResNet, create_model

# He et al. 2015, Sec. 4.2 (CIFAR): SGD with lr 0.1 for batches of 128, momentum 0.9, weight decay 1e-4. The
# lr scales with the batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.1).
LR_PER_128 = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


def measure(
    *,
    depths: tuple[int, ...] | list[int] = (20, 56, 110),
    steps: int = 10,
    batch_size: int = 32,
    checkpoints: list[str] | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Gradient norms of ``plain{d}`` and ``resnet{d}`` for each CIFAR depth ``d = 6n + 2`` in ``depths``.

    Each model is measured on the same batch of ``batch_size`` training images at initialization and again
    after ``steps`` SGD steps on the following training batches (``steps=0``: at initialization only).
    ``checkpoints`` (plain and residual twins, e.g. the degradation runs' best.pt) replace ``depths``: then
    the first measurement is at the trained weights.

    Returns ``{"models": {name: {"depth", "residual", "blocks", "layers", "init", "trained", "train_loss"}}, ...}``
    where ``init`` / ``trained`` hold the norms (see ``_gradients``) and ``train_loss`` the loss of each step.
    """
    _check(depths, steps, batch_size)
    dev = device_of(device)
    subjects = _trained_twins(checkpoints, dev) if checkpoints else None
    info = subjects[0].info if subjects else dataset_info(dataset, data_dir)
    images, labels = real_images(
        info, split="train", count=batch_size * (steps + 1), seed=seed, data_dir=data_dir, device=dev
    )
    if len(labels) < batch_size:
        raise ReslabError(f"{dataset} has only {len(labels)} training images, fewer than --batch-size {batch_size}")
    batches = [_batch(images, labels, i, batch_size) for i in range(steps + 1)]
    lr = LR_PER_128 * batch_size / 128
    models = {}
    for subject in subjects or []:
        models[subject.label] = _study(subject.model, batches, subject.model.depth, lr=lr)
    for depth in depths if not subjects else ():
        for kind in ("plain", "resnet"):
            torch.manual_seed(seed)  # the same seed: a plain twin starts from its ResNet's weights
            n = (depth - 2) // 6  # the CIFAR net of any depth 6n+2, registered or not
            model = create_model(
                f"{kind}20", num_classes=info.num_classes, in_chans=info.channels, layers=[n, n, n]
            ).to(dev)
            models[f"{kind}{depth}"] = _study(model, batches, depth, lr=lr)
    return {
        "start": "the checkpoints' weights" if subjects else "initialization",
        "dataset": info.name,
        "batch_size": batch_size,
        "steps": steps,
        "optimizer": {"lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        "seed": seed,
        "norm": "L2 norm of the whole gradient tensor of the batch's mean cross-entropy",
        "models": models,
    }


def _trained_twins(checkpoints: list[str], dev: torch.device) -> list:
    """Checkpoints of plain and residual CIFAR twins, each depth both ways (the comparison needs pairs)."""
    subjects = load_subjects([], checkpoints=checkpoints, device=dev)
    names = {s.label for s in subjects}
    for s in subjects:
        twin = s.label.replace("plain", "resnet") if s.label.startswith("plain") else s.label.replace("resnet", "plain")
        if s.model.config["stem"] != "cifar" or twin not in names:
            raise ReslabError(f"--checkpoints needs CIFAR plain/ResNet twins of the same depth; {s.label} has none")
    return subjects


def _check(depths, steps: int, batch_size: int) -> None:
    if not depths or any(d < 8 or (d - 2) % 6 for d in depths):
        raise ReslabError(f"--depths must be CIFAR depths 6n+2 (e.g. 20 56 110), not {list(depths)}")
    if steps < 0:
        raise ReslabError(f"--steps must be 0 or more, not {steps}")
    if batch_size < 2:
        raise ReslabError(f"--batch-size must be at least 2 (BatchNorm needs a batch), not {batch_size}")


def _batch(images: Tensor, labels: Tensor, i: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """The i-th batch, wrapping around when the split is smaller than all the batches together."""
    index = torch.arange(i * batch_size, (i + 1) * batch_size, device=labels.device) % len(labels)
    return images[index], labels[index]


def _study(model: ResNet, batches: list[tuple[Tensor, Tensor]], depth: int, *, lr: float) -> dict[str, Any]:
    """Measure on ``batches[0]``, train on the rest, measure again on ``batches[0]``."""
    probe, training = batches[0], batches[1:]
    init = _gradients(model, *probe)
    losses = _train(model, training, lr=lr)
    return {
        "depth": depth,
        "residual": bool(model.config["residual"]),
        "blocks": [name for name, _ in residual_blocks(model)],
        "layers": [name for name, _ in _weighted_layers(model)],
        "init": init,
        "trained": _gradients(model, *probe) if training else None,
        "train_loss": losses,
    }


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and fc, in the order they are registered (the forward order in these nets)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@contextmanager
def _recording_paths(model: ResNet) -> Iterator[list[tuple[Tensor, Tensor, Tensor | None]]]:
    """While open, each block's forward records ``(x, F(x), shortcut(x))`` with their gradients retained.

    The real ``block.paths`` runs; ``merge`` gets a copy of ``F(x)`` so that the plain block's in-place ReLU
    leaves the recorded ``F(x)`` (and its ``.grad``, the gradient at the sum) as it was before the merge.
    """
    record: list[tuple[Tensor, Tensor, Tensor | None]] = []
    blocks = [block for _, block in residual_blocks(model)]

    def recorder(paths):
        def recording(x: Tensor) -> tuple[Tensor, Tensor | None]:
            branch, identity = paths(x)
            x.retain_grad()
            branch.retain_grad()
            record.append((x, branch, identity))
            return branch.clone(), identity

        return recording

    for block in blocks:
        block.paths = recorder(block.paths)  # an instance attribute shadows the method until deleted
    try:
        yield record
    finally:
        for block in blocks:
            del block.paths


def _split(x: Tensor, branch: Tensor, identity: Tensor | None, at_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 5 of He et al. 2016, one block: the gradient reaching ``x`` through the shortcut and through ``F``.

    Both paths receive ``at_sum``, the gradient at their sum (before the ReLU in v1); each path's
    vector-Jacobian product carries it back to ``x``. (B, C, H, W) each; the shortcut's is zero in a plain block.
    """
    (through_branch,) = torch.autograd.grad(branch, x, at_sum, retain_graph=True)
    if identity is None:
        return torch.zeros_like(x), through_branch
    if identity is x:  # the identity shortcut: the "1" of eq. 5
        return at_sum, through_branch
    (through_skip,) = torch.autograd.grad(identity, x, at_sum, retain_graph=True)
    return through_skip, through_branch


def _gradients(model: ResNet, x: Tensor, y: Tensor) -> dict[str, Any]:
    """One forward and backward in train mode on (B, C, H, W) images ``x`` and (B,) labels ``y``.

    Returns the loss and L2 norms: ``stem_weight_grad`` (conv1), ``block_input_grad`` (one per block, the
    first is the stem's output), ``skip_grad`` / ``branch_grad`` (each block's split), ``weight_grad`` and
    ``weight_norm`` (every conv and fc) and ``split_error``, the largest ``|skip + branch - dL/dx| / |dL/dx|``
    over the blocks.
    """
    model.train()  # BatchNorm with batch statistics, as in training
    model.zero_grad(set_to_none=True)
    with _recording_paths(model) as record:
        loss = F.cross_entropy(model(x), y)
        loss.backward(retain_graph=True)  # kept for the per-block vector-Jacobian products below
    # Copied now: autograd.grad below also feeds the retained .grad of the tensors it passes through.
    totals = [block_input.grad.clone() for block_input, _, _ in record]
    at_sums = [branch.grad.clone() for _, branch, _ in record]
    inputs, skips, branches, errors = [], [], [], []
    for (block_input, branch, identity), total, at_sum in zip(record, totals, at_sums, strict=True):
        through_skip, through_branch = _split(block_input, branch, identity, at_sum)
        inputs.append(total.norm().item())
        skips.append(through_skip.norm().item())
        branches.append(through_branch.norm().item())
        errors.append(((through_skip + through_branch - total).norm() / total.norm()).item())
    loss_value = loss.item()
    del record, loss  # frees the retained graph
    return {
        "loss": loss_value,
        "stem_weight_grad": model.conv1.weight.grad.norm().item(),
        "stem_output_grad": inputs[0],
        "block_input_grad": inputs,
        "skip_grad": skips,
        "branch_grad": branches,
        "split_error": max(errors),
        "weight_grad": [m.weight.grad.norm().item() for _, m in _weighted_layers(model)],
        "weight_norm": [m.weight.norm().item() for _, m in _weighted_layers(model)],
    }


def _train(model: ResNet, batches: list[tuple[Tensor, Tensor]], *, lr: float) -> list[float]:
    """One SGD step per batch (the paper's CIFAR optimizer); returns each step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    losses = []
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _relative_depth(count: int) -> list[float]:
    """Positions 0 (first) .. 1 (last) of ``count`` layers, so nets of different depths share an axis."""
    return [i / max(count - 1, 1) for i in range(count)]


def _panel(ax, title: str, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("relative depth (0 = first, 1 = last)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``gradients.png``: four log-scale panels, one line per model (plain dashed, residual solid).

    Block-input gradient norms at initialization and after training, weight-gradient norms at initialization,
    and each ResNet block's ratio of the gradient through ``F`` to the gradient through the shortcut.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    models = result["models"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for name, m in models.items():
        style = line_style(result, name)
        blocks_x = _relative_depth(len(m["blocks"]))
        axes[0, 0].plot(blocks_x, m["init"]["block_input_grad"], **style)
        if m["trained"] is not None:
            axes[0, 1].plot(blocks_x, m["trained"]["block_input_grad"], **style)
        axes[1, 0].plot(_relative_depth(len(m["layers"])), m["init"]["weight_grad"], **style)
        if m["residual"]:
            for state, dotted in (("init", False), ("trained", True)):
                if m[state] is not None:
                    ratio = [
                        b / max(s, 1e-30) for b, s in zip(m[state]["branch_grad"], m[state]["skip_grad"], strict=True)
                    ]
                    label = f"{name} {'after training' if dotted else 'at start'}"
                    axes[1, 1].plot(blocks_x, ratio, **{**style, "linestyle": ":" if dotted else "-", "label": label})
    _panel(axes[0, 0], f"|dL/dx| at each block's input, at {result['start']}", "gradient norm")
    _panel(axes[0, 1], f"|dL/dx| at each block's input, after {result['steps']} SGD steps", "gradient norm")
    _panel(axes[1, 0], f"|dL/dW| of each conv and fc, at {result['start']}", "weight-gradient norm")
    axes[1, 1].axhline(1.0, color="gray", linewidth=0.8)
    axes[1, 1].yaxis.set_major_formatter(ScalarFormatter())
    axes[1, 1].yaxis.set_minor_formatter(NullFormatter())
    _panel(axes[1, 1], "ResNets: |through F| / |through the shortcut| (He et al. 2016, eq. 5)", "ratio")
    fig.suptitle(
        f"Gradient flow, plain (dashed) vs residual (solid), {result['batch_size']} {result['dataset']} images",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(out_dir) / "gradients.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _growth(state: dict[str, Any]) -> float:
    """How much the gradient grows from the last block's input to the first's (the stem's output)."""
    return state["block_input_grad"][0] / state["block_input_grad"][-1]


def summarize(result: dict[str, Any]) -> list[str]:
    """The stem gradients of plain vs residual per depth, the growth toward the input, and the split check."""
    models = result["models"]
    depths = sorted({m["depth"] for m in models.values()})
    lines = [
        f"Gradient L2 norms on one batch of {result['batch_size']} {result['dataset']} training images "
        "(mean cross-entropy, BatchNorm in train mode)"
        + ("; each plain twin starts from its ResNet's seeded weights." if result["start"] == "initialization" else ".")
    ]
    states = [("init", f"at {result['start']}")]
    if result["steps"]:
        states.append(("trained", f"after {result['steps']} SGD steps (lr {result['optimizer']['lr']:.3g})"))
    for state, when in states:
        for d in depths:
            plain, res = models[f"plain{d}"][state], models[f"resnet{d}"][state]
            lines.append(
                f"depth {d} {when}: stem conv1 weight gradient plain {plain['stem_weight_grad']:.3g} vs ResNet "
                f"{res['stem_weight_grad']:.3g} ({plain['stem_weight_grad'] / res['stem_weight_grad']:.3g}x); "
                f"|dL/dx| first block / last block: plain {_growth(plain):.3g}x, ResNet {_growth(res):.3g}x"
            )
    ratios = []
    for d in depths:
        init = models[f"resnet{d}"]["init"]
        share = sorted(s / max(t, 1e-30) for s, t in zip(init["skip_grad"], init["block_input_grad"], strict=True))
        ratios.append(f"ResNet-{d} {share[len(share) // 2]:.2f}")
    lines.append(f"median |through the shortcut| / |dL/dx| per block at {result['start']}: " + ", ".join(ratios))
    worst = max(m[s]["split_error"] for m in models.values() for s in ("init", "trained") if m[s] is not None)
    lines.append(
        f"shortcut + residual branch equals autograd's dL/dx at every block input (largest relative gap {worst:.1g})"
    )
    deepest = depths[-1]
    plain = models[f"plain{deepest}"]
    for state, when in states:
        growth = _growth(plain[state])
        lines.append(
            f"{when[0].upper()}{when[1:]} the plain-{deepest} gradient {'explodes' if growth > 1 else 'vanishes'} "
            f"toward the input ({growth:.3g}x from the last block to the first); "
            f"ResNet-{deepest}'s changes {_growth(models[f'resnet{deepest}'][state]):.3g}x."
        )
    if plain["trained"] is not None:
        lines.append(
            f"plain-{deepest}'s stem conv1 weight norm went from {plain['init']['weight_norm'][0]:.3g} to "
            f"{plain['trained']['weight_norm'][0]:.3g}: with BN after it, a conv's output ignores its weight's "
            "scale and its gradient shrinks by it."
        )
    return lines
