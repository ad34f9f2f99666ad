"""``reslab explain backprop``: the backward pass of every layer of a ResNet, written out by hand.

Convolution, BatchNorm in train mode, ReLU, the residual sum and the linear classifier with softmax
cross-entropy, each as plain tensor formulas in float64, then a whole basic block chained from those pieces.
Each is checked against autograd on the same tensors. The notes' chain rules stop at ``dL/dx = dL/dy * dy/dx``;
these are the inner terms (BatchNorm's follows Ioffe & Szegedy 2015, Sec. 3, simplified).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import ReslabError
from reslab.explain.common import device_of, load_subject, real_images
from reslab.explain.options import declare
from reslab.models.blocks import BasicBlock

# `reslab explain backprop`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "conv, BatchNorm, ReLU, residual sum and classifier backward by hand, checked against autograd"
OPTIONS = declare("--checkpoint", "--data-dir")

TOLERANCE = 1e-5  # the bar for float64; the measured differences are ~1e-15
EXACT = "none to estimate: each line is an exact numerical check of a formula against autograd on fixed tensors"
CHECKPOINT_IMAGES = 8  # a few real images: enough for BatchNorm's batch statistics
DTYPE = torch.float64

FORMULAS = {
    "conv2d": "y = conv2d(x, W), stride s, no bias. dW[o,c,i,j] = sum_{n,p,q} dy[n,o,p,q] x_pad[n,c,s*p+i,s*q+j] "
    "(the correlation of x with dy: unfold(x) @ dy); dx = the transposed convolution of dy with W "
    "(each dy[n,o,p,q] * W[o] added back over its receptive field: fold(W^T @ dy))",
    "batchnorm": "x_hat = (x - mean) / sigma, sigma = sqrt(var + eps), mean and biased var over (N, H, W); "
    "y = gamma x_hat + beta. dgamma = sum(dy x_hat), dbeta = sum(dy), "
    "dx = (gamma / sigma) (dy - mean(dy) - x_hat mean(dy x_hat)), sums and means over (N, H, W)",
    "relu": "y = max(x, 0). dx = dy * (x > 0)",
    "residual sum": "y = a + b. da = dy, db = dy: the gradient is copied to both inputs, not split",
    "linear + cross-entropy": "logits = h W^T + b, L = mean_n -log softmax(logits_n)[label_n]. "
    "dlogits = (softmax(logits) - onehot) / N, dW = dlogits^T h, db = sum_n dlogits, dh = dlogits W",
    "basic block": "y = relu(bn2(conv2(relu(bn1(conv1(x))))) + x), chained from the pieces above: "
    "ds = dy * (s > 0); branch and identity both get ds; back through bn2, conv2, relu, bn1, conv1; "
    "dx = dx_branch + ds",
}


# --- the hand-written backward passes ----------------------------------------------------------------------


def _conv2d_backward(x: Tensor, w: Tensor, dy: Tensor, stride: int, padding: int) -> tuple[Tensor, Tensor]:
    """x (N, C, H, W), w (O, C, k, k), dy (N, O, Ho, Wo) -> dx (N, C, H, W), dw (O, C, k, k)."""
    k = w.shape[-1]
    cols = F.unfold(x, k, padding=padding, stride=stride)  # (N, C*k*k, Ho*Wo): each receptive field a column
    dy_flat = dy.flatten(2)  # (N, O, Ho*Wo)
    dw = torch.einsum("nol,nkl->ok", dy_flat, cols).reshape(w.shape)
    dcols = torch.einsum("ok,nol->nkl", w.flatten(1), dy_flat)  # (N, C*k*k, Ho*Wo)
    dx = F.fold(dcols, x.shape[-2:], k, padding=padding, stride=stride)  # overlapping columns summed back
    return dx, dw


def _batchnorm_forward(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Train mode: x (N, C, H, W) -> y, x_hat (N, C, H, W) and sigma (1, C, 1, 1), with the batch's statistics."""
    mean = x.mean((0, 2, 3), keepdim=True)
    sigma = torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + eps)
    x_hat = (x - mean) / sigma
    return gamma.view(1, -1, 1, 1) * x_hat + beta.view(1, -1, 1, 1), x_hat, sigma


