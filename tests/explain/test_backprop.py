"""`reslab explain backprop`: every hand-written backward pass equals autograd's to 1e-5 in float64."""

import pytest
import torch
import torch.nn.functional as F

from reslab.explain import backprop
from reslab.explain.backprop import (
    _basic_block_backward,
    _batchnorm_backward,
    _conv2d_backward,
    _linear_ce_backward,
    _relu_backward,
    _sum_backward,
)
from reslab.explain.common import dataset_info
from reslab.models import create_model
from reslab.models.blocks import BasicBlock
from tests.data.fixtures import write_mnist_like
from tests.explain.conftest import save_checkpoint

TOL = 1e-5  # the issue's "Done when"


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


def leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "padding"), [(8, 3, 1, 1), (7, 3, 2, 1), (6, 1, 2, 0), (9, 7, 2, 3)]
)
def test_conv2d_backward(size, kernel, stride, padding):
    x, w = randn(2, 3, size, size), randn(5, 3, kernel, kernel)
    lx, lw = leaves(x, w)
    y = F.conv2d(lx, lw, stride=stride, padding=padding)
    dy = randn(*y.shape)
    dx, dw = _conv2d_backward(x, w, dy, stride, padding)
    ax, aw = grads(y, [lx, lw], dy)
    torch.testing.assert_close(dx, ax, rtol=0, atol=TOL)
    torch.testing.assert_close(dw, aw, rtol=0, atol=TOL)


def test_batchnorm_backward_in_train_mode():
    x, gamma, beta, dy = 2 + 3 * randn(4, 6, 5, 5), 1 + randn(6), randn(6), randn(4, 6, 5, 5)
    lx, lg, lb = leaves(x, gamma, beta)
    y = F.batch_norm(lx, None, None, lg, lb, training=True, eps=1e-5)
    for hand, auto in zip(_batchnorm_backward(x, gamma, 1e-5, dy), grads(y, [lx, lg, lb], dy), strict=True):
        torch.testing.assert_close(hand, auto, rtol=0, atol=TOL)


def test_relu_backward_including_exact_zeros():
    x, dy = randn(3, 4, 5, 5), randn(3, 4, 5, 5)
    x[0, 0, 0] = 0.0  # autograd's ReLU passes no gradient at 0; so does dy * (x > 0)
    [lx] = leaves(x)
    [ax] = grads(torch.relu(lx), [lx], dy)
    torch.testing.assert_close(_relu_backward(x, dy), ax, rtol=0, atol=TOL)


def test_residual_sum_gives_both_inputs_the_whole_gradient():
    a, b, dy = randn(2, 4, 3, 3), randn(2, 4, 3, 3), randn(2, 4, 3, 3)
    la, lb = leaves(a, b)
    for hand, auto in zip(_sum_backward(dy), grads(la + lb, [la, lb], dy), strict=True):
        assert torch.equal(hand, auto) and torch.equal(hand, dy)


def test_linear_cross_entropy_backward():
    h, w, b, labels = randn(7, 12), randn(10, 12), randn(10), torch.randint(0, 10, (7,))
    lh, lw, lb = leaves(h, w, b)
    loss = F.cross_entropy(F.linear(lh, lw, lb), labels)
    for hand, auto in zip(_linear_ce_backward(h, w, b, labels), torch.autograd.grad(loss, [lh, lw, lb]), strict=True):
        torch.testing.assert_close(hand, auto, rtol=0, atol=TOL)


def test_a_whole_basic_block_chained_from_the_pieces():
    block = BasicBlock(in_channels=6, planes=6).double().train()
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    params = {k: v.detach().clone() for k, v in block.named_parameters()}
    x, dy = randn(3, 6, 6, 6), randn(3, 6, 6, 6)
    [lx] = leaves(x)
    y = block(lx)
    auto = grads(y, [lx, *block.parameters()], dy)
    hand = _basic_block_backward(x, params, block.bn1.eps, dy)
    torch.testing.assert_close(hand["y"], y.detach(), rtol=0, atol=TOL)
    for name, a in zip(["x", *dict(block.named_parameters())], auto, strict=True):
        torch.testing.assert_close(hand[name], a, rtol=0, atol=TOL, msg=name)


def test_measure_fresh_every_op_matches_autograd(tmp_path):
    result = backprop.measure(seed=3)
    ops = {op["op"]: op for op in result["ops"]}
    assert list(ops) == ["conv2d (stride 1)", "conv2d (stride 2)", "batchnorm", "relu", "residual sum",
                         "linear + cross-entropy", "basic block"]  # fmt: skip
    assert 0 <= result["worst"] < TOL
    for op in result["ops"]:
        assert all(d < TOL for d in op["max_abs_diff"].values()), op["op"]
        assert all(g > 0 for g in op["max_abs_grad"].values()), op["op"]  # not trivially zero gradients
    assert ops["residual sum"]["max_abs_diff"] == {"da": 0.0, "db": 0.0}
    assert max(ops["conv2d (stride 2)"]["cross_check"].values()) < TOL
    assert ops["basic block"]["max_abs_diff_forward"] < TOL
    assert "dx = (gamma / sigma) (dy - mean(dy) - x_hat mean(dy x_hat))" in ops["batchnorm"]["formula"]
    [png] = backprop.plot(result, tmp_path)
    assert png.stat().st_size > 10_000
    lines = backprop.summarize(result)
    assert len(lines) == 2 + len(ops) and "dlogits = (softmax(logits) - onehot) / N" in lines[6]
    assert lines[-1].startswith("Uncertainty: none to estimate: each line is an exact numerical check")


def test_measure_on_a_checkpoint_uses_its_weights_and_real_images(tmp_path):
    data = write_mnist_like(tmp_path / "fashion", n_train=30, n_test=20)
    info = dataset_info("fashion-mnist", str(data))
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1])
    path = tmp_path / "best.pt"
    save_checkpoint(path, model, info)
    result = backprop.measure(checkpoint=str(path), data_dir=str(data))
    ops = {op["op"]: op for op in result["ops"]}
    assert result["block_weights"] == "layer1.0" and str(path) in result["source"]
    assert ops["conv2d (stride 1)"]["shapes"]["W"] == [16, 1, 3, 3]
    assert ops["conv2d (stride 1)"]["shapes"]["x"] == [backprop.CHECKPOINT_IMAGES, 1, 28, 28]
    assert ops["linear + cross-entropy"]["shapes"]["W"] == [10, 64]
    assert result["worst"] < TOL
