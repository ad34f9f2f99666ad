"""The lesion study (Veit et al. 2016): a deleted block is exactly its block with the residual branch at zero,
the model comes back unchanged, and the measured accuracies are those of the lesioned model."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.explain import lesion
from reslab.explain.common import accuracy, load_subject, real_images, residual_blocks
from reslab.explain.lesion_surgery import lesioned, predictions, run_from
from reslab.models import create_model
from reslab.models.blocks import ZeroPadShortcut
from tests.data.fixtures import write_mnist_like


def _tiny(name: str, seed: int = 0) -> nn.Module:
    """A tiny net whose BN layers hold non-trivial running statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_chans=1, layers=[2, 2, 2])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _zero_branch_copy(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` whose block ``name`` has F(x) = 0 exactly: its last BN (v1) or conv (v2) at zero."""
    twin = copy.deepcopy(model)
    last = dict(residual_blocks(twin))[name].last_norm_or_conv()
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return twin


@pytest.mark.parametrize("model_name", ["resnet20", "preact_resnet110"])
def test_deleted_block_is_the_block_with_its_residual_branch_at_zero(model_name):
    # resnet20: v1, option A (layer2.0 / layer3.0 downsample through the zero-pad shortcut);
    # preact_resnet110: v2 with projection shortcuts, whose deletion needs the pre-activated input.
    model = _tiny(model_name)
    x = torch.randn(4, 1, 12, 12)
    for name, _ in residual_blocks(model):
        with torch.no_grad(), lesioned(model, delete=[name]):
            out = model(x)
        assert torch.equal(out, _zero_branch_copy(model, name)(x)), name


def test_downsampling_block_of_option_a_net_is_deleted_to_its_shortcut():
    model = _tiny("resnet20")
    block = model.layer2[0]
    assert isinstance(block.downsample, ZeroPadShortcut)
    h = torch.relu(torch.randn(3, 16, 12, 12))  # a block's input in v1 is a ReLU output
    with torch.no_grad(), lesioned(model, delete=["layer2.0"]):
        out = block(h)
    # The ReLU after the sum acts on shortcut(x) >= 0: the deleted block is the shortcut itself.
    assert out.shape == (3, 32, 6, 6)
    assert torch.equal(out, block.downsample(h))
    assert torch.equal(out[:, 16:], torch.zeros(3, 16, 6, 6))


def test_deleted_plain_block_is_the_identity_or_the_option_a_map():
    model = _tiny("plain20")
    h = torch.randn(3, 16, 12, 12)
    with torch.no_grad(), lesioned(model, delete=["layer1.1", "layer2.0"]):
        assert torch.equal(model.layer1[1](h), h)
        expected = ZeroPadShortcut(in_channels=16, out_channels=32, stride=2)(h)
        assert torch.equal(model.layer2[0](h), expected)


def test_model_is_unchanged_after_the_context_even_on_error():
    model = _tiny("resnet20")
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    all_names = [name for name, _ in residual_blocks(model)]
    with lesioned(model, delete=all_names, swap=[("layer1.0", "layer1.1")]):
        pass
    with pytest.raises(RuntimeError), lesioned(model, delete=all_names[:3]):
        raise RuntimeError("inside")
    assert all("forward" not in block.__dict__ for _, block in residual_blocks(model))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_swapped_pair_runs_in_exchanged_order():
    model = _tiny("resnet20")
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        h = model.layer1[0](model.layer1[1](model.forward_stem(x)))  # block 1 first, then block 0
        expected = model.forward_head(model.layer3(model.layer2(h)))
        with lesioned(model, swap=[("layer1.0", "layer1.1")]):
            assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match="cannot be swapped"), lesioned(model, swap=[("layer2.0", "layer2.1")]):
        pass


def test_run_from_a_block_equals_the_model_forward():
    model = _tiny("resnet20")
    x = torch.randn(4, 1, 12, 12)
    blocks = [b for _, b in residual_blocks(model)]
    with torch.no_grad():
        h = model.forward_stem(x)
        assert torch.equal(run_from(model, blocks, 0, h), model(x))
        h = blocks[1](blocks[0](h))
        assert torch.equal(run_from(model, blocks, 2, h), model(x))


def test_predictions_sharing_the_untouched_blocks_equal_the_full_lesioned_forward():
    model = _tiny("resnet20")
    x = torch.randn(40, 1, 12, 12)
    lesions = [
        {"delete": ["layer3.1"]},
        {},
        {"delete": ["layer2.0", "layer1.1"]},
        {"swap": [("layer1.0", "layer1.1")]},
        {"delete": ["layer1.0"]},
    ]
    predicted = predictions(model, x, lesions, batch_size=16)  # three batches, the last one short
    for row, spec in zip(predicted, lesions, strict=True):
        with torch.no_grad(), lesioned(model, **spec):
            assert torch.equal(row, model(x).argmax(1)), spec


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_mnist_like(tmp_path_factory.mktemp("fmnist"), n_train=100, n_test=30))


def test_measure_counts_every_lesion_and_its_baseline_is_the_models_accuracy(data_dir, tmp_path):
    result = lesion.measure(models=("resnet20", "plain20"), fresh=True, images=16, draws=2, data_dir=data_dir)
    resnet, plain = result["models"]
    assert resnet["blocks"] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert resnet["downsampling"] == plain["downsampling"] == ["layer2.0", "layer3.0"]
    assert len(resnet["single"]) == 9 and resnet["random"]["k"] == [2, 4, 8]
    assert [len(a) for a in resnet["random"]["accuracy"]] == [2] * 3
    # The same seeded draws for both nets, and each draw deletes k distinct blocks.
    assert resnet["random"]["deleted"] == plain["random"]["deleted"]
    assert all(len(set(s)) == k for k, sets in zip([2, 4, 8], resnet["random"]["deleted"], strict=True) for s in sets)
    # Neighbours that keep their shape, each block in one pair at most.
    assert resnet["swaps"]["pairs"] == [["layer1.0", "layer1.1"], ["layer2.1", "layer2.2"], ["layer3.1", "layer3.2"]]
    # The intact accuracy is the fresh model's own, on the same test images.
    subject = load_subject(model="resnet20", data_dir=data_dir, seed=0)
    x, y = real_images(subject.info, split="test", count=16, seed=0, data_dir=data_dir)
    assert resnet["baseline"] == accuracy(subject.model, x, y)
    with lesioned(subject.model, delete=["layer2.0"]):
        assert resnet["single"][3] == accuracy(subject.model, x, y)
    assert resnet["kind"] == "fresh" and not resnet["trained"]
    lines = lesion.summarize(result)
    assert lines[0].startswith("Lesion study") and lines[1].startswith("Nets studied: resnet20, plain20: FRESH")
    assert [p.name for p in lesion.plot(result, tmp_path)] == ["lesion.png"]


def test_every_accuracy_has_its_standard_error(data_dir):
    result = lesion.measure(models=("resnet20",), fresh=True, images=30, draws=3, data_dir=data_dir, seed=1)
    (net,) = result["models"]
    n = 30
    binomial = lambda p: math.sqrt(p * (1 - p) / n)  # noqa: E731 - the formula, written out
    assert net["baseline_se"] == pytest.approx(binomial(net["baseline"]))
    assert net["single_se"] == pytest.approx([binomial(p) for p in net["single"]])
    assert net["swaps"]["se"] == pytest.approx([binomial(p) for p in net["swaps"]["accuracy"]])
    # The mean over the single deletions, and its drop from the intact net, with their errors over the images:
    # recomputed here from each lesion's per-image correctness.
    subject = load_subject(model="resnet20", data_dir=data_dir, seed=1)
    x, y = real_images(subject.info, split="test", count=n, seed=1, data_dir=data_dir)
    with torch.no_grad():
        intact = (subject.model(x).argmax(1) == y).double()
        rows = []
        for name in net["blocks"]:
            with lesioned(subject.model, delete=[name]):
                rows.append((subject.model(x).argmax(1) == y).double())
    per_image = torch.stack(rows).mean(0)
    mean = net["single_mean"]
    assert mean["accuracy"] == pytest.approx(per_image.mean().item())
    assert mean["se"] == pytest.approx(per_image.std().item() / math.sqrt(n))
    assert mean["drop"] == pytest.approx(net["baseline"] - per_image.mean().item())
    assert mean["drop_se"] == pytest.approx((intact - per_image).std().item() / math.sqrt(n))
    random = net["random"]
    assert random["mean"] == pytest.approx([sum(a) / 3 for a in random["accuracy"]])
    assert random["se_draws"] == pytest.approx([statistics.stdev(a) / math.sqrt(3) for a in random["accuracy"]])


def test_shipped_trained_nets_are_the_default(shipped):
    result = lesion.measure(images=8, draws=1, data_dir=shipped)
    assert [net["label"] for net in result["models"]] == ["resnet56", "plain56"]
    assert all(net["kind"] == "shipped" and net["trained"] for net in result["models"])
    assert "the reference weights shipped with reslab" in lesion.summarize(result)[1]


def test_bad_options_are_one_sentence_errors(data_dir):
    with pytest.raises(ReslabError, match="--images"):
        lesion.measure(images=0, data_dir=data_dir)
    with pytest.raises(ReslabError, match="--draws"):
        lesion.measure(draws=0, data_dir=data_dir)