def _batchnorm_backward(x: Tensor, gamma: Tensor, eps: float, dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dy (N, C, H, W) -> dx (N, C, H, W), dgamma (C,), dbeta (C,).

    x_hat depends on x three ways (directly, through the mean, through sigma): the two mean terms are what
    the last two come to.
    """
    dims = (0, 2, 3)
    _, x_hat, sigma = _batchnorm_forward(x, gamma, torch.zeros_like(gamma), eps)
    dgamma, dbeta = (dy * x_hat).sum(dims), dy.sum(dims)
    mean_dy = dy.mean(dims, keepdim=True)
    mean_dy_xhat = (dy * x_hat).mean(dims, keepdim=True)
    dx = gamma.view(1, -1, 1, 1) / sigma * (dy - mean_dy - x_hat * mean_dy_xhat)
    return dx, dgamma, dbeta


def _relu_backward(x: Tensor, dy: Tensor) -> Tensor:
    return dy * (x > 0)


def _sum_backward(dy: Tensor) -> tuple[Tensor, Tensor]:
    return dy, dy


def _linear_ce_backward(h: Tensor, w: Tensor, b: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h (N, D), w (K, D), b (K,), labels (N,) -> dh (N, D), dw (K, D), db (K,) of the mean cross-entropy."""
    probs = torch.softmax(h @ w.T + b, dim=1)
    dlogits = (probs - F.one_hot(labels, w.shape[0]).to(h.dtype)) / len(h)
    return dlogits @ w, dlogits.T @ h, dlogits.sum(0)


def _basic_block_backward(x: Tensor, p: dict[str, Tensor], eps: float, dy: Tensor) -> dict[str, Tensor]:
    """A v1 basic block with an identity shortcut, forward then backward from the pieces above.

    x (N, C, H, W), p: conv1/conv2 (C, C, 3, 3) and bn gammas/betas (C,). Returns y and every gradient.
    """
    z1 = F.conv2d(x, p["conv1.weight"], padding=1)
    a1 = _batchnorm_forward(z1, p["bn1.weight"], p["bn1.bias"], eps)[0]
    r1 = torch.relu(a1)
    z2 = F.conv2d(r1, p["conv2.weight"], padding=1)
    s = _batchnorm_forward(z2, p["bn2.weight"], p["bn2.bias"], eps)[0] + x
    ds = _relu_backward(s, dy)
    d_branch, d_identity = _sum_backward(ds)
    dz2, dg2, db2 = _batchnorm_backward(z2, p["bn2.weight"], eps, d_branch)
    dr1, dw2 = _conv2d_backward(r1, p["conv2.weight"], dz2, 1, 1)
    dz1, dg1, db1 = _batchnorm_backward(z1, p["bn1.weight"], eps, _relu_backward(a1, dr1))
    dx_branch, dw1 = _conv2d_backward(x, p["conv1.weight"], dz1, 1, 1)
    return {"y": torch.relu(s), "x": dx_branch + d_identity, "conv1.weight": dw1, "bn1.weight": dg1,
            "bn1.bias": db1, "conv2.weight": dw2, "bn2.weight": dg2, "bn2.bias": db2}  # fmt: skip


# --- the checks against autograd ---------------------------------------------------------------------------


def _autograd(out: Tensor, leaves: list[Tensor], dy: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(out, leaves, dy))


def _leaves(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _diff(hand: Tensor, auto: Tensor) -> float:
    return float((hand - auto).detach().abs().max())


def _report(op: str, hand: dict[str, Tensor], auto: dict[str, Tensor], shapes: dict[str, Tensor]) -> dict[str, Any]:
    return {
        "op": op,
        "formula": FORMULAS[op.split(" (")[0]],
        "shapes": {k: list(v.shape) for k, v in shapes.items()},
        "max_abs_diff": {k: _diff(hand[k], auto[k]) for k in hand},
        "max_abs_grad": {k: float(auto[k].abs().max()) for k in hand},  # the scale the differences sit on
    }


def _check_conv(x: Tensor, w: Tensor, stride: int, padding: int, dy: Tensor) -> dict[str, Any]:
    dx, dw = _conv2d_backward(x, w, dy, stride, padding)
    lx, lw = _leaves(x, w)
    ax, aw = _autograd(F.conv2d(lx, lw, stride=stride, padding=padding), [lx, lw], dy)
    op = f"conv2d (stride {stride})"
    result = _report(op, {"dx": dx, "dW": dw}, {"dx": ax, "dW": aw}, {"x": x, "W": w, "dy": dy})
    # PyTorch's own helpers for the same two gradients, as a second opinion
    result["cross_check"] = {
        "dx": _diff(dx, torch.nn.grad.conv2d_input(x.shape, w, dy, stride=stride, padding=padding)),
        "dW": _diff(dw, torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=stride, padding=padding)),
    }
    return result


def _check_batchnorm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float, dy: Tensor) -> dict[str, Any]:
    dx, dg, db = _batchnorm_backward(x, gamma, eps, dy)
    lx, lg, lb = _leaves(x, gamma, beta)
    out = F.batch_norm(lx, None, None, lg, lb, training=True, eps=eps)
    ax, ag, ab = _autograd(out, [lx, lg, lb], dy)
    hand, auto = {"dx": dx, "dgamma": dg, "dbeta": db}, {"dx": ax, "dgamma": ag, "dbeta": ab}
    return _report("batchnorm", hand, auto, {"x": x, "gamma": gamma, "dy": dy})


