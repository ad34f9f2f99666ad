"""How strongly each layer responds, plain vs residual: He et al. 2015, Sec. 4.2 and Fig. 7.

"The responses are the outputs of each 3x3 layer, after BN and before other nonlinearity (ReLU/addition)."
The paper finds that "ResNets have generally smaller responses than their plain counterparts", which supports
its motivation that residual functions are closer to zero than non-residual ones, and that "the deeper ResNet
has smaller magnitudes of responses": an individual layer of a deeper ResNet modifies the signal less.

Measured on real test images in eval mode (BatchNorm with its running statistics, as at inference). In a v1
basic block the responses are ``bn1``'s output (before its ReLU) and ``bn2``'s (before the sum). The std of a
response is taken over all its elements (images x channels x positions), one number per layer as in Fig. 7;
``std_per_channel`` keeps the mean over channels of each channel's std as well, which leaves out how far the
channels' means lie apart. The stem's 3x3 conv is left out: it is the same layer in both nets.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import DEFAULT_RUNS_DIR, device_of, line_style, load_subjects, real_images, residual_blocks

DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56")  # Fig. 7 shows these (and ResNet-110)
BATCH = 250  # images per forward pass; the statistics are exact whatever the batch (see _Moments)


def measure(
    *,
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    checkpoints: list[str] | None = None,
    runs_dir: str | None = DEFAULT_RUNS_DIR,
    images: int = 1000,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """The std of every 3x3 layer's response of each model on ``images`` test images chosen by ``seed``.

    Models are ``checkpoints`` when given, else ``<runs_dir>/<name>/best.pt`` for each of ``models`` where it
    exists, else fresh seeded models (``common.load_subjects``). Returns ``{"models": {label: {"source",
    "trained", "depth", "residual", "layers", "std", "std_sorted", "std_per_channel"}}, ...}``, the lists in
    depth order except ``std_sorted`` (descending).
    """
    if images < 2:
        raise ReslabError(f"--images must be at least 2 (a std needs two samples), not {images}")
    dev = device_of(device)
    subjects = load_subjects(
        list(models),
        checkpoints=checkpoints,
        runs_dir=runs_dir,
        dataset=dataset,
        data_dir=data_dir,
        seed=seed,
        device=dev,
    )
    result: dict[str, Any] = {}
    for subject in subjects:
        x, _ = real_images(subject.info, split="test", count=images, seed=seed, data_dir=data_dir, device=dev)
        names, std, per_channel = _responses(subject.model, x)
        label = subject.label if subject.label not in result else f"{subject.label} ({subject.source})"
        result[label] = {
            "source": subject.source,
            "trained": subject.trained,
            "dataset": subject.info.name,
            "images": len(x),
            "depth": subject.model.depth,
            "residual": bool(subject.model.config["residual"]),
            "layers": names,
            "std": std,
            "std_sorted": sorted(std, reverse=True),
            "std_per_channel": per_channel,
        }
    return {
        "definition": "std over all elements (images x channels x positions) of each BN output that follows a "
        "3x3 conv in a block, before the ReLU and the sum; eval mode",
        "seed": seed,
        "models": result,
    }


def _response_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The module whose output is each 3x3 layer's response, in depth order, with its name (``layer1.0.bn1``).

    v1 (post-activation): the BN after each 3x3 conv (``conv2`` -> ``bn2``). v2 (pre-activation) has no BN
    between a conv and the next ReLU or sum, so there the response is the 3x3 conv's own output.
    """
    layers = []
    for block_name, block in residual_blocks(model):
        for name, conv in block.named_children():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                name = name if block.preact else name.replace("conv", "bn")
                layers.append((f"{block_name}.{name}", getattr(block, name)))
    return layers


class _Moments:
    """Each channel's count, mean and sum of squared deviations, merged batch by batch (Chan et al. 1979).

    One float32 pass per batch (``torch.var_mean``); the merge is in float64, exact for any batch split. The
    statistics over all elements follow from the channels' (every channel has the same count).
    """

    def __init__(self) -> None:
        self.count = 0  # elements per channel so far
        self.mean = self.m2 = torch.zeros((), dtype=torch.float64)

    def add(self, response: Tensor) -> None:
        """(B, C, H, W) response of one batch."""
        per_channel = (0, *range(2, response.ndim))
        var, mean = torch.var_mean(response.detach(), dim=per_channel, correction=0)
        n = response.numel() // response.shape[1]
        mean, m2 = mean.cpu().double(), var.cpu().double() * n  # MPS has no float64
        delta = mean - self.mean
        total = self.count + n
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.count = total

    def std(self) -> float:
        """Over all elements, unbiased (as ``torch.std``)."""
        overall_mean = self.mean.mean()
        m2 = self.m2.sum() + self.count * ((self.mean - overall_mean) ** 2).sum()
        return (m2 / (self.count * self.mean.numel() - 1)).sqrt().item()

    def std_per_channel(self) -> float:
        """Each channel's std over images and positions (unbiased), averaged over the channels."""
        return (self.m2 / (self.count - 1)).sqrt().mean().item()


