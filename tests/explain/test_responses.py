"""`reslab explain responses`: the std of each 3x3 layer's response (He et al. 2015, Fig. 7)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from reslab.errors import ReslabError
from reslab.explain import responses
from reslab.explain.common import load_subject, real_images, residual_blocks
from reslab.models import create_model
from tests.data.fixtures import write_mnist_like


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(write_mnist_like(tmp_path_factory.mktemp("fashion"), n_train=40, n_test=30))


def _tiny_subjects(data_dir: str) -> list:
    """A tiny plain and residual net with BN running statistics unlike train mode's, left in train mode."""
    subjects = []
    for i, name in enumerate(("plain20", "resnet20")):
        subject = load_subject(model=name, dataset="fashion-mnist", data_dir=data_dir, seed=i, layers=[1, 2, 1])
        generator = torch.Generator().manual_seed(i)
        for m in subject.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
        subjects.append(subject)
        subject.model.train()
    return subjects


def _direct_std(model, x) -> tuple[list[float], list[float]]:
    """Hook each block's bn1 / bn2 by hand, keep a float64 copy of the whole response, take torch.std."""
    outputs = []
    hooks = [
        bn.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().double().clone()))
        for _, block in residual_blocks(model)
        for bn in (block.bn1, block.bn2)
    ]
    model.eval()
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return [o.std().item() for o in outputs], [o.std(dim=(0, 2, 3)).mean().item() for o in outputs]


def test_std_equals_a_direct_computation_in_eval_mode(data_dir, monkeypatch):
    subjects = _tiny_subjects(data_dir)
    before = [{k: v.clone() for k, v in s.model.state_dict().items()} for s in subjects]
    monkeypatch.setattr(responses, "load_subjects", lambda *args, **kwargs: subjects)
    monkeypatch.setattr(responses, "BATCH", 7)  # 30 images in uneven batches: the merge must be exact
    result = responses.measure(models=("plain20", "resnet20"), images=30, data_dir=data_dir, seed=1)

    x, _ = real_images(subjects[0].info, split="test", count=30, seed=1, data_dir=data_dir)
    for subject, state in zip(subjects, before, strict=True):
        # Eval mode: the running statistics (and every other buffer) are exactly as they were.
        after = subject.model.state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state)
        measured = result["models"][subject.label]
        std, per_channel = _direct_std(subject.model, x)
        assert measured["std"] == pytest.approx(std, rel=1e-5)
        assert measured["std_per_channel"] == pytest.approx(per_channel, rel=1e-5)
        assert measured["std_sorted"] == sorted(measured["std"], reverse=True)
        assert measured["layers"][:2] == ["layer1.0.bn1", "layer1.0.bn2"]
        assert not measured["trained"] and measured["residual"] == subject.model.config["residual"]


@pytest.mark.parametrize("name", ["resnet20", "plain56", "resnet110", "resnet50", "preact_resnet110"])
def test_one_response_per_3x3_conv_in_the_blocks(name):
    model = create_model(name, num_classes=10)
    layers = responses._response_layers(model)
    convs = [
        m
        for _, block in residual_blocks(model)
        for m in block.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(layers) == len(convs)
    if name in ("resnet20", "plain56", "resnet110"):  # basic v1 blocks: bn1 and bn2 of each, 2 per block
        assert len(layers) == model.depth - 2
        assert all(isinstance(m, torch.nn.BatchNorm2d) for _, m in layers)


def _result(means: dict[str, float]) -> dict:
    models = {}
    for label, mean in means.items():
        std = [mean * 0.5, mean * 1.5]
        models[label] = dict(
            source="runs/x/best.pt",
            trained=True,
            dataset="fashion-mnist",
            images=10,
            depth=int(label.removeprefix("plain").removeprefix("resnet")),
            residual=label.startswith("resnet"),
            layers=["a", "b"],
            std=std,
            std_sorted=sorted(std, reverse=True),
            std_per_channel=std,
        )
    return dict(definition="std", seed=0, models=models)


def test_summary_says_whether_the_numbers_agree_with_the_paper(tmp_path):
    agree = responses.summarize(_result({"plain20": 1.0, "plain56": 1.2, "resnet20": 0.6, "resnet56": 0.4}))
    assert "depth 20: resnet20 mean std 0.600 vs plain20 1.000: agrees" in agree
    assert "depth 56: resnet56 mean std 0.400 vs plain56 1.200: agrees" in agree
    assert "deeper ResNets respond less (resnet20 0.600, resnet56 0.400): agrees" in agree
    disagree = responses.summarize(_result({"plain20": 1.0, "resnet20": 1.1, "resnet56": 1.3}))
    assert "depth 20: resnet20 mean std 1.100 vs plain20 1.000: disagrees" in disagree
    assert "deeper ResNets respond less (resnet20 1.100, resnet56 1.300): disagrees" in disagree
    (png,) = responses.plot(_result({"plain20": 1.0, "resnet20": 0.6}), tmp_path)
    assert Image.open(png).size == (800, 700)  # small enough for the README


def test_too_few_images_is_one_sentence():
    with pytest.raises(ReslabError, match="at least 2"):
        responses.measure(images=1)
