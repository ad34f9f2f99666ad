"""The backward pass through one block, for ``reslab explain block``: each path's share, and no shortcut.

``dL/dx = dL/dx|identity + dL/dx|residual`` (He et al. 2016, eq. 5: the gradient reaching x through the
shortcut is dL/dy itself when nothing follows the sum, as in v2), against autograd, and against the same
block without its shortcut.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def backward(blk: nn.Module, x: Tensor, r: Tensor) -> dict[str, Any]:
    """L = sum(r * y): dL/dy = r. The gradient reaching x through each path, as vector-Jacobian products.

    The sum's two inputs are cut from the graph, so dL/d(shortcut) and dL/dF are the gradients at the sum;
    then each is carried back to x through its own path only. x: (N, C, H, W); r: shaped like the output.
    """
    grads = path_gradients(blk.train(), x, r)
    result = {
        "loss": "L = sum(r * y), r ~ N(0, 1) fixed, so dL/dy = r",
        "mode": "train",
        "norms": {k: float(v.norm()) for k, v in grads.items() if k != "y"},
        "max_diff_sum_vs_autograd": float((grads["via_identity"] + grads["via_residual"] - grads["dL/dx"]).abs().max()),
        "max_abs_dL/dx": float(grads["dL/dx"].abs().max()),  # the scale of that difference
        "identity_is_x": blk.downsample is None,
        "relu_after_sum": not blk.preact,
    }
    if blk.downsample is None:
        mask = (grads["y"] > 0).to(r.dtype)  # v1: the final ReLU passes dL/dy only where y > 0
        result["identity_equals_dL_dy"] = torch.equal(grads["via_identity"], r)
        result["identity_equals_masked_dL_dy"] = torch.equal(grads["via_identity"], r * mask)
        result["frac_masked_by_relu"] = float(1 - mask.mean()) if not blk.preact else 0.0
    return result


def path_gradients(blk: nn.Module, x: Tensor, grad_y: Tensor) -> dict[str, Tensor]:
    """Gradients at x of ``<grad_y, blk(x)>``: through the shortcut, through F, and autograd's whole dL/dx.

    Returns tensors shaped like x (dL/dy and y shaped like the output).
    """
    x = x.detach().clone().requires_grad_()
    branch, identity = blk.paths(x)
    branch_in, identity_in = branch.detach().requires_grad_(), identity.detach().requires_grad_()
    y = blk.merge(branch_in, identity_in)
    g_branch, g_identity = torch.autograd.grad(y, [branch_in, identity_in], grad_y)
    via_identity = torch.autograd.grad(identity, x, g_identity, retain_graph=True)[0]  # identity is x: g itself
    via_residual = torch.autograd.grad(branch, x, g_branch)[0]
    whole = x.detach().clone().requires_grad_()
    dx = torch.autograd.grad(blk(whole), whole, grad_y)[0]
    return {
        "dL/dy": grad_y,
        "dL/d(sum)": g_identity,
        "via_identity": via_identity,
        "via_residual": via_residual,
        "dL/dx": dx,
        "y": y.detach(),
    }


def plain(blk: nn.Module, x: Tensor, r: Tensor, with_shortcut: dict[str, Any]) -> dict[str, Any]:
    """The same weights without the shortcut (``residual=False``): y = F(x) (then ReLU in v1).

    with_shortcut: what ``backward`` measured on the block as it is, for the ratio. Removes ``blk``'s
    shortcut: pass a copy.
    """
    blk.residual = False
    x = x.detach().clone().requires_grad_()
    y = blk.train()(x)
    dx = torch.autograd.grad(y, x, r)[0]
    plain_norm = float(dx.norm())
    residual_norm = with_shortcut["norms"]["dL/dx"]
    return {
        "dL/dx_norm": plain_norm,
        "residual_dL/dx_norm": residual_norm,
        "ratio_residual_to_plain": residual_norm / plain_norm,
        "gain": plain_norm / float(r.norm()),
        "residual_gain": residual_norm / float(r.norm()),
    }
