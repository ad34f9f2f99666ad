"""Blocks compute exactly the functions the papers define."""

import pytest
import torch
import torch.nn.functional as F

from reslab import create_model
from reslab.models import Bottleneck, PreActBasicBlock, PreActBottleneck, ZeroPadShortcut
from reslab.models.blocks import projection_shortcut


def test_v1_and_v15_place_the_stride():
    v1, v15 = create_model("resnet50_v1"), create_model("resnet50")
    for stage in ("layer2", "layer3", "layer4"):
        first_v1, first_v15 = getattr(v1, stage)[0], getattr(v15, stage)[0]
        assert first_v1.conv1.stride == (2, 2) and first_v1.conv2.stride == (1, 1)
        assert first_v15.conv1.stride == (1, 1) and first_v15.conv2.stride == (2, 2)
    # Same parameters, same output shape, different functions.
    v15.load_state_dict(v1.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert v1.eval()(x).shape == v15.eval()(x).shape
    assert not torch.allclose(v1(x), v15(x))


def _bn_relu(bn, x):
    return F.relu(F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def _randomize_bn_(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)


def test_preact_bottleneck_order_and_projection_on_preactivated_input():
    shortcut = projection_shortcut(32, 64, stride=2, with_norm=False)
    block = PreActBottleneck(in_channels=32, planes=16, stride=2, shortcut=shortcut)
    _randomize_bn_(block)
    block.eval()
    x = torch.randn(2, 32, 9, 9)
    pre = _bn_relu(block.bn1, x)
    expected_branch = block.conv3(_bn_relu(block.bn3, block.conv2(_bn_relu(block.bn2, block.conv1(pre)))))
    expected = expected_branch + shortcut(pre)  # no ReLU after the sum (He et al. 2016)
    out = block(x)
    torch.testing.assert_close(out, expected)
    assert out.shape == (2, 64, 5, 5)
    assert (out < 0).any()  # nothing rectifies the sum


def test_preact_identity_shortcut_carries_the_raw_input():
    block = PreActBasicBlock(in_channels=16, planes=16).eval()
    _randomize_bn_(block)
    x = torch.randn(2, 16, 8, 8)
    expected = block.conv2(_bn_relu(block.bn2, block.conv1(_bn_relu(block.bn1, x)))) + x
    torch.testing.assert_close(block(x), expected)


def test_v2_network_has_final_bn_relu_and_bare_stem():
    model = create_model("preact_resnet50")
    assert isinstance(model.bn1, torch.nn.Identity) and model.final_bn is not None
    feats = model.eval().forward_features(torch.randn(1, 3, 64, 64))
    assert (feats >= 0).all()  # final BN-ReLU before pooling


def test_v1_bottleneck_is_post_activation():
    shortcut = projection_shortcut(32, 64, stride=1, with_norm=True)
    block = Bottleneck(in_channels=32, planes=16, shortcut=shortcut)
    _randomize_bn_(block)
    block.eval()
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        h = F.relu(block.bn1(block.conv1(x)))
        h = F.relu(block.bn2(block.conv2(h)))
        expected = F.relu(block.bn3(block.conv3(h)) + shortcut(x))
    torch.testing.assert_close(block(x), expected)


def test_option_a_shortcut_is_strided_identity_with_zero_channels():
    sc = ZeroPadShortcut(in_channels=16, out_channels=32, stride=2)
    x = torch.randn(2, 16, 7, 7)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4) and sum(p.numel() for p in sc.parameters()) == 0
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert (y[:, 16:] == 0).all()


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet110", "preact_resnet164"])
def test_zero_init_residual_makes_every_block_start_as_identity(name):
    model = create_model(name, zero_init_residual=True)
    model.eval()
    block = model.layer1[1]  # a block with an identity shortcut
    x = torch.randn(2, model.stage_channels[0], 8, 8)
    out = block(x)
    torch.testing.assert_close(out, x if block.preact else F.relu(x))


def test_drop_path_trains_stochastically_and_is_a_no_op_in_eval():
    model = create_model("resnet20", drop_path_rate=0.5)
    rates = [b.drop_path.p for s in model.stages() for b in s if hasattr(b.drop_path, "p")]
    assert rates[-1] == pytest.approx(0.5) and rates == sorted(rates)  # linear, 0 -> rate
    reference = create_model("resnet20")
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet164", "resnext50_32x4d"])
@pytest.mark.parametrize("train", [False, True])
def test_channels_last_gives_the_same_outputs(name, train):
    model = create_model(name).train(train)
    _randomize_bn_(model)
    size = 32 if name in ("resnet20", "preact_resnet164") else 64
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        nchw = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        nhwc = model_cl(x.to(memory_format=torch.channels_last))
    # Different kernels sum in different orders: agree to float32 rounding, relative to the logits' scale
    # (train-mode BN over 4 x 2 x 2 values amplifies that rounding the most).
    relative_error = ((nhwc - nchw).abs().max() / nchw.abs().max()).item()
    assert relative_error < 1e-4, relative_error


def test_feature_pyramid():
    model = create_model("resnet50").eval()
    feats = model.forward_stages(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in feats] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    pooled = model.forward_head(model.forward_features(torch.randn(1, 3, 64, 64)), pre_logits=True)
    assert pooled.shape == (1, model.num_features)