def _check_relu(x: Tensor, dy: Tensor) -> dict[str, Any]:
    [lx] = _leaves(x)
    [ax] = _autograd(torch.relu(lx), [lx], dy)
    return _report("relu", {"dx": _relu_backward(x, dy)}, {"dx": ax}, {"x": x, "dy": dy})


def _check_sum(a: Tensor, b: Tensor, dy: Tensor) -> dict[str, Any]:
    la, lb = _leaves(a, b)
    aa, ab = _autograd(la + lb, [la, lb], dy)
    da, db = _sum_backward(dy)
    return _report("residual sum", {"da": da, "db": db}, {"da": aa, "db": ab}, {"a": a, "b": b, "dy": dy})


def _check_linear_ce(h: Tensor, w: Tensor, b: Tensor, labels: Tensor) -> dict[str, Any]:
    dh, dw, db = _linear_ce_backward(h, w, b, labels)
    lh, lw, lb = _leaves(h, w, b)
    loss = F.cross_entropy(F.linear(lh, lw, lb), labels)
    ah, aw, ab = _autograd(loss, [lh, lw, lb], torch.ones_like(loss))
    hand, auto = {"dh": dh, "dW": dw, "db": db}, {"dh": ah, "dW": aw, "db": ab}
    result = _report("linear + cross-entropy", hand, auto, {"h": h, "W": w, "b": b})
    result["loss"] = float(loss.detach())
    return result


def _check_block(x: Tensor, params: dict[str, Tensor], eps: float, dy: Tensor) -> dict[str, Any]:
    """The chain against autograd through reslab's own BasicBlock (train mode) holding the same weights."""
    block = BasicBlock(in_channels=x.shape[1], planes=x.shape[1]).to(device=x.device, dtype=x.dtype).train()
    block.load_state_dict(params, strict=False)  # running stats play no part in train mode
    for bn in (block.bn1, block.bn2):
        bn.eps = eps
    hand = _basic_block_backward(x, params, eps, dy)
    [lx] = _leaves(x)
    names = list(params)
    y = block(lx)
    grads = _autograd(y, [lx, *(dict(block.named_parameters())[n] for n in names)], dy)
    auto = {"x": grads[0], **dict(zip(names, grads[1:], strict=True))}
    result = _report("basic block", {f"d{k}": v for k, v in hand.items() if k != "y"},
                     {f"d{k}": v for k, v in auto.items()}, {"x": x, "dy": dy})  # fmt: skip
    result["max_abs_diff_forward"] = _diff(hand["y"], y)  # the hand forward is reslab's block, too
    return result


