"""The loss landscape (Li et al. 2018): the origin is the model's own loss, directions are filter-normalized
with BN and bias entries at zero, the same for twin nets, and the weights come back bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.errors import ReslabError
from reslab.explain import landscape
from reslab.explain.common import load_subject, real_images
from reslab.explain.landscape import _coordinates, _directions, _displaced, _losses
from reslab.models import create_model
from tests.data.fixtures import write_mnist_like


def _tiny(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, in_chans=1, layers=[1, 1, 1]).eval()


def test_each_filter_of_a_direction_has_its_weights_filter_norm():
    model = _tiny("resnet20")
    for direction in _directions(model, seed=3):
        for name, p in model.named_parameters():
            d = direction[name]
            assert d.shape == p.shape
            if p.dim() > 1:  # conv and linear weights: one norm per output filter
                torch.testing.assert_close(
                    d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5, atol=1e-5
                )
            else:  # BN weights and biases, the classifier's bias
                assert not d.any(), name
    bn_and_bias = [n for n, p in model.named_parameters() if p.dim() == 1]
    assert "bn1.weight" in bn_and_bias and "layer1.0.bn2.bias" in bn_and_bias and "fc.bias" in bn_and_bias


def test_twin_nets_get_the_same_directions_and_the_two_directions_differ():
    resnet, plain = _tiny("resnet20", seed=1), _tiny("plain20", seed=2)  # different weights, same shapes
    d1, d2 = _directions(resnet, seed=0)
    e1, e2 = _directions(plain, seed=0)
    unit = lambda d: d.flatten(1) / d.flatten(1).norm(dim=1, keepdim=True)  # noqa: E731 - the draw before scaling
    weights = [n for n, p in resnet.named_parameters() if p.dim() > 1]
    for name in weights:
        torch.testing.assert_close(unit(d1[name]), unit(e1[name]))
        torch.testing.assert_close(unit(d2[name]), unit(e2[name]))
        assert not torch.allclose(unit(d1[name]), unit(d2[name]))
    assert not torch.equal(d1["conv1.weight"], e1["conv1.weight"])  # each scaled by its own net's filter norms


def test_weights_are_restored_bit_exactly_even_on_error():
    model = _tiny("resnet20")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = _directions(model, seed=0)
    x, y = torch.randn(6, 1, 12, 12), torch.arange(6)
    with _displaced(model, d1, d2) as move:
        for a, b in [(0.3, -0.7), (1.0, 1.0), (-0.1, 0.05)]:
            move(a, b)
            _losses(model, x, y)
        assert not torch.equal(model.conv1.weight, state["conv1.weight"])  # it did move
        assert torch.equal(model.bn1.weight, state["bn1.weight"])  # BN has a zero direction
    with pytest.raises(RuntimeError), _displaced(model, d1, d2) as move:
        move(0.5, 0.5)
        raise RuntimeError("inside")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_coordinates_hit_zero_exactly():
    assert _coordinates(41, 1.0)[20] == 0.0 and _coordinates(21, 0.5)[10] == 0.0
    assert _coordinates(5, 2.0) == [-2.0, -1.0, 0.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_mnist_like(tmp_path_factory.mktemp("fmnist"), n_train=100, n_test=20))


def test_landscape_at_the_origin_is_the_models_training_loss(data_dir, tmp_path):
    result = landscape.measure(
        models=("resnet20", "plain20"), fresh=True, images=12, grid_images=6, points=5, grid=3, data_dir=data_dir
    )
    assert result["split"] == "train" and result["images"] == 12 and result["grid_images"] == 6
    for net in result["models"]:
        # The model's own loss on the same fixed training images, computed without the landscape's code.
        subject = load_subject(model=net["label"], data_dir=data_dir, seed=0)
        x, y = real_images(subject.info, split="train", count=12, seed=0, data_dir=data_dir)
        with torch.no_grad():
            losses = F.cross_entropy(subject.model(x), y, reduction="none")
            on_grid = F.cross_entropy(subject.model(x[:6]), y[:6]).item()
        expected = losses.mean().item()
        assert net["origin"]["loss"] == pytest.approx(expected, abs=1e-6)
        assert net["origin"]["loss_se"] == pytest.approx(losses.std().item() / 12**0.5, rel=1e-5)
        assert net["line"]["alpha"][2] == 0.0 and net["line"]["loss"][2] == pytest.approx(expected, abs=1e-6)
        assert net["surface"]["loss"][1][1] == pytest.approx(on_grid, abs=1e-6)  # the first grid_images
        # Moving by a whole filter norm changes the loss (the directions are not zero).
        assert net["line"]["loss"][0] != pytest.approx(expected, abs=1e-3)
    assert len(result["models"][0]["surface"]["loss"]) == 3 and len(result["models"][0]["line"]["loss"]) == 5
    # Plain minus residual at -1, -0.5, 0, 0.5, 1, paired over the same images; at 0 the two origins.
    comparisons = result["comparisons"]
    assert [c["at"] for c in comparisons] == [-1.0, -0.5, 0.0, 0.5, 1.0] and all(c["paired"] for c in comparisons)
    resnet, plain = result["models"]
    assert comparisons[2]["difference"] == pytest.approx(plain["origin"]["loss"] - resnet["origin"]["loss"])
    assert [p.name for p in landscape.plot(result, tmp_path)] == ["landscape_1d.png", "landscape_2d.png"]
    lines = landscape.summarize(result)
    assert len(lines) == 5 and lines[1].startswith("Nets studied: resnet20, plain20: FRESH")
    assert lines[-1].startswith("plain20 minus resnet20 loss along d1 at -1: ")


def test_shipped_nets_are_the_default_on_the_images_they_trained_on(shipped):
    result = landscape.measure(images=100, grid_images=2, points=3, grid=3, data_dir=shipped)
    assert [n["label"] for n in result["models"]] == ["resnet56", "plain56"]
    assert all(n["kind"] == "shipped" for n in result["models"])
    assert result["images"] == 60  # the training subset the shipped nets were trained on (conftest)


@pytest.mark.parametrize("option", [dict(images=1), dict(grid_images=0), dict(points=1), dict(grid=2), dict(span=0.0)])
def test_bad_options_are_one_sentence_errors(option, data_dir):
    with pytest.raises(ReslabError):
        landscape.measure(data_dir=data_dir, **option)
