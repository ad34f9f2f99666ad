"""``reslab explain block``: one residual block, step by step.

Three claims of residual learning, measured on one block of reslab's own classes (fresh, or a block of a trained
net, shipped or a checkpoint, fed with the activations real test images give it):

- forward: ``y = merge(F(x), shortcut(x))``, with the statistics of each tensor;
- BatchNorm: train mode normalizes with the batch mean and the biased batch variance, and moves the running
  statistics by ``momentum = 0.1`` towards the batch's (variance made unbiased, times ``n / (n - 1)``); eval
  mode uses the running ones. How far the two outputs are apart, and how warming the running stats closes it
  (measured in ``block_batchnorm``);
- backward: ``dL/dx = dL/dx|identity + dL/dx|residual`` (He et al. 2016, eq. 5: the gradient reaching x through
  the shortcut is dL/dy itself when nothing follows the sum, as in v2), against autograd, and against the same
  block without its shortcut (measured in ``block_backward``).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.block_backward import backward, plain
from reslab.explain.block_batchnorm import batchnorm
from reslab.explain.common import Subject, device_of, load_subject, load_subjects, real_images, residual_blocks
from reslab.explain.options import declare
from reslab.models.blocks import BLOCKS

# `reslab explain block`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "one residual block step by step: forward, BatchNorm train vs eval, backward through both paths"
OPTIONS = declare(
    "--checkpoint",
    "--data-dir",
    block=dict(choices=("basic", "bottleneck"), default="bottleneck"),
    version=dict(choices=("v1", "v2"), default="v1", help="v1: ReLU after the sum; v2: pre-activation"),
    shape=dict(
        nargs=4,
        type=int,
        default=None,
        metavar=("N", "C", "H", "W"),
        help="input shape (default: 8 256 56 56 for a bottleneck, 8 64 56 56 for a basic block)",
    ),
    model=dict(default=None, help="the shipped trained net whose block to study (default with --block-name: resnet56)"),
    block_name=dict(
        default=None,
        help="a trained net's block, e.g. layer2.0: of --checkpoint, or of the shipped --model (default: the first)",
    ),
)

DEFAULT_SHAPES = {"bottleneck": (8, 256, 56, 56), "basic": (8, 64, 56, 56)}  # the notes' example for a bottleneck
CHECKPOINT_IMAGES = 64  # real test images whose activations feed a trained block
SHIPPED_MODEL = "resnet56"  # the shipped trained net whose block --block-name picks without --checkpoint
EXACT = (
    "none to estimate: these are exact numerical checks on fixed tensors (the differences are float32 rounding); "
    "the statistics of x, F(x) and y are of that one batch"
)
HIST_BINS = 60


def measure(
    *,
    block: str = "bottleneck",
    version: str = "v1",
    shape: list[int] | tuple[int, ...] | None = None,
    checkpoint: str | None = None,
    model: str | None = None,
    block_name: str | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Forward, BatchNorm train vs eval, and backward through both paths of one block.

    Args:
        block, version: a fresh ``"basic"`` or ``"bottleneck"`` block, ``"v1"`` (ReLU after the sum) or
            ``"v2"`` (pre-activation). Ignored for a trained net's block: it is what it is.
        shape: a fresh block's input (N, C, H, W); default (8, 256, 56, 56) for a bottleneck (planes C / 4,
            so the shortcut is the identity), (8, 64, 56, 56) for a basic block.
        checkpoint, block_name: a trained model and which of its blocks (default the first, e.g. ``layer1.0``).
        model: without ``checkpoint``, the shipped trained net whose block to study (default ``resnet56``
            when ``block_name`` is given; neither: a fresh block).
        dataset: unused (a fresh block gets random input; a trained net names its own dataset).
        data_dir: where the trained net's dataset is looked for.
    """
    dev = device_of(device)
    if checkpoint is None and model is None and block_name is None:
        blk, x, about, draw = _fresh_block(block, version, shape, seed, dev)
    else:
        if shape is not None:
            raise ReslabError("--shape is for a fresh block; a trained net's block gets its input from real images")
        if checkpoint is not None and model is not None:
            raise ReslabError("--checkpoint and --model exclude each other: each names the trained net")
        if checkpoint is not None:
            subject = load_subject(checkpoint=checkpoint, device=dev)
        else:
            (subject,) = load_subjects([model or SHIPPED_MODEL], dataset=dataset, device=dev)
        blk, x, about = _trained_block(subject, block_name, data_dir, seed, dev)
        draw = None
    with torch.no_grad():  # in eval mode: a train-mode pass would move the running statistics before they are read
        out_shape = copy.deepcopy(blk).eval()(x).shape
    r = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 1)).to(dev)
    through_paths = backward(copy.deepcopy(blk), x, r)
    return {
        **about,
        "shape": list(x.shape),
        "uncertainty": EXACT,
        "forward": _forward(copy.deepcopy(blk), x),
        "batchnorm": batchnorm(copy.deepcopy(blk), x, draw),
        "backward": through_paths,
        "plain": plain(copy.deepcopy(blk), x, r, through_paths),
    }


