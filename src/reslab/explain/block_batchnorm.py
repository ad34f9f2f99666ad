"""BatchNorm in one block, for ``reslab explain block``: train mode by hand, and eval mode against train mode.

Train mode normalizes with the batch mean and the biased batch variance, and moves the running statistics by
``momentum = 0.1`` towards the batch's (variance made unbiased, times ``n / (n - 1)``); eval mode uses the
running ones. ``batchnorm`` checks the first against bn1's own output and measures how far the block's two
outputs are apart, and how warming the running statistics closes the gap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

WARM_PASSES = (0, 1, 2, 4, 8, 16, 32)  # running stats keep 0.9^k of their start after k passes


def batchnorm(blk: nn.Module, x: Tensor, draw: Callable[[], Tensor] | None) -> dict[str, Any]:
    """bn1 by hand in train mode and its running-stat update; every BN's output std and the block's output in
    eval vs train mode, before and after warming the running stats (fresh blocks only).

    x: the block's input (N, C, H, W); draw: another batch like x on each call (None: a trained block, whose
    running stats are already warm). Moves ``blk``'s running stats: pass a copy.
    """
    bn = blk.bn1
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    in_eval: dict[str, Any] = {}
    in_train: dict[str, Any] = {}
    y_eval = _run_watching_norms(blk.eval(), x, in_eval)
    y_train = _run_watching_norms(blk.train(), x, in_train)  # one momentum update of every running stat
    result = {"name": "bn1", "momentum": bn.momentum, "eps": bn.eps}
    result.update(by_hand(bn, in_train["bn1_in"], in_train["bn1_out"], start_mean, start_var))
    result["running_start"] = {"mean": float(start_mean.mean()), "var": float(start_var.mean())}
    result["warmup"] = _warmup(blk, x, y_train, y_eval, draw)
    in_warm: dict[str, Any] = {}
    if draw is not None:
        _run_watching_norms(blk.eval(), x, in_warm)
    names = [name for name, _ in _norms(blk)]
    result["out_std"] = {
        name: {"train": in_train[name], "eval": in_eval[name], "eval_warm": in_warm.get(name)} for name in names
    }
    return result


def by_hand(bn: nn.BatchNorm2d, z: Tensor, out: Tensor, start_mean: Tensor, start_var: Tensor) -> dict[str, Any]:
    """Train-mode BN as ``gamma * (z - mean) / sqrt(var + eps) + beta`` with the batch's mean and biased
    variance (means over N, H, W), and the running update ``(1 - m) * old + m * batch`` with the unbiased one.

    z, out: bn1's input and output (N, C, H, W); start_*: its running stats before that pass (C,).
    """
    dims = (0, 2, 3)
    n = z.numel() // z.shape[1]  # values per channel: N * H * W
    mean, var = z.mean(dims), z.var(dims, unbiased=False)
    gamma, beta = bn.weight.detach()[:, None, None], bn.bias.detach()[:, None, None]

    def normalize(v: Tensor) -> Tensor:
        return (z - mean[:, None, None]) / torch.sqrt(v[:, None, None] + bn.eps) * gamma + beta

    m = bn.momentum
    want_mean = (1 - m) * start_mean + m * mean
    want_var = (1 - m) * start_var + m * var * n / (n - 1)
    return {
        "values_per_channel": n,
        "batch_mean": float(mean.mean()),  # averaged over channels
        "batch_var_biased": float(var.mean()),
        "max_diff_hand_biased": float((normalize(var) - out).abs().max()),
        # the unbiased variance in its place, for contrast: train mode does not use it
        "max_diff_hand_unbiased": float((normalize(var * n / (n - 1)) - out).abs().max()),
        "max_diff_running_mean": float((want_mean - bn.running_mean).abs().max()),
        "max_diff_running_var": float((want_var - bn.running_var).abs().max()),
    }


def _norms(blk: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The block's BatchNorms in forward order (bn1 is after conv1 in v1, on the raw input in v2)."""
    return [(name, m) for name, m in blk.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _run_watching_norms(blk: nn.Module, x: Tensor, seen: dict[str, Any]) -> Tensor:
    """``blk(x)`` (in its current mode), recording each BN's output std (mean over channels) into ``seen``,
    and bn1's input and output. Recorded inside the hooks: v1 blocks apply an in-place ReLU right after."""

    def record(name: str):
        def hook(module, args, out):
            seen[name] = float(out.transpose(0, 1).flatten(1).std(1).mean())
            if name == "bn1":
                seen["bn1_in"], seen["bn1_out"] = args[0].detach().clone(), out.detach().clone()

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in _norms(blk)]
    with torch.no_grad():
        y = blk(x)
    for hook in hooks:
        hook.remove()
    return y


def _rel_gap(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _warmup(blk: nn.Module, x: Tensor, y_train: Tensor, y_eval: Tensor, draw) -> list[dict[str, float]]:
    """The eval-mode output against the train-mode one after k train-mode passes (the pass on x is the first;
    then new batches like x). A train-mode output does not depend on the running stats, so ``y_train`` holds.
    Without ``draw`` (a trained block) only k = 0 is measured: its running stats are already warm."""
    bn = blk.bn1
    rows = [{"passes": 0, "rel_gap": _rel_gap(y_eval, y_train), "max_abs_gap": float((y_eval - y_train).abs().max())}]
    if draw is None:
        return rows
    with torch.no_grad():
        for k in range(1, max(WARM_PASSES) + 1):
            if k > 1:
                blk.train()(draw())
            if k in WARM_PASSES:
                y = blk.eval()(x)
                rows.append(
                    {
                        "passes": k,
                        "rel_gap": _rel_gap(y, y_train),
                        "max_abs_gap": float((y - y_train).abs().max()),
                        "bn1_running_var": float(bn.running_var.mean()),
                    }
                )
    return rows
