"""`reslab explain block`: the gradient through each path of a block, and BatchNorm's two modes, checked."""

import re

import pytest
import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.explain import block as explain_block
from reslab.explain.block_backward import path_gradients
from reslab.explain.block_batchnorm import WARM_PASSES, by_hand
from reslab.explain.common import dataset_info, real_images
from reslab.models import create_model
from reslab.models.blocks import BLOCKS
from tests.data.fixtures import write_mnist_like
from tests.explain.conftest import save_checkpoint


def small_block(kind: str, version: str, channels: int = 8) -> nn.Module:
    planes = channels // 4 if kind == "bottleneck" else channels
    return BLOCKS[(kind, version == "v2")](in_channels=channels, planes=planes).double().train()


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_identity_path_and_the_sum_of_both_paths(kind, version):
    blk = small_block(kind, version)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    grad_y = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    g = path_gradients(blk, x, grad_y)

    # autograd's dL/dx of L = <grad_y, block(x)>, computed here on its own
    leaf = x.clone().requires_grad_()
    (blk(leaf) * grad_y).sum().backward()
    torch.testing.assert_close(g["dL/dx"], leaf.grad, rtol=0, atol=0)
    torch.testing.assert_close(g["via_identity"] + g["via_residual"], leaf.grad, rtol=0, atol=1e-12)
    if version == "v2":  # nothing after the sum: the shortcut hands dL/dy to x untouched (He et al. 2016, eq. 5)
        assert torch.equal(g["via_identity"], grad_y)
    else:  # v1: the ReLU after the sum lets dL/dy through only where y > 0
        y = blk(x).detach()
        assert torch.equal(g["via_identity"], grad_y * (y > 0))
        assert not torch.equal(g["via_identity"], grad_y)


def test_batchnorm_train_mode_uses_batch_mean_and_biased_variance():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    z = 3 + 2 * torch.randn(5, 4, 3, 3, dtype=torch.float64)
    out = bn.train()(z).detach()

    n = 5 * 3 * 3
    mean = z.mean((0, 2, 3))
    biased = ((z - mean[:, None, None]) ** 2).sum((0, 2, 3)) / n
    hand = (z - mean[:, None, None]) / torch.sqrt(biased[:, None, None] + 1e-5) * bn.weight[:, None, None]
    hand = hand + bn.bias[:, None, None]
    torch.testing.assert_close(out, hand.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, 0.9 * start_mean + 0.1 * mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.9 * start_var + 0.1 * biased * n / (n - 1), rtol=0, atol=1e-12)

    found = by_hand(bn, z, out, start_mean, start_var)  # what `measure` reports: the same checks
    assert found["values_per_channel"] == n
    assert found["max_diff_hand_biased"] < 1e-12 and found["max_diff_hand_unbiased"] > 1e-3
    assert found["max_diff_running_mean"] < 1e-12 and found["max_diff_running_var"] < 1e-12


@pytest.fixture(scope="module")
def fresh_v1(tmp_path_factory):
    result = explain_block.measure(block="bottleneck", version="v1", shape=(4, 16, 8, 8), seed=0)
    return result, tmp_path_factory.mktemp("block")


def test_fresh_block_numbers(fresh_v1):
    result, _ = fresh_v1
    stats, back, bn = result["forward"]["stats"], result["backward"], result["batchnorm"]
    assert stats["x"]["shape"] == stats["y"]["shape"] == [4, 16, 8, 8]
    assert stats["y"]["min"] == 0 and stats["y"]["frac_zero"] > 0.2  # v1: ReLU after the sum
    assert back["identity_equals_masked_dL_dy"] and not back["identity_equals_dL_dy"]
    assert back["max_diff_sum_vs_autograd"] <= 1e-6 * back["norms"]["dL/dx"]
    assert bn["max_diff_hand_biased"] < 1e-5 < bn["max_diff_hand_unbiased"]
    assert max(bn["max_diff_running_mean"], bn["max_diff_running_var"]) < 1e-5
    assert bn["running_start"] == {"mean": 0.0, "var": 1.0}  # a fresh block's statistics, untouched by measuring
    gaps = [row["rel_gap"] for row in bn["warmup"]]
    assert [row["passes"] for row in bn["warmup"]] == list(WARM_PASSES)
    assert gaps[-1] < 0.5 * gaps[0]  # warming the running stats closes the train/eval gap
    assert bn["out_std"]["bn1"]["train"] == pytest.approx(1, abs=0.05)  # batch stats normalize (gamma = 1)
    plain = result["plain"]
    assert plain["residual_dL/dx_norm"] == pytest.approx(back["norms"]["dL/dx"])


def test_fresh_block_plot_and_summary(fresh_v1):
    result, out = fresh_v1
    [png] = explain_block.plot(result, out)
    assert png.stat().st_size > 10_000
    lines = explain_block.summarize(result)
    assert len(lines) == 6 and "masked by that ReLU (exactly: True)" in lines[3]


