"""Gradient flow through plain and residual networks: per-layer gradient norms at initialization and after training.

He et al. 2016 ("Identity Mappings in Deep Residual Networks", eq. 5): in a residual unit ``y = x + F(x)`` the
gradient at the input is ``dL/dx = dL/dy (1 + dF/dx)``. The "1" reaches ``x`` through the shortcut whatever the
weights of ``F`` are, so part of the gradient at the top reaches every block without passing through a weight
layer (in v1 it passes each sum's ReLU). A plain twin has only the ``dL/dy dF/dx`` term, a product of the
Jacobians of every block above.

For each depth the plain twin and the ResNet are built from the same seed (they have the same parameters, so
they start from the same weights) and measured on one batch of real training images, in train mode (BatchNorm
with the batch's statistics, as in training; ``gradients_probe`` measures one batch):

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

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reslab.errors import ReslabError
from reslab.explain.common import (
    Subject,
    check_choice,
    check_in_memory,
    check_shipped,
    dataset_info,
    device_of,
    line_style,
    load_subjects,
    nets_studied,
    real_images,
    residual_blocks,
)
from reslab.explain.gradients_probe import gradient_norms, weighted_layers
from reslab.explain.options import declare
from reslab.models import ResNet, create_model

# `reslab explain gradients`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "per-layer gradient norms of plain and residual nets: fresh of several depths, and the shipped trained twins"
OPTIONS = declare(
    "--depths",
    "--checkpoints",
    "--fresh",
    "--dataset",
    "--data-dir",
    steps=dict(type=int, default=None, help="training steps before the second measurement"),
    batch_size=dict(type=int, default=None),
    probes=dict(type=int, default=None, help="batches each state is measured on (default 3)"),
)

# He et al. 2015, Sec. 4.2 (CIFAR): SGD with lr 0.1 for batches of 128, momentum 0.9, weight decay 1e-4. The
# lr scales with the batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 2.1).
LR_PER_128 = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4


DEFAULT_PROBES = 3  # batches every state is measured on: each headline number comes with its range over them
SHIPPED = ("plain20", "resnet20", "plain56", "resnet56")  # the trained twins studied beside the fresh nets


def measure(
    *,
    depths: tuple[int, ...] | list[int] = (20, 56, 110),
    steps: int = 10,
    batch_size: int = 32,
    probes: int = DEFAULT_PROBES,
    checkpoints: list[str] | None = None,
    fresh: bool = False,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Gradient norms of plain and residual twins, fresh and trained.

    By default two groups: ``plain{d}`` and ``resnet{d}`` for each CIFAR depth ``d = 6n + 2`` in ``depths``,
    fresh (seeded), measured at initialization and again after ``steps`` SGD steps (``steps=0``: at
    initialization only); and the shipped trained twins (plain/ResNet-20 and -56) at their weights, on images
    they trained on. ``fresh``: the first group only. ``checkpoints`` (plain and residual twins of your own
    runs) replace both: measured at their weights and after ``steps`` more steps. Every state is measured on
    ``probes`` batches of ``batch_size`` training images (the same batches for every net of a group).

    Returns ``{"groups": {"fresh" | "shipped" | "checkpoints": {"start", "steps", "models": {name: {"depth",
    "residual", "blocks", "layers", "init", "trained", "init_probes", "trained_probes", "train_loss"}}}}, ...}``
    where ``init`` / ``trained`` hold the norms on the first batch (see ``gradients_probe.gradient_norms``),
    ``*_probes`` the headline numbers on every batch (see ``_headline``) and ``train_loss`` the loss of each step.
    """
    _check(depths, steps, batch_size, probes)
    check_choice(checkpoints=checkpoints, runs_dir=None, fresh=fresh)
    dev = device_of(device)
    check_in_memory(dataset)
    if not (checkpoints or fresh):
        check_shipped(SHIPPED, dataset)  # before minutes of measuring
    lr = LR_PER_128 * batch_size / 128
    options = dict(batch_size=batch_size, probes=probes, seed=seed, data_dir=data_dir, lr=lr)
    if checkpoints:
        twins = _trained_twins(checkpoints, dev)
        groups = {"checkpoints": _trained_group(twins, "the checkpoints' weights", steps, **options)}
    else:
        groups = {"fresh": _fresh_group(depths, dataset, dev, steps=steps, **options)}
        if not fresh:
            twins = load_subjects(SHIPPED, dataset=dataset, device=dev)
            groups["shipped"] = _trained_group(twins, "the shipped trained weights", 0, **options)
    return {
        "dataset": dataset,
        "batch_size": batch_size,
        "probes": probes,
        "optimizer": {"lr": lr, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        "seed": seed,
        "norm": "L2 norm of the whole gradient tensor of the batch's mean cross-entropy",
        "uncertainty": f"each state measured on {probes} batches: the full numbers of the first, and the headline "
        "numbers (stem gradient, growth, shortcut share, and plain/ResNet ratios on the same batch) on every "
        "batch, with their range; the shortcut + branch split is an exact check (its largest relative gap)",
        "groups": groups,
    }


def _batches(images: Tensor, labels: Tensor, count: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return [_batch(images, labels, i, batch_size) for i in range(count)]


def _fresh_group(
    depths, dataset: str, dev: torch.device, *, steps: int, batch_size: int, probes: int, seed: int, data_dir, lr: float
) -> dict[str, Any]:
    """Seeded fresh twins of each depth: measured on the probe batches, trained on the next ``steps``, again."""
    info = dataset_info(dataset, data_dir)
    count = batch_size * (probes + steps)
    images, labels = real_images(info, split="train", count=count, seed=seed, data_dir=data_dir, device=dev)
    if len(labels) < batch_size:
        raise ReslabError(f"{dataset} has only {len(labels)} training images, fewer than --batch-size {batch_size}")
    batches = _batches(images, labels, probes + steps, batch_size)
    models = {}
    for depth in depths:
        for kind in ("plain", "resnet"):
            torch.manual_seed(seed)  # the same seed: a plain twin starts from its ResNet's weights
            n = (depth - 2) // 6  # the CIFAR net of any depth 6n+2, registered or not
            model = create_model(f"{kind}20", num_classes=info.num_classes, in_chans=info.channels, layers=[n, n, n])
            models[f"{kind}{depth}"] = _study(model.to(dev), batches[:probes], batches[probes:], depth, lr=lr)
    nets = [{"label": name, "source": f"fresh (seed {seed})", "kind": "fresh", "trained": False} for name in models]
    return {"start": "initialization", "steps": steps, "nets": nets, "models": models}


def _trained_group(
    subjects: list[Subject], start: str, steps: int, *, batch_size: int, probes: int, seed: int, data_dir, lr: float
) -> dict[str, Any]:
    """Trained twins, each on images it trained on (the same batches for nets that share a training split)."""
    models = {}
    for subject in subjects:
        dev = next(subject.model.parameters()).device
        count = batch_size * (probes + steps)
        split = dict(split="train", count=count, seed=seed, data_dir=data_dir, device=dev, **subject.training_split)
        images, labels = real_images(subject.info, **split)
        batches = _batches(images, labels, probes + steps, batch_size)
        models[subject.label] = _study(subject.model, batches[:probes], batches[probes:], subject.model.depth, lr=lr)
    return {"start": start, "steps": steps, "nets": [s.describe() for s in subjects], "models": models}


def _trained_twins(checkpoints: list[str], dev: torch.device) -> list[Subject]:
    """Checkpoints of plain and residual CIFAR twins, each depth both ways (the comparison needs pairs)."""
    subjects = load_subjects([], checkpoints=checkpoints, device=dev)
    names = {s.label for s in subjects}
    for s in subjects:
        twin = s.label.replace("plain", "resnet") if s.label.startswith("plain") else s.label.replace("resnet", "plain")
        if s.model.config["stem"] != "cifar" or twin not in names:
            raise ReslabError(f"--checkpoints needs CIFAR plain/ResNet twins of the same depth; {s.label} has none")
    return subjects


def _check(depths, steps: int, batch_size: int, probes: int) -> None:
    if not depths or any(d < 8 or (d - 2) % 6 for d in depths):
        raise ReslabError(f"--depths must be CIFAR depths 6n+2 (e.g. 20 56 110), not {list(depths)}")
    if steps < 0:
        raise ReslabError(f"--steps must be 0 or more, not {steps}")
    if batch_size < 2:
        raise ReslabError(f"--batch-size must be at least 2 (BatchNorm needs a batch), not {batch_size}")
    if probes < 1:
        raise ReslabError(f"--probes must be at least 1, not {probes}")


def _batch(images: Tensor, labels: Tensor, i: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """The i-th batch, wrapping around when the split is smaller than all the batches together."""
    index = torch.arange(i * batch_size, (i + 1) * batch_size, device=labels.device) % len(labels)
    return images[index], labels[index]


def _study(
    model: ResNet, probes: list[tuple[Tensor, Tensor]], training: list[tuple[Tensor, Tensor]], depth: int, *, lr: float
) -> dict[str, Any]:
    """Measure on every probe batch, train on ``training``, measure again on the probe batches."""
    init = [gradient_norms(model, *probe) for probe in probes]
    losses = _train(model, training, lr=lr)
    trained = [gradient_norms(model, *probe) for probe in probes] if training else None
    return {
        "depth": depth,
        "residual": bool(model.config["residual"]),
        "blocks": [name for name, _ in residual_blocks(model)],
        "layers": [name for name, _ in weighted_layers(model)],
        "init": init[0],
        "trained": trained[0] if trained else None,
        "init_probes": _headline(init),
        "trained_probes": _headline(trained) if trained else None,
        "train_loss": losses,
    }


def _headline(measured: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The numbers the summary states, one per probe batch."""
    return {
        "loss": [m["loss"] for m in measured],
        "stem_weight_grad": [m["stem_weight_grad"] for m in measured],
        "growth": [_growth(m) for m in measured],
        "skip_share": [_median_skip_share(m) for m in measured],
        "split_error": [m["split_error"] for m in measured],
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


def _states(group: dict[str, Any]) -> list[tuple[str, str]]:
    """The measured states of a group: (key, when) with key "init" or "trained"."""
    states = [("init", f"at {group['start']}")]
    if group["steps"]:
        states.append(("trained", f"after {group['steps']} SGD steps from {group['start']}"))
    return states


def _tag(group: dict[str, Any], key: str) -> str:
    """A legend's few words for a state: "init", "10 steps", "trained"."""
    if key == "trained":
        return f"{group['steps']} steps"
    return "init" if group["start"] == "initialization" else "trained"


def _ratio_of_paths(state: dict[str, Any]) -> list[float]:
    return [b / max(s, 1e-30) for b, s in zip(state["branch_grad"], state["skip_grad"], strict=True)]


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``gradients.png``: log-scale panels, one line per model (plain dashed, residual solid).

    Top row: block-input gradient norms in each state (fresh at initialization, after the SGD steps, the
    trained twins at their weights); bottom row: weight-gradient norms at each group's start, and each ResNet
    block's ratio of the gradient through ``F`` to the gradient through the shortcut.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    groups = list(result["groups"].values())
    top = [(group, key, when) for group in groups for key, when in _states(group)]
    columns = max(len(top), len(groups) + 1)
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for ax, (group, key, when) in zip(axes[0], top, strict=False):
        for name, m in group["models"].items():
            ax.plot(_relative_depth(len(m["blocks"])), m[key]["block_input_grad"], **line_style(group, name))
        _panel(ax, f"|dL/dx| at each block's input,\n{when}", "gradient norm")
    for ax, group in zip(axes[1], groups, strict=False):
        for name, m in group["models"].items():
            ax.plot(_relative_depth(len(m["layers"])), m["init"]["weight_grad"], **line_style(group, name))
        _panel(ax, f"|dL/dW| of each conv and fc,\nat {group['start']}", "weight-gradient norm")
    ratio_ax = axes[1, len(groups)]
    dashes = iter(["-", ":", "-.", (0, (5, 1))])  # one line style per state: fresh, after the steps, trained
    for group, (key, _) in ((g, s) for g in groups for s in _states(g)):
        linestyle, tag = next(dashes), _tag(group, key)
        for name, m in group["models"].items():
            if m["residual"]:
                style = {**line_style(group, name), "linestyle": linestyle, "label": f"{name}, {tag}"}
                ratio_ax.plot(_relative_depth(len(m["blocks"])), _ratio_of_paths(m[key]), **style)
    ratio_ax.axhline(1.0, color="gray", linewidth=0.8)
    ratio_ax.yaxis.set_major_formatter(ScalarFormatter())
    ratio_ax.yaxis.set_minor_formatter(NullFormatter())
    _panel(ratio_ax, "ResNets: |through F| / |through the shortcut|\n(He et al. 2016, eq. 5)", "ratio")
    for ax in axes.flat[len(top) : columns]:
        ax.set_visible(False)
    for ax in axes[1, len(groups) + 1 :]:
        ax.set_visible(False)
    fig.suptitle(
        f"Gradient flow, plain (dashed) vs residual (solid), {result['batch_size']} {result['dataset']} images",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(out_dir) / "gradients.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def _growth(state: dict[str, Any]) -> float:
    """How much the gradient grows from the last block's input to the first's (the stem's output)."""
    return state["block_input_grad"][0] / state["block_input_grad"][-1]


def _median_skip_share(state: dict[str, Any]) -> float:
    """The median over blocks of |through the shortcut| / |dL/dx|."""
    share = sorted(s / max(t, 1e-30) for s, t in zip(state["skip_grad"], state["block_input_grad"], strict=True))
    return share[len(share) // 2]


def _spread(values: list[float], first: float | None = None) -> str:
    """The first batch's value and the range over all batches: ``4.2e+06 [3.1e+06 .. 5e+06]``."""
    first = values[0] if first is None else first
    return f"{first:.3g}" if len(values) == 1 else f"{first:.3g} [{min(values):.3g} .. {max(values):.3g}]"


def _twins(group: dict[str, Any], depth: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plain and the residual net of ``depth`` in a group (found by what they are, not by name)."""
    found = {(m["depth"], m["residual"]): m for m in group["models"].values()}
    return found[(depth, False)], found[(depth, True)]


def _depth_line(group: dict[str, Any], key: str, when: str, depth: int) -> str:
    plain, res = _twins(group, depth)
    p, r = plain[f"{key}_probes"], res[f"{key}_probes"]
    ratio = [a / b for a, b in zip(p["stem_weight_grad"], r["stem_weight_grad"], strict=True)]  # the same batch
    return (
        f"depth {depth} {when}: stem conv1 weight gradient plain {_spread(p['stem_weight_grad'])} vs ResNet "
        f"{_spread(r['stem_weight_grad'])} (plain / ResNet {_spread(ratio)}); |dL/dx| first block / last block: "
        f"plain {_spread(p['growth'])}x, ResNet {_spread(r['growth'])}x"
    )


def summarize(result: dict[str, Any]) -> list[str]:
    """Per group and state: the stem gradients of plain vs residual per depth, the growth toward the input, the
    shortcut's share, each with its range over the probe batches; the split check; the explosion's fate."""
    groups = result["groups"]
    lines = [
        f"Gradient L2 norms (mean cross-entropy, BatchNorm in train mode) on batches of {result['batch_size']} "
        f"{result['dataset']} training images: each number on the first batch, [min .. max] over "
        f"{result['probes']} batches. Fresh plain twins start from their ResNet's seeded weights.",
        nets_studied(net for group in groups.values() for net in group["nets"]),
    ]
    for group in groups.values():
        depths = sorted({m["depth"] for m in group["models"].values()})
        for key, when in _states(group):
            lines += [_depth_line(group, key, when, d) for d in depths]
            shares = ", ".join(
                f"ResNet-{d} {_spread(_twins(group, d)[1][f'{key}_probes']['skip_share'])}" for d in depths
            )
            lines.append(f"median |through the shortcut| / |dL/dx| per block {when}: {shares}")
    states = [(g, key) for g in groups.values() for key, _ in _states(g)]
    worst = max(max(m[f"{key}_probes"]["split_error"]) for g, key in states for m in g["models"].values())
    lines.append(
        "shortcut + residual branch equals autograd's dL/dx at every block input, an exact check (largest "
        f"relative gap {worst:.1g})"
    )
    return lines + _fate(next(iter(groups.values())))


def _fate(group: dict[str, Any]) -> list[str]:
    """What happens to the deepest plain net's gradient, at its start and after the steps."""
    depth = max(m["depth"] for m in group["models"].values())
    plain, res = _twins(group, depth)
    lines = []
    for key, when in _states(group):
        growth = plain[f"{key}_probes"]["growth"]
        verb = "explodes" if min(growth) > 1 else "vanishes" if max(growth) < 1 else "neither explodes nor vanishes"
        lines.append(
            f"{when[0].upper()}{when[1:]} the plain-{depth} gradient {verb} toward the input ({_spread(growth)}x "
            f"from the last block to the first); ResNet-{depth}'s changes {_spread(res[f'{key}_probes']['growth'])}x."
        )
    if plain["trained"] is not None and group["start"] == "initialization":
        lines.append(
            f"plain-{depth}'s stem conv1 weight norm went from {plain['init']['weight_norm'][0]:.3g} to "
            f"{plain['trained']['weight_norm'][0]:.3g}: with BN after it, a conv's output ignores its weight's "
            "scale and its gradient shrinks by it."
        )
    return lines