def _fresh_block(
    block: str, version: str, shape, seed: int, dev: torch.device
) -> tuple[nn.Module, Tensor, dict, Callable[[], Tensor]]:
    if block not in ("basic", "bottleneck"):
        raise ReslabError(f"--block must be basic or bottleneck, not {block!r}")
    if version not in ("v1", "v1.5", "v2"):
        raise ReslabError(f"--version must be v1, v1.5 or v2, not {version!r}")
    shape = tuple(int(s) for s in (shape or DEFAULT_SHAPES[block]))
    if len(shape) != 4 or min(shape) < 1 or shape[0] * shape[2] * shape[3] < 2:
        raise ReslabError(f"--shape must be N C H W with N*H*W >= 2 (BatchNorm needs two values), not {list(shape)}")
    if block == "bottleneck" and shape[1] % 4:
        raise ReslabError(f"a bottleneck's channels must be a multiple of 4 (planes = C / 4), not {shape[1]}")
    planes = shape[1] // 4 if block == "bottleneck" else shape[1]
    torch.manual_seed(seed)
    blk = BLOCKS[(block, version == "v2")](in_channels=shape[1], planes=planes, stride_in_1x1=version == "v1")
    _he_init(blk)
    gen = torch.Generator().manual_seed(seed)

    def draw() -> Tensor:  # another batch from the same distribution as x
        return torch.randn(shape, generator=gen).to(dev)

    about = dict(
        block=block,
        version=version,
        kind=type(blk).__name__,
        source=f"fresh (seed {seed})",
        weights="fresh",
        block_name=None,
        input="x ~ N(0, 1), random",
        shortcut="identity",
    )
    return blk.to(dev), draw(), about, draw


def _he_init(blk: nn.Module) -> None:
    # The same initialization ResNet gives its blocks (reslab.models.resnet._init_weights).
    for m in blk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _trained_block(
    subject: Subject, block_name: str | None, data_dir, seed: int, dev
) -> tuple[nn.Module, Tensor, dict]:
    """A copy of ``subject``'s block ``block_name`` (default the first) and its input on real test images."""
    blocks = dict(residual_blocks(subject.model))
    name = block_name or next(iter(blocks))
    if name not in blocks:
        raise ReslabError(f"no block {name!r} in {subject.label}; its blocks are {', '.join(blocks)}")
    blk = blocks[name]
    if not blk.residual:
        raise ReslabError(f"{subject.label} is a plain network: its blocks have no shortcut; pass a ResNet")
    captured: list[Tensor] = []
    hook = blk.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    images, _ = real_images(subject.info, count=CHECKPOINT_IMAGES, seed=seed, data_dir=data_dir, device=dev)
    try:
        with torch.no_grad():
            subject.model.eval()(images)
    finally:
        hook.remove()
    config = subject.model.config
    about = dict(
        block=config["block"],
        version=config["version"],
        kind=type(blk).__name__,
        source=f"{subject.label}, {subject.source}" if subject.kind == "shipped" else subject.source,
        weights=subject.kind,
        block_name=name,
        input=f"its input on {len(images)} real {subject.info.name} test images (eval mode)",
        shortcut="identity" if blk.downsample is None else repr(blk.downsample).replace("\n", ""),
    )
    blk = copy.deepcopy(blk)
    # Stochastic depth would draw a new mask in each of the train-mode passes compared below; the block as it
    # infers (and as it trains, on average) has none.
    blk.drop_path = nn.Identity()
    return blk, captured[0], about