def test_v2_summary_states_exact_identity_gradient():
    result = explain_block.measure(block="basic", version="v2", shape=(2, 4, 4, 4))
    assert result["backward"]["identity_equals_dL_dy"] is True
    assert "identity-path gradient == dL/dy exactly: True" in explain_block.summarize(result)[3]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    data = write_mnist_like(root / "fashion", n_train=40, n_test=20)
    info = dataset_info("fashion-mnist", str(data))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1])
    path = save_checkpoint(root / "best.pt", model, info)
    return path, data, model, info


@pytest.fixture
def few_images(monkeypatch):
    monkeypatch.setattr(explain_block, "CHECKPOINT_IMAGES", 16)  # fast; BatchNorm still sees 16 * 28 * 28 values


def test_trained_block_sees_its_real_input(tiny_checkpoint, few_images):
    path, data, model, info = tiny_checkpoint
    result = explain_block.measure(checkpoint=str(path), data_dir=str(data))
    assert result["block_name"] == "layer1.0" and result["source"] == str(path)
    images, _ = real_images(info, count=explain_block.CHECKPOINT_IMAGES, seed=0, data_dir=str(data))
    with torch.no_grad():
        x = model.eval().forward_stem(images)  # what layer1.0 receives
    assert result["shape"] == list(x.shape)
    assert result["forward"]["stats"]["x"]["mean"] == pytest.approx(float(x.mean()), rel=1e-6)
    assert len(result["batchnorm"]["warmup"]) == 1  # trained running stats are not re-warmed


def test_trained_downsampling_block(tiny_checkpoint, few_images):
    path, data, _, _ = tiny_checkpoint
    result = explain_block.measure(checkpoint=str(path), block_name="layer2.0", data_dir=str(data))
    back = result["backward"]
    assert not back["identity_is_x"] and "ZeroPadShortcut" in result["shortcut"]
    assert result["forward"]["stats"]["y"]["shape"][1:] == [32, 14, 14]
    assert back["max_diff_sum_vs_autograd"] <= 1e-6 * back["norms"]["dL/dx"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(block="bottleneck", shape=(2, 6, 4, 4)), "multiple of 4"),
        (dict(shape=(1, 8, 1, 1)), re.escape("N*H*W >= 2")),
        (dict(block="wide"), "basic or bottleneck"),
    ],
)
def test_bad_options_are_one_sentence(options, message):
    with pytest.raises(ReslabError, match=message):
        explain_block.measure(**options)


def test_bad_checkpoint_options(tiny_checkpoint, few_images):
    path, data, _, _ = tiny_checkpoint
    with pytest.raises(ReslabError, match=re.escape("no block 'layer9.0' in resnet20; its blocks are layer1.0")):
        explain_block.measure(checkpoint=str(path), block_name="layer9.0", data_dir=str(data))
    with pytest.raises(ReslabError, match="--shape is for a fresh block"):
        explain_block.measure(checkpoint=str(path), shape=(2, 16, 4, 4), data_dir=str(data))


def test_a_plain_checkpoint_has_no_shortcut_to_study(tmp_path, tiny_checkpoint, few_images):
    _, data, _, info = tiny_checkpoint
    model = create_model("plain20", num_classes=10, in_chans=1, layers=[1, 1, 1])
    save_checkpoint(tmp_path / "plain.pt", model, info)
    with pytest.raises(ReslabError, match="plain20 is a plain network"):
        explain_block.measure(checkpoint=str(tmp_path / "plain.pt"), data_dir=str(data))


def test_a_block_name_alone_studies_the_shipped_trained_resnet56(shipped, few_images):
    result = explain_block.measure(block_name="layer2.1", data_dir=shipped)
    assert result["source"] == "resnet56, shipped reference weights (resnet56.safetensors)"
    assert result["weights"] == "shipped" and result["block_name"] == "layer2.1"
    assert result["shape"] == [16, 32, 14, 14]  # its real input: 16 test images after layer2.0
    assert len(result["batchnorm"]["warmup"]) == 1  # trained running stats are not re-warmed
    assert explain_block.measure(model="resnet20", data_dir=shipped)["block_name"] == "layer1.0"
    with pytest.raises(ReslabError, match="plain20 is a plain network"):
        explain_block.measure(model="plain20", data_dir=shipped)
    with pytest.raises(ReslabError, match="--checkpoint and --model exclude each other"):
        explain_block.measure(model="resnet20", checkpoint="x.pt", data_dir=shipped)


def test_the_summary_says_the_numbers_are_exact_checks(fresh_v1):
    result, _ = fresh_v1
    assert explain_block.summarize(result)[-1].startswith("Uncertainty: none to estimate: these are exact numerical")
