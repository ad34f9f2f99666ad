"""Spatial shapes follow the papers' tables for odd and even inputs; padding equals TF "fixed padding"."""

import pytest
import torch
import torch.nn.functional as F

from reslab import create_model


def _shapes(model, size):
    x = torch.zeros(1, 3, size, size)
    stem = model.forward_stem(x)
    return [stem.shape[-1]] + [f.shape[-1] for f in model.forward_stages(x)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (224, [56, 56, 28, 14, 7]),  # He et al. 2015, Table 1: conv1 112, conv2_x 56, ..., conv5_x 7
        (225, [57, 57, 29, 15, 8]),  # odd: every stride-2 layer gives ceil(n / 2)
        (97, [25, 25, 13, 7, 4]),
        (64, [16, 16, 8, 4, 2]),
    ],
)
@pytest.mark.parametrize("name", ["resnet18", "resnet50_v1", "resnet50", "preact_resnet50"])
def test_imagenet_spatial_sizes(name, size, expected):
    model = create_model(name).eval()
    with torch.no_grad():
        assert model.conv1(torch.zeros(1, 3, size, size)).shape[-1] == -(-size // 2)
        assert _shapes(model, size) == expected


def test_resnet18_stage_shapes_at_224():
    model = create_model("resnet18").eval()
    with torch.no_grad():
        feats = model.forward_stages(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


@pytest.mark.parametrize("size", [32, 28, 31])
def test_cifar_spatial_sizes(size):
    model = create_model("resnet20").eval()
    half, quarter = -(-size // 2), -(-size // 4)
    with torch.no_grad():
        feats = model.forward_stages(torch.zeros(1, 3, size, size))
    assert [tuple(f.shape[1:]) for f in feats] == [(16, size, size), (32, half, half), (64, quarter, quarter)]


@pytest.mark.parametrize("kernel", [1, 3, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8, 31, 32])
def test_symmetric_padding_equals_tensorflow_fixed_padding(kernel, stride, size):
    # TF reference code: pad (k-1)//2 before and the rest after, then a VALID convolution.
    x = torch.randn(1, 2, size, size)
    w = torch.randn(3, 2, kernel, kernel)
    before = (kernel - 1) // 2
    after = kernel - 1 - before
    tf_style = F.conv2d(F.pad(x, (before, after, before, after)), w, stride=stride)
    ours = F.conv2d(x, w, stride=stride, padding=kernel // 2)
    torch.testing.assert_close(ours, tf_style)
    assert ours.shape[-1] == -(-size // stride)