def _stats(t: Tensor) -> dict[str, Any]:
    t = t.detach().float()
    return {
        "shape": list(t.shape),
        "mean": float(t.mean()),
        "std": float(t.std()),
        "min": float(t.min()),
        "max": float(t.max()),
        "frac_zero": float((t == 0).float().mean()),
    }


def _forward(blk: nn.Module, x: Tensor) -> dict[str, Any]:
    """Statistics of x, F(x), shortcut(x) and y, in train mode (as in training), and their histograms."""
    with torch.no_grad():
        branch, identity = blk.train().paths(x)
        y = blk.merge(branch, identity)  # (N, C_out, H_out, W_out)
    parts = {"x": x, "F(x)": branch, "shortcut(x)": identity, "y": y}
    lo = min(float(t.min()) for t in (x, branch, y))
    hi = max(float(t.max()) for t in (x, branch, y))
    hist = {k: torch.histc(t.float(), HIST_BINS, lo, hi).tolist() for k, t in parts.items() if k != "shortcut(x)"}
    return {
        "mode": "train",
        "stats": {k: _stats(t) for k, t in parts.items()},
        "branch_to_shortcut_norm": float(branch.norm() / identity.norm()),  # how much the block changes x
        "histogram": {"edges": torch.linspace(lo, hi, HIST_BINS + 1).tolist(), **hist},
    }


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """One figure: histograms, gradient norms per path, BN train-vs-eval gap over warm-up, BN output std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    _plot_histograms(axes[0, 0], result["forward"]["histogram"])
    _plot_gradients(axes[0, 1], result)
    _plot_warmup(axes[1, 0], result["batchnorm"])
    _plot_norm_std(axes[1, 1], result["batchnorm"])
    fig.suptitle(f"{_title(result)}, input {result['shape']}", fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / "block.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def _title(result: dict[str, Any]) -> str:
    where = f" {result['block_name']} of {result['source']}" if result["block_name"] else f", {result['source']}"
    return f"{result['kind']} {result['version']}{where}"


def _plot_histograms(ax, hist: dict[str, list[float]]) -> None:
    edges = hist["edges"]
    centers = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    for key in ("x", "F(x)", "y"):
        ax.step(centers, [max(c, 0.5) for c in hist[key]], where="mid", label=key)
    ax.set(yscale="log", xlabel="value", ylabel="count", title="forward (train mode): x, F(x), y")
    ax.legend()


def _plot_gradients(ax, result: dict[str, Any]) -> None:
    norms, plain = result["backward"]["norms"], result["plain"]
    labels = ["dL/dy", "through\nidentity", "through\nF", "dL/dx\n(sum)", "dL/dx\nno shortcut"]
    values = [norms["dL/dy"], norms["via_identity"], norms["via_residual"], norms["dL/dx"], plain["dL/dx_norm"]]
    bars = ax.bar(labels, values, color=["grey", "tab:blue", "tab:orange", "tab:green", "tab:red"])
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set(ylabel="L2 norm", title=f"backward: {result['backward']['loss']}")
    ax.title.set_fontsize(9)


def _plot_warmup(ax, bn: dict[str, Any]) -> None:
    rows = bn["warmup"]
    ax.plot([r["passes"] for r in rows], [r["rel_gap"] for r in rows], marker="o")
    ax.set(
        xlabel="train-mode passes (running stats warmed)",
        ylabel="|y_eval - y_train| / |y_train|",
        title="block output: eval mode vs train mode",
        yscale="log",
    )
    ax.grid(alpha=0.3)


def _plot_norm_std(ax, bn: dict[str, Any]) -> None:
    names = list(bn["out_std"])
    pos = range(len(names))
    modes = [("train", "train mode (batch stats)"), ("eval", "eval mode, start running stats")]
    if bn["out_std"][names[0]]["eval_warm"] is not None:
        modes.append(("eval_warm", f"eval mode after {bn['warmup'][-1]['passes']} warm passes"))
    width = 0.8 / len(modes)
    for i, (key, label) in enumerate(modes):
        ax.bar([p + i * width for p in pos], [bn["out_std"][n][key] for n in names], width, label=label)
    ax.set_xticks([p + width * (len(modes) - 1) / 2 for p in pos], names)
    ax.set(ylabel="std of the BN output (mean over channels)", title="each BatchNorm: does it normalize?")
    ax.legend(fontsize=8)


def summarize(result: dict[str, Any]) -> list[str]:
    """Six lines: forward, BN by hand, BN train vs eval, backward through both paths, no-shortcut contrast, and
    what the numbers' uncertainty is."""
    return [
        _summary_forward(result),
        _summary_bn(result["batchnorm"]),
        _summary_gap(result),
        _summary_backward(result),
        _summary_plain(result),
        f"Uncertainty: {result['uncertainty']}.",
    ]


