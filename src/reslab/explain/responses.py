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
from reslab.explain.common import (
    channels_last,
    device_of,
    line_style,
    load_subjects,
    nets_studied,
    real_images,
    residual_blocks,
)
from reslab.explain.options import NETS_AND_IMAGES, declare

# `reslab explain responses`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "std of each 3x3 layer's response, plain vs residual (He et al. 2015, Fig. 7)"
OPTIONS = declare(*NETS_AND_IMAGES)

DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56")  # Fig. 7 shows these (and ResNet-110)
BATCH = 250  # images per forward pass; the statistics are exact whatever the batch (see _Moments)
# Test images: a net's mean std then has a bootstrap standard error of 0.3-2.3% of it (measured on the shipped
# nets), several times below the gaps compared; the four nets took 32 s on a busy 2-core CPU, one thread.
DEFAULT_IMAGES = 2000
RESAMPLES = 1000  # bootstrap resamples: a 95% interval's ends then carry a Monte Carlo error of ~0.1 standard error


def measure(
    *,
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    checkpoints: list[str] | None = None,
    runs_dir: str | None = None,
    fresh: bool = False,
    images: int = DEFAULT_IMAGES,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """The std of every 3x3 layer's response of each model on ``images`` test images chosen by ``seed``, with a
    bootstrap over the images for its uncertainty.

    Models are ``checkpoints`` when given, else ``<runs_dir>/<name>/best.pt`` for each of ``models``, else fresh
    seeded models (``fresh``), else the shipped trained ones (``common.load_subjects``). Returns
    ``{"models": {label: {"source", "trained", "depth", "residual", "layers", "std", "std_se", "std_sorted",
    "std_per_channel", "mean_std", "mean_std_se", "mean_std_interval"}}, "comparisons": [...], ...}``, the
    lists in depth order except ``std_sorted`` (descending). ``comparisons``: the paper's pairs (residual vs
    plain of a depth, ResNets by depth), each difference of mean stds with its paired bootstrap interval.
    """
    if images < 2:
        raise ReslabError(f"--images must be at least 2 (a std needs two samples), not {images}")
    dev = device_of(device)
    subjects = load_subjects(
        list(models),
        checkpoints=checkpoints,
        runs_dir=runs_dir,
        fresh=fresh,
        dataset=dataset,
        data_dir=data_dir,
        seed=seed,
        device=dev,
    )
    result: dict[str, Any] = {}
    replicates: dict[str, Tensor] = {}  # label -> (RESAMPLES,) mean std of each bootstrap resample
    for subject in subjects:
        x, _ = real_images(subject.info, split="test", count=images, seed=seed, data_dir=data_dir, device=dev)
        model, x = channels_last(subject.model, x)
        names, moments = _responses(model, x)
        label = subject.label if subject.label not in result else f"{subject.label} ({subject.source})"
        result[label], replicates[label] = _numbers(subject, names, moments, seed)
    return {
        "definition": "std over all elements (images x channels x positions) of each BN output that follows a "
        "3x3 conv in a block, before the ReLU and the sum; eval mode",
        "uncertainty": f"bootstrap over the test images ({RESAMPLES} resamples, seeded; the same resamples for "
        "every net, so a difference between two nets on the same images is paired): standard error and the "
        "2.5-97.5 percentile interval",
        "seed": seed,
        "models": result,
        "comparisons": _comparisons(result, replicates),
    }


def _numbers(subject, names: list[str], moments: list[_Moments], seed: int) -> tuple[dict[str, Any], Tensor]:
    """One net's entry of ``measure``'s result, and its bootstrap replicates of the mean std over layers."""
    n = moments[0].images
    resamples = torch.randint(n, (RESAMPLES, n), generator=torch.Generator().manual_seed(seed))
    std = [m.std() for m in moments]
    boot = torch.stack([m.std(resamples) for m in moments])  # (layers, RESAMPLES)
    mean_boot = boot.mean(0)
    low, high = torch.quantile(mean_boot, torch.tensor([0.025, 0.975], dtype=mean_boot.dtype)).tolist()
    numbers = {
        **subject.describe(),
        "dataset": subject.info.name,
        "images": n,
        "depth": subject.model.depth,
        "residual": bool(subject.model.config["residual"]),
        "layers": names,
        "std": std,
        "std_se": boot.std(1).tolist(),
        "std_sorted": sorted(std, reverse=True),
        "std_per_channel": [m.std_per_channel() for m in moments],
        "mean_std": sum(std) / len(std),
        "mean_std_se": mean_boot.std().item(),
        "mean_std_interval": [low, high],
    }
    return numbers, mean_boot


def _pairs(models: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The paper's comparisons among ``models``: (first, second, claim that first < second)."""
    by_kind: dict[bool, dict[int, str]] = {True: {}, False: {}}
    for label, m in models.items():
        by_kind[m["residual"]].setdefault(m["depth"], label)
    pairs = [
        (by_kind[True][d], by_kind[False][d], f"depth {d}: ResNet responds less than plain")
        for d in sorted(set(by_kind[True]) & set(by_kind[False]))
    ]
    resnets = [by_kind[True][d] for d in sorted(by_kind[True])]
    pairs += [(deep, shallow, "the deeper ResNet responds less") for shallow, deep in pairwise(resnets)]
    return pairs


def _comparisons(models: dict[str, Any], replicates: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Each pair's difference of mean stds (first - second; the paper's claim: below 0) with its bootstrap
    standard error and 95% interval. Paired when both nets saw the same images (the same seed and count)."""
    out = []
    for first, second, claim in _pairs(models):
        diff = replicates[first] - replicates[second]
        low, high = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=diff.dtype)).tolist()
        value = models[first]["mean_std"] - models[second]["mean_std"]
        verdict = "agrees" if high < 0 else "disagrees" if low > 0 else "within the uncertainty"
        numbers = {"difference": value, "se": diff.std().item(), "interval": [low, high], "verdict": verdict}
        out.append({"first": first, "second": second, "claim": claim, **numbers})
    return out


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
    """Per image and channel, the mean and sum of squared deviations of a layer's response (float64).

    From these the std over all elements follows exactly for any set of images, with repeats (a bootstrap
    resample), by Chan et al.'s (1979) merge of groups: one float32 pass per batch (``torch.var_mean``).
    """

    def __init__(self) -> None:
        self.means: list[Tensor] = []  # (B, C) per batch
        self.m2s: list[Tensor] = []
        self.per_image = 0  # elements per image and channel (H * W)
        self.channels = 0

    def add(self, response: Tensor) -> None:
        """(B, C, H, W) response of one batch."""
        var, mean = torch.var_mean(response.detach(), dim=(2, 3), correction=0)
        self.per_image, self.channels = response.shape[2] * response.shape[3], response.shape[1]
        self.means.append(mean.cpu().double())  # MPS has no float64
        self.m2s.append(var.cpu().double() * self.per_image)

    @property
    def images(self) -> int:
        return sum(len(m) for m in self.means)

    def _image_moments(self) -> tuple[Tensor, Tensor]:
        """Each image's mean (N,) and sum of squared deviations (N,) over its channels and positions."""
        mean, m2 = torch.cat(self.means), torch.cat(self.m2s)  # (N, C)
        image_mean = mean.mean(1)
        return image_mean, m2.sum(1) + self.per_image * ((mean - image_mean[:, None]) ** 2).sum(1)

    def std(self, resamples: Tensor | None = None) -> Any:
        """Over all elements, unbiased (as ``torch.std``): a float, or (R,) for (R, N) image indices."""
        mean, m2 = self._image_moments()
        if resamples is not None:
            mean, m2 = mean[resamples], m2[resamples]  # (R, N)
        per_image = self.per_image * self.channels  # elements per image
        overall = mean.mean(-1, keepdim=True)
        total = m2.sum(-1) + per_image * ((mean - overall) ** 2).sum(-1)
        std = (total / (per_image * mean.shape[-1] - 1)).sqrt()
        return std if resamples is not None else std.item()

    def std_per_channel(self) -> float:
        """Each channel's std over images and positions (unbiased), averaged over the channels."""
        mean, m2 = torch.cat(self.means), torch.cat(self.m2s)  # (N, C)
        overall = mean.mean(0)
        total = m2.sum(0) + self.per_image * ((mean - overall) ** 2).sum(0)
        return (total / (self.per_image * len(mean) - 1)).sqrt().mean().item()


@torch.no_grad()
def _responses(model: nn.Module, x: Tensor) -> tuple[list[str], list[_Moments]]:
    """Eval-mode responses of ``model`` to (N, C, H, W) images ``x``: layer names and their moments.

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
    return [name for name, _ in layers], moments


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``responses.png``: std by layer index (top, shaded: 95% bootstrap band) and sorted by magnitude
    (bottom), as in Fig. 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_layer, by_size) = plt.subplots(2, 1, figsize=(8, 7))
    for label, m in result["models"].items():
        style = line_style(result, label)
        index = range(1, len(m["std"]) + 1)
        by_layer.plot(index, m["std"], marker=".", markersize=3, **style)
        low = [s - 1.96 * e for s, e in zip(m["std"], m["std_se"], strict=True)]
        high = [s + 1.96 * e for s, e in zip(m["std"], m["std_se"], strict=True)]
        by_layer.fill_between(index, low, high, color=style["color"], alpha=0.25, lw=0)
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


def summarize(result: dict[str, Any]) -> list[str]:
    """Mean std per model with its uncertainty, and whether the paper's two claims hold for these numbers."""
    models = result["models"]
    first = next(iter(models.values()))
    lines = [
        f"Std of each 3x3 layer's response on {first['images']} {first['dataset']} test images "
        "(He et al. 2015, Fig. 7): " + result["definition"] + ". +- one standard error, [95% interval], from a "
        "bootstrap over the images.",
        nets_studied(models.values()),
        "The paper: ResNets respond less than their plain counterparts, and deeper ResNets less still.",
    ]
    for label, m in models.items():
        low, high = m["mean_std_interval"]
        lines.append(
            f"{label}: {len(m['std'])} layers, mean std {m['mean_std']:.3f} +- {m['mean_std_se']:.3f} "
            f"[{low:.3f}, {high:.3f}] (per channel {_mean(m['std_per_channel']):.3f}), largest {m['std_sorted'][0]:.3f}"
        )
    for c in result["comparisons"]:
        low, high = c["interval"]
        lines.append(
            f"{c['claim']}: {c['first']} - {c['second']} = {c['difference']:+.3f} +- {c['se']:.3f} "
            f"[{low:+.3f}, {high:+.3f}]: {c['verdict']}"
        )
    if not all(m["trained"] for m in models.values()):
        lines.append(
            "Untrained models have their initial BN running statistics (mean 0, variance 1), so their numbers do "
            "not test the claim; leave out --fresh to study the shipped trained nets."
        )
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