# --- the tensors, the experiment ----------------------------------------------------------------------------


def measure(
    *,
    checkpoint: str | None = None,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Each hand-written backward against autograd on the same float64 tensors.

    Fresh: small random tensors, seeded. With ``checkpoint``: the trained stem convolution and BatchNorm, the
    first block's weights (where it is a v1 basic block with an identity shortcut) and the classifier, on
    a few real test images of its dataset (``dataset`` is then the checkpoint's; unused when fresh).
    """
    dev = device_of(device)
    if dev.type == "mps":
        raise ReslabError("the checks run in float64, which MPS does not support; use --device cpu")
    gen = torch.Generator().manual_seed(seed)
    t = _fresh_tensors(gen) if checkpoint is None else _checkpoint_tensors(checkpoint, data_dir, seed, dev)
    t["block"] = {k: v.to(dev) for k, v in t["block"].items()}
    t |= {k: v.to(dev) for k, v in t.items() if isinstance(v, Tensor)}

    def upstream(like: Tensor) -> Tensor:  # the gradient arriving from the layers above: random, seeded
        return torch.randn(like.shape, generator=gen, dtype=DTYPE).to(dev)

    x, w, stride, padding, eps = t["x"], t["conv_w"], t["stride"], t["padding"], t["eps"]
    z = F.conv2d(x, w, stride=stride, padding=padding)
    a = _batchnorm_forward(z, t["gamma"], t["beta"], eps)[0]
    r = torch.relu(a)
    other = 2 if stride == 1 else 1  # both a stride-1 and a strided convolution, as in downsampling blocks
    ops = [
        _check_conv(x, w, stride, padding, upstream(z)),
        _check_conv(x, w, other, padding, upstream(F.conv2d(x, w, stride=other, padding=padding))),
        _check_batchnorm(z, t["gamma"], t["beta"], eps, upstream(a)),
        _check_relu(a, upstream(r)),
        _check_sum(r, upstream(r), upstream(r)),
        _check_linear_ce(t["h"], t["fc_w"], t["fc_b"], t["labels"]),
        _check_block(r, t["block"], eps, upstream(r)),
    ]
    worst = max(d for op in ops for d in op["max_abs_diff"].values())
    return {"source": t["source"], "block_weights": t["block_from"], "dtype": "float64", "tolerance": TOLERANCE,
            "worst": worst, "uncertainty": EXACT, "ops": ops}  # fmt: skip


def _fresh_tensors(gen: torch.Generator) -> dict[str, Any]:
    """Small random tensors: 4 images of 3 x 8 x 8, an 8-channel 3x3 conv and BN, a 16 -> 10 classifier."""

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(shape, generator=gen, dtype=DTYPE)

    c = 8
    block = {f"conv{i}.weight": randn(c, c, 3, 3, scale=(2 / (9 * c)) ** 0.5) for i in (1, 2)}
    block |= {f"bn{i}.weight": 1 + randn(c, scale=0.1) for i in (1, 2)}
    block |= {f"bn{i}.bias": randn(c, scale=0.1) for i in (1, 2)}
    return {
        "source": f"fresh random tensors (seed {gen.initial_seed()})",
        "x": randn(4, 3, 8, 8), "conv_w": randn(c, 3, 3, 3, scale=(2 / 27) ** 0.5), "stride": 1, "padding": 1,
        "gamma": 1 + randn(c, scale=0.1), "beta": randn(c, scale=0.1), "eps": 1e-5,
        "h": randn(6, 16), "fc_w": randn(10, 16, scale=0.25), "fc_b": randn(10, scale=0.1),
        "labels": torch.randint(0, 10, (6,), generator=gen), "block": block, "block_from": "random",
    }  # fmt: skip


def _checkpoint_tensors(checkpoint: str, data_dir: str | None, seed: int, dev: torch.device) -> dict[str, Any]:
    """The trained stem, first block and classifier, and their inputs on a few real test images, in float64."""
    subject = load_subject(checkpoint=checkpoint, device=dev)
    model = subject.model.to(DTYPE).eval()
    images, labels = real_images(subject.info, count=CHECKPOINT_IMAGES, seed=seed, data_dir=data_dir, device=dev)
    images = images.to(DTYPE)
    with torch.no_grad():
        h = model.forward_head(model.forward_features(images), pre_logits=True)  # (N, num_features)
    bn = _stem_norm(model)
    first = model.stages()[0][0]
    plain_basic = type(first) is BasicBlock and first.downsample is None and first.conv1.in_channels == bn.num_features
    block = {k: v.detach().clone() for k, v in first.named_parameters()} if plain_basic else _random_block(bn, seed)
    return {
        "source": f"{subject.source} ({subject.label}), {len(images)} real {subject.info.name} test images",
        "x": images, "conv_w": model.conv1.weight.detach().clone(), "stride": model.conv1.stride[0],
        "padding": model.conv1.padding[0], "gamma": bn.weight.detach().clone(), "beta": bn.bias.detach().clone(),
        "eps": bn.eps, "h": h, "fc_w": model.fc.weight.detach().clone(), "fc_b": model.fc.bias.detach().clone(),
        "labels": labels, "block": block, "block_from": "layer1.0" if plain_basic else "random (not a v1 basic block)",
    }  # fmt: skip


def _stem_norm(model: nn.Module) -> nn.BatchNorm2d:
    """The stem's BN; pre-activation nets have none there, so the first block's (it normalizes the stem's output)."""
    if isinstance(model.bn1, nn.BatchNorm2d):
        return model.bn1
    return next(m for m in model.stages()[0][0].modules() if isinstance(m, nn.BatchNorm2d))


def _random_block(bn: nn.BatchNorm2d, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    params = {
        f"conv{i}.weight": torch.randn(c, c, 3, 3, generator=gen, dtype=DTYPE) * (2 / (9 * c)) ** 0.5 for i in (1, 2)
    }
    params |= {f"bn{i}.weight": torch.ones(c, dtype=DTYPE) for i in (1, 2)}
    return params | {f"bn{i}.bias": torch.zeros(c, dtype=DTYPE) for i in (1, 2)}


# --- the picture and the words ------------------------------------------------------------------------------


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """A bar per (op, gradient): max |hand - autograd| on a log scale, with the 1e-5 bar of the tests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-20  # an exact zero has no place on a log axis: drawn here, labelled "0"
    labels, values, colors = [], [], []
    for i, op in enumerate(result["ops"]):
        for grad, diff in op["max_abs_diff"].items():
            labels.append(f"{op['op']}: {grad}")
            values.append(max(diff, floor))
            colors.append(f"C{i}")
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.5))
    bars = ax.barh(labels, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.1e}" if v > floor else "0 (exact)" for v in values], fontsize=7, padding=2)
    ax.axvline(result["tolerance"], color="red", linestyle="--", label=f"test tolerance {result['tolerance']:g}")
    ax.set(xscale="log", xlim=(floor, 1), xlabel="max |hand - autograd| (float64)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"hand-written backward vs autograd\n{result['source']}", fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / "backprop.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def summarize(result: dict[str, Any]) -> list[str]:
    """One line per op: its backward formula and the largest difference from autograd per gradient."""
    lines = [f"Backward by hand vs autograd in float64, {result['source']}: worst max |diff| {result['worst']:.1e}."]
    shown = set()
    for op in result["ops"]:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in op["max_abs_diff"].items())
        formula = "the same formulas" if op["formula"] in shown else op["formula"]
        shown.add(op["formula"])
        lines.append(f"{op['op']}: {formula}. max |hand - autograd|: {diffs}.")
    lines.append(f"Uncertainty: {result['uncertainty']} (float64 rounding, tolerance {result['tolerance']:g}).")
    return lines