def _summary_forward(result: dict[str, Any]) -> str:
    s, ratio = result["forward"]["stats"], result["forward"]["branch_to_shortcut_norm"]
    join = "relu(F(x) + shortcut(x))" if result["backward"]["relu_after_sum"] else "F(x) + shortcut(x)"
    return (
        f"{_title(result)}, input {result['input']}, {s['x']['shape']} -> {s['y']['shape']}, train mode: "
        f"std of x {s['x']['std']:.3g}, F(x) {s['F(x)']['std']:.3g}, y = {join} {s['y']['std']:.3g} "
        f"({100 * s['y']['frac_zero']:.0f}% zeros); |F(x)| / |shortcut(x)| = {ratio:.3g}."
    )


def _summary_bn(bn: dict[str, Any]) -> str:
    n = bn["values_per_channel"]
    running = max(bn["max_diff_running_mean"], bn["max_diff_running_var"])
    return (
        f"BatchNorm {bn['name']} in train mode = gamma * (z - batch mean) / sqrt(biased batch var + eps) + beta "
        f"to {bn['max_diff_hand_biased']:.1e} (with the unbiased variance: {bn['max_diff_hand_unbiased']:.1e} off); "
        f"running stats = 0.9 * old + 0.1 * batch, the variance times n/(n-1) = {n}/{n - 1}, to {running:.1e}."
    )


def _summary_gap(result: dict[str, Any]) -> str:
    bn = result["batchnorm"]
    rows = bn["warmup"]
    stds = ", ".join(f"{name} {v['eval']:.3g}" for name, v in bn["out_std"].items())
    first = f"Block output in eval vs train mode differs by {100 * rows[0]['rel_gap']:.1f}% (relative L2)"
    if len(rows) == 1:
        return first + f" with the checkpoint's running stats (BN output std in eval mode: {stds}; train mode ~1)."
    k, gap = rows[-1]["passes"], 100 * rows[-1]["rel_gap"]
    return (
        first + ": fresh running stats are mean 0, var 1, the data's are not, so in eval mode the BN outputs have "
        f"std {stds} instead of ~1. Each train pass moves them 10% towards the batch's; after {k} passes "
        f"(0.9^{k} = {0.9**k:.2f} of the start left) the gap is {gap:.1f}%."
    )


def _summary_backward(result: dict[str, Any]) -> str:
    b = result["backward"]
    n = b["norms"]
    line = (
        f"Backward, {b['loss']}: |dL/dy| {n['dL/dy']:.4g}, through the identity {n['via_identity']:.4g}, "
        f"through F {n['via_residual']:.4g}; their sum vs autograd's dL/dx: max diff "
        f"{b['max_diff_sum_vs_autograd']:.1e} (float32; {b['max_abs_dL/dx']:.3g} the largest entry)."
    )
    if not b["identity_is_x"]:
        return line + " The shortcut is not the identity here: its path carries its adjoint of dL/d(sum)."
    if not b["relu_after_sum"]:
        return line + f" No ReLU after the sum: identity-path gradient == dL/dy exactly: {b['identity_equals_dL_dy']}."
    return line + (
        f" ReLU after the sum: it is dL/dy masked by that ReLU (exactly: {b['identity_equals_masked_dL_dy']}), "
        f"{100 * b['frac_masked_by_relu']:.0f}% of entries zeroed."
    )


def _summary_plain(result: dict[str, Any]) -> str:
    p = result["plain"]
    return (
        f"The same weights without the shortcut: |dL/dx| = {p['dL/dx_norm']:.4g} ({p['gain']:.3g} x |dL/dy|) against "
        f"{p['residual_dL/dx_norm']:.4g} ({p['residual_gain']:.3g} x) with it."
    )