@torch.no_grad()
def _responses(model: nn.Module, x: Tensor) -> tuple[list[str], list[float], list[float]]:
    """Eval-mode responses of ``model`` to (N, C, H, W) images ``x``: layer names, std, std per channel.

    The statistics are taken inside a forward hook, before the ReLU that follows (in place) can change them.
    """
    model.eval()  # BatchNorm with its running statistics, which stay as they are
    layers = _response_layers(model)
    moments = [_Moments() for _ in layers]
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, acc=acc: acc.add(out))
        for (_, module), acc in zip(layers, moments, strict=True)
    ]
    try:
        for batch in x.split(BATCH):
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name, _ in layers], [m.std() for m in moments], [m.std_per_channel() for m in moments]


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``responses.png``: std by layer index (top) and sorted by magnitude (bottom), as in Fig. 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_layer, by_size) = plt.subplots(2, 1, figsize=(8, 7))
    for label, m in result["models"].items():
        style = line_style(result, label)
        index = range(1, len(m["std"]) + 1)
        by_layer.plot(index, m["std"], marker=".", markersize=3, **style)
        by_size.plot(index, m["std_sorted"], marker=".", markersize=3, **style)
    by_layer.set_xlabel("layer index (original)")
    by_size.set_xlabel("layer index (sorted by magnitude)")
    stds = [v for m in result["models"].values() for v in m["std"]]
    for ax in (by_layer, by_size):
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if max(stds) > 50 * max(min(stds), 1e-12):  # the paper's linear axis would flatten all but one line
            ax.set_yscale("log")
    fresh = [label for label, m in result["models"].items() if not m["trained"]]
    note = f"\nfresh, untrained models: {', '.join(fresh)}" if fresh else ""
    by_layer.set_title(f"Std of each 3x3 layer's response, after BN, before ReLU / sum{note}", fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / "responses.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(result: dict[str, Any]) -> list[str]:
    """Mean std per model, and whether the paper's two claims hold for these numbers."""
    models = result["models"]
    first = next(iter(models.values()))
    lines = [
        f"Std of each 3x3 layer's response on {first['images']} {first['dataset']} test images "
        "(He et al. 2015, Fig. 7): " + result["definition"] + ".",
        "The paper: ResNets respond less than their plain counterparts, and deeper ResNets less still.",
    ]
    for label, m in models.items():
        source = f"trained, {m['source']}" if m["trained"] else m["source"]
        lines.append(
            f"{label} ({source}): {len(m['std'])} layers, mean std {_mean(m['std']):.3f} "
            f"(per channel {_mean(m['std_per_channel']):.3f}), largest {m['std_sorted'][0]:.3f}"
        )
    lines += _verdicts(models)
    if not all(m["trained"] for m in models.values()):
        lines.append(
            "Untrained models have their initial BN running statistics (mean 0, variance 1), so their numbers do "
            "not test the claim; train them first (reslab explain degradation)."
        )
    return lines


def _verdicts(models: dict[str, Any]) -> list[str]:
    """Residual vs plain at each depth present in both, and ResNets against each other by depth."""
    mean = {label: _mean(m["std"]) for label, m in models.items()}
    by_kind: dict[bool, dict[int, str]] = {True: {}, False: {}}
    for label, m in models.items():
        by_kind[m["residual"]].setdefault(m["depth"], label)
    lines = []
    for depth in sorted(set(by_kind[True]) & set(by_kind[False])):
        res, plain = by_kind[True][depth], by_kind[False][depth]
        verdict = "agrees" if mean[res] < mean[plain] else "disagrees"
        lines.append(f"depth {depth}: {res} mean std {mean[res]:.3f} vs {plain} {mean[plain]:.3f}: {verdict}")
    resnets = [by_kind[True][d] for d in sorted(by_kind[True])]
    if len(resnets) > 1:
        falling = all(mean[a] > mean[b] for a, b in pairwise(resnets))
        chain = ", ".join(f"{label} {mean[label]:.3f}" for label in resnets)
        lines.append(f"deeper ResNets respond less ({chain}): {'agrees' if falling else 'disagrees'}")
    return lines
