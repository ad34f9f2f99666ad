"""`reslab explain gradients`: the stem gradient of plain vs residual nets, and eq. 5's split of dL/dx."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.explain import gradients, gradients_probe
from reslab.explain.common import dataset_info, real_images
from reslab.models import create_model
from tests.data.fixtures import write_mnist_like


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(write_mnist_like(tmp_path_factory.mktemp("fashion"), n_train=64, n_test=16))


def test_stem_gradient_of_plain56_is_far_from_resnet56_at_init(data_dir):
    # Real depth (56 layers), few small images. With BatchNorm the plain net's gradient explodes toward the
    # input: over seeds 0-4 the stem conv1 weight gradient of plain-56 was 200-470x resnet-56's here, and
    # 130-330x on real Fashion-MNIST batches of 8. 50x leaves room for any seed.
    result = gradients.measure(depths=(56,), steps=0, batch_size=8, probes=1, fresh=True, data_dir=data_dir, seed=0)
    models = result["groups"]["fresh"]["models"]
    plain, res = models["plain56"]["init"], models["resnet56"]["init"]
    assert plain["stem_weight_grad"] / res["stem_weight_grad"] > 50
    assert plain["stem_output_grad"] / res["stem_output_grad"] > 50
    # The plain net's gradient grows block after block toward the input; the ResNet's far less.
    assert gradients._growth(plain) > 100 * gradients._growth(res)
    assert models["plain56"]["trained"] is None  # steps=0: at initialization only
    assert len(plain["block_input_grad"]) == 27 and len(plain["weight_grad"]) == 56


def test_norms_match_a_direct_autograd_computation(data_dir):
    # The same seeded tiny ResNet, one plain forward/backward with the stem output's gradient retained.
    result = gradients.measure(depths=(8,), steps=1, batch_size=4, probes=1, fresh=True, data_dir=data_dir, seed=3)
    info = dataset_info("fashion-mnist", data_dir)
    x, y = real_images(info, split="train", count=8, seed=3, data_dir=data_dir)
    torch.manual_seed(3)
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1]).train()
    stem = model.forward_stem(x[:4])
    stem.retain_grad()
    h = stem
    for stage in model.stages():
        h = stage(h)
    F.cross_entropy(model.forward_head(h), y[:4]).backward()
    init = result["groups"]["fresh"]["models"]["resnet8"]["init"]
    assert init["stem_output_grad"] == pytest.approx(stem.grad.norm().item(), rel=1e-5)
    assert init["stem_weight_grad"] == pytest.approx(model.conv1.weight.grad.norm().item(), rel=1e-5)
    assert init["weight_grad"][-1] == pytest.approx(model.fc.weight.grad.norm().item(), rel=1e-5)


def test_skip_and_residual_split_sums_to_autograd_gradient(data_dir):
    result = gradients.measure(depths=(8,), steps=1, batch_size=4, probes=2, fresh=True, data_dir=data_dir, seed=0)
    for name, model in result["groups"]["fresh"]["models"].items():
        for state in ("init", "trained"):
            numbers = model[state]
            assert numbers["split_error"] < 1e-6, (name, state)
            if not model["residual"]:  # a plain block has only the branch
                assert numbers["skip_grad"] == [0.0] * 3
                assert numbers["branch_grad"] == pytest.approx(numbers["block_input_grad"], rel=1e-6)


@pytest.mark.parametrize("stage", [0, 1], ids=["identity", "option-A downsampling"])
def test_split_of_one_block_in_float64(stage):
    # Eq. 5: the shortcut carries the gradient at the sum (dL/dy masked by the v1 ReLU) back to x unchanged
    # (identity), or subsampled into the input's channels (option A's zero padding has no gradient).
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1]).double().train()
    block = model.stages()[stage][0]
    x = torch.randn(3, block.conv1.in_channels, 8, 8, dtype=torch.float64, requires_grad=True)
    branch, identity = block.paths(x)
    y = block.merge(branch.clone(), identity)
    upstream = torch.randn_like(y)
    (total,) = torch.autograd.grad(y, x, upstream, retain_graph=True)
    at_sum = upstream * (y > 0)
    through_skip, through_branch = gradients_probe.split(x, branch, identity, at_sum)
    if stage == 0:
        expected_skip = at_sum
    else:
        expected_skip = torch.zeros_like(x)
        expected_skip[:, :, ::2, ::2] = at_sum[:, : x.shape[1]]
    assert torch.equal(through_skip, expected_skip)
    torch.testing.assert_close(through_skip + through_branch, total, rtol=1e-12, atol=1e-12)


def test_plain_twin_starts_from_the_resnet_weights():
    torch.manual_seed(5)
    plain = create_model("plain20", num_classes=10, in_chans=1, layers=[2, 2, 2]).state_dict()
    torch.manual_seed(5)
    res = create_model("resnet20", num_classes=10, in_chans=1, layers=[2, 2, 2]).state_dict()
    assert plain.keys() == res.keys()
    assert all(torch.equal(plain[k], res[k]) for k in plain)


@pytest.mark.parametrize(
    "options",
    [dict(depths=(21,)), dict(depths=(56,), steps=-1), dict(depths=(56,), batch_size=1), dict(probes=0)],
)
def test_bad_options_are_one_sentence(options, data_dir):
    with pytest.raises(ReslabError):
        gradients.measure(data_dir=data_dir, **options)


def test_trained_twins_are_measured_at_their_own_weights(data_dir, tmp_path):
    from tests.explain.conftest import save_checkpoint

    info = dataset_info("fashion-mnist", data_dir)
    paths = []
    for name in ("plain20", "resnet20"):
        model = create_model(name, num_classes=10, in_chans=1)
        paths.append(str(save_checkpoint(tmp_path / f"{name}.pt", model, info)))
    result = gradients.measure(checkpoints=paths, steps=1, batch_size=4, probes=1, data_dir=data_dir)
    (group,) = result["groups"].values()
    assert group["start"] == "the checkpoints' weights" and set(group["models"]) == {"plain20", "resnet20"}
    assert "depth 20 at the checkpoints' weights" in "\n".join(gradients.summarize(result))
    with pytest.raises(ReslabError, match="plain/ResNet twins"):
        gradients.measure(checkpoints=paths[:1], steps=0, batch_size=4, data_dir=data_dir)


def test_by_default_fresh_nets_and_the_shipped_trained_twins_with_a_range_over_batches(shipped, tmp_path):
    result = gradients.measure(depths=(8,), steps=1, batch_size=4, probes=3, data_dir=shipped)
    fresh, trained = result["groups"]["fresh"], result["groups"]["shipped"]
    assert fresh["start"] == "initialization" and fresh["steps"] == 1
    assert trained["start"] == "the shipped trained weights" and trained["steps"] == 0
    assert set(trained["models"]) == {"plain20", "resnet20", "plain56", "resnet56"}
    assert {n["kind"] for n in trained["nets"]} == {"shipped"}
    for model in [*fresh["models"].values(), *trained["models"].values()]:
        probes = model["init_probes"]
        assert all(len(v) == 3 for v in probes.values())
        assert probes["stem_weight_grad"][0] == model["init"]["stem_weight_grad"]  # the first batch in full
        assert len(set(probes["loss"])) == 3  # three different batches
    lines = gradients.summarize(result)
    assert "FRESH, untrained" in lines[1] and "the reference weights shipped with reslab" in lines[1]
    assert any(line.startswith("depth 8 at the shipped trained weights: stem conv1") for line in lines)
    assert "[" in lines[2] and ".." in lines[2]  # the first batch's value, then the range over all of them
    (png,) = gradients.plot(result, tmp_path)
    assert png.stat().st_size > 10_000
