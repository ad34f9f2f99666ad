"""`reslab explain responses`: the std of each 3x3 layer's response (He et al. 2015, Fig. 7)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from reslab.errors import ReslabError
from reslab.explain import responses
from reslab.explain.common import load_subject, load_subjects, real_images, residual_blocks
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
    result = responses.measure(models=("plain20", "resnet20"), fresh=True, images=30, data_dir=data_dir, seed=1)

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
        assert len(measured["std_se"]) == len(std) and all(
            0 < se < 0.5 * s for se, s in zip(measured["std_se"], std, strict=True)
        )
        low, high = measured["mean_std_interval"]
        assert low < measured["mean_std"] < high and measured["mean_std_se"] > 0


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


def _result(means: dict[str, float], comparisons: list[dict] | None = None) -> dict:
    models = {}
    for label, mean in means.items():
        std = [mean * 0.5, mean * 1.5]
        models[label] = dict(
            label=label,
            source="runs/x/best.pt",
            kind="checkpoint",
            trained=True,
            dataset="fashion-mnist",
            images=10,
            depth=int(label.removeprefix("plain").removeprefix("resnet")),
            residual=label.startswith("resnet"),
            layers=["a", "b"],
            std=std,
            std_se=[0.01, 0.01],
            std_sorted=sorted(std, reverse=True),
            std_per_channel=std,
            mean_std=mean,
            mean_std_se=0.01,
            mean_std_interval=[mean - 0.02, mean + 0.02],
        )
    return dict(definition="std", seed=0, models=models, comparisons=comparisons or [])


def test_comparisons_follow_the_paper_and_their_bootstrap_intervals():
    models = _result({"plain20": 1.0, "plain56": 1.2, "resnet20": 0.6, "resnet56": 0.4})["models"]
    boot = {label: torch.full((100,), m["mean_std"], dtype=torch.float64) for label, m in models.items()}
    boot["resnet56"] = boot["resnet56"] + torch.linspace(-0.3, 0.3, 100, dtype=torch.float64)  # a wide one
    found = {(c["first"], c["second"]): c for c in responses._comparisons(models, boot)}
    assert list(found) == [("resnet20", "plain20"), ("resnet56", "plain56"), ("resnet56", "resnet20")]
    assert found[("resnet20", "plain20")]["verdict"] == "agrees"
    assert found[("resnet20", "plain20")]["difference"] == pytest.approx(-0.4)
    assert found[("resnet56", "plain56")]["verdict"] == "agrees"  # -0.8 +- 0.3 stays below 0
    assert found[("resnet56", "resnet20")]["verdict"] == "within the uncertainty"  # -0.2 +- 0.3 straddles 0
    low, high = found[("resnet56", "resnet20")]["interval"]
    assert low == pytest.approx(-0.2 - 0.3 * 0.95, abs=0.01) and high == pytest.approx(-0.2 + 0.3 * 0.95, abs=0.01)


def test_a_bootstrap_resample_is_the_std_of_the_images_it_draws(data_dir):
    (subject,) = load_subjects(["resnet20"], fresh=True, data_dir=data_dir)
    x, _ = real_images(subject.info, split="test", count=12, seed=0, data_dir=data_dir)
    _, moments = responses._responses(subject.model, x)
    index = torch.tensor([[0, 0, 3, 5, 5, 5, 11, 2, 2, 7, 1, 0]])  # with repeats, as a resample has
    outputs = []
    hook = subject.model.layer1[0].bn1.register_forward_hook(lambda _m, _i, out: outputs.append(out.double()))
    with torch.no_grad():
        subject.model(x[index[0]])
    hook.remove()
    assert moments[0].std(index).item() == pytest.approx(outputs[0].std().item(), rel=1e-6)  # float32 sums
    assert moments[0].std() == pytest.approx(moments[0].std(torch.arange(12)[None]).item(), rel=1e-12)


def test_summary_says_whether_the_numbers_agree_with_the_paper(tmp_path):
    comparisons = [
        dict(first="resnet20", second="plain20", claim="depth 20: ResNet responds less than plain",
             difference=-0.4, se=0.01, interval=[-0.42, -0.38], verdict="agrees"),
        dict(first="resnet56", second="resnet20", claim="the deeper ResNet responds less",
             difference=0.1, se=0.01, interval=[0.08, 0.12], verdict="disagrees"),
    ]  # fmt: skip
    lines = responses.summarize(_result({"plain20": 1.0, "resnet20": 0.6, "resnet56": 0.7}, comparisons))
    assert "resnet20: 2 layers, mean std 0.600 +- 0.010 [0.580, 0.620] (per channel 0.600), largest 0.900" in lines
    assert (
        "depth 20: ResNet responds less than plain: resnet20 - plain20 = -0.400 +- 0.010 [-0.420, -0.380]: agrees"
        in lines
    )
    assert "the deeper ResNet responds less: resnet56 - resnet20 = +0.100 +- 0.010 [+0.080, +0.120]: disagrees" in lines
    assert (
        lines[1]
        == "Nets studied: trained checkpoints: "
        + ", ".join(f"{m} (runs/x/best.pt)" for m in ("plain20", "resnet20", "resnet56"))
        + "."
    )
    (png,) = responses.plot(_result({"plain20": 1.0, "resnet20": 0.6}), tmp_path)
    assert Image.open(png).size == (800, 700)  # small enough for the README


def test_shipped_trained_nets_are_the_default(shipped):
    result = responses.measure(images=6, data_dir=shipped)
    assert list(result["models"]) == list(responses.DEFAULT_MODELS)
    assert {m["kind"] for m in result["models"].values()} == {"shipped"}
    assert len(result["comparisons"]) == 3 and "Untrained" not in " ".join(responses.summarize(result))


def test_too_few_images_is_one_sentence():
    with pytest.raises(ReslabError, match="at least 2"):
        responses.measure(images=1)
