import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.models import create_model
from reslab.train.divergence import diagnose, nonfinite_entries


def tiny_model(**overrides) -> nn.Module:
    """A ResNet-8 for 1-channel images: one block per stage, shortcut A between stages."""
    return create_model("resnet20", num_classes=10, in_chans=1, layers=[1, 1, 1], **overrides)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 8, 8), torch.randint(0, 10, (n,))


class GradBomb(nn.Module):
    """Identity in the forward, NaN in the backward: d sqrt(u) / du is infinite at u = 0, and inf - inf = NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sqrt(x - x)


class Gate(nn.Module):
    """Identity in the forward with a parameter whose gradient is infinite: x + x * sqrt(gate) at gate = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * torch.sqrt(self.gate)


def poison(model: nn.Module, name: str) -> None:
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = float("nan")


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize(
    ("param", "layer", "module_type"),
    [
        ("conv1.weight", "conv1", "Conv2d"),
        ("layer2.0.conv2.weight", "layer2.0.conv2", "Conv2d"),
        ("layer1.0.bn2.bias", "layer1.0.bn2", "BatchNorm2d"),
        ("fc.weight", "fc", "Linear"),
    ],
)
def test_a_nan_weight_is_found_in_the_module_that_holds_it(param, layer, module_type, amp_dtype):
    model = tiny_model()
    poison(model, param)
    result = diagnose(model, *batch(), F.cross_entropy, amp_dtype=amp_dtype)
    assert (result.kind, result.layer, result.module_type) == ("output", layer, module_type)
    assert result.message == f"the output of {layer} ({module_type}) went non-finite first"


@pytest.mark.parametrize(
    "overrides", [{"version": "v2"}, {"block": "bottleneck", "shortcut": "B"}, {"residual": False}]
)
def test_other_block_forms_are_diagnosed_too(overrides):
    # Pre-activation blocks use ReLU(inplace=False), bottlenecks a projection shortcut, plain nets none.
    model = tiny_model(**overrides)
    poison(model, "layer2.0.conv2.weight")
    result = diagnose(model, *batch(), F.cross_entropy)
    assert (result.kind, result.layer) == ("output", "layer2.0.conv2")


def test_non_finite_images_are_blamed_before_any_layer():
    images, labels = batch()
    images[2, 0, 3, 3] = float("inf")
    images[5, 0, 0, 0] = float("nan")
    result = diagnose(tiny_model(), images, labels, F.cross_entropy)
    assert (result.kind, result.layer) == ("input", None)
    assert "2 of 512 values" in result.detail
    assert result.message.startswith("the input images hold non-finite values")


def test_a_finite_but_exploding_step_reports_the_loss():
    model = tiny_model()
    with torch.no_grad():
        model.fc.weight.mul_(1e12)
    result = diagnose(model, *batch(), F.cross_entropy)
    assert result.kind == "loss"
    assert result.layer is None
    assert result.loss > 1e9
    assert result.message == f"every output and gradient is finite; the loss itself is {result.loss:.3g}"
    # Below the trainer's limit, a finite replay is no finding at all.
    calm = diagnose(tiny_model(), *batch(), F.cross_entropy, max_loss=100.0)
    assert calm.kind is None and 0 < calm.loss < 100


def test_a_gradient_that_goes_nan_in_the_backward_names_the_module_that_made_it():
    # On the shortcut, whose input also feeds the residual branch: only the shortcut's gradient goes bad.
    model = tiny_model()
    model.layer2[0].downsample = nn.Sequential(GradBomb(), model.layer2[0].downsample)
    result = diagnose(model, *batch(), F.cross_entropy)
    assert (result.kind, result.layer, result.module_type, result.detail) == (
        "gradient",
        "layer2.0.downsample.0",
        "GradBomb",
        "input",
    )
    assert result.message.startswith("the gradient of layer2.0.downsample.0 (GradBomb) went non-finite first")


def test_a_nan_parameter_gradient_is_named_with_its_parameter():
    model = tiny_model()
    model.layer3[0].bn1 = nn.Sequential(model.layer3[0].bn1, Gate())
    result = diagnose(model, *batch(), F.cross_entropy)
    assert (result.kind, result.layer, result.module_type, result.detail) == (
        "gradient",
        "layer3.0.bn1.1",
        "Gate",
        "gate",
    )
    assert result.message == (
        "the gradient of layer3.0.bn1.1 (Gate) went non-finite first, counting from the loss (in its gate)"
    )


def test_grad_scale_replays_the_overflow_of_a_scaled_loss():
    # A GradScaler multiplies the loss before the backward; the gradients overflow where the scaled ones do.
    model = tiny_model()
    with torch.no_grad():
        model.fc.weight.mul_(1e4)
    images, labels = batch()
    assert diagnose(model, images, labels, F.cross_entropy).kind == "loss"
    result = diagnose(model, images, labels, F.cross_entropy, grad_scale=1e36)
    assert result.kind == "gradient"
    assert result.layer in dict(model.named_modules())


def test_a_loss_whose_gradient_is_nan_is_blamed_on_the_loss():
    def bad_loss(logits, labels):
        return F.cross_entropy(logits, labels) + torch.sqrt(logits - logits).sum()

    result = diagnose(tiny_model(), *batch(), bad_loss)
    assert (result.kind, result.layer, result.detail) == ("gradient", "", "output")
    assert result.message == "the loss's gradient with respect to the model's output went non-finite first"


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("case", ["clean", "nan-weight", "grad-bomb", "nan-input"])
def test_diagnose_leaves_the_model_exactly_as_it_found_it(case):
    # Drop-path draws random numbers; BN in train mode updates its running statistics: both must be undone.
    model = tiny_model(drop_path_rate=0.2)
    images, labels = batch()
    F.cross_entropy(model(images), labels).backward()  # every parameter has a .grad, as in the trainer
    model.layer1[0].bn1.eval()  # a mixed mode that model.train() alone would not restore
    if case == "nan-weight":
        poison(model, "layer3.0.conv1.weight")
    if case == "grad-bomb":
        model.layer2[0].conv2 = nn.Sequential(GradBomb(), model.layer2[0].conv2)
    if case == "nan-input":
        images[0, 0, 0, 0] = float("nan")
    before = snapshot(model)

    diagnose(model, images, labels, F.cross_entropy)

    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    for name, (grad, values) in before["grads"].items():
        assert after["grads"][name][0] is grad, name
        torch.testing.assert_close(after["grads"][name][1], values, rtol=0, atol=0)
    assert after["modes"] == before["modes"]
    assert torch.equal(after["rng"], before["rng"])
    for name, module in model.named_modules():
        hooks = [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks]
        assert not any(hooks), name
    for name, param in model.named_parameters():
        assert not param._backward_hooks, name


def test_diagnose_replays_in_train_mode_as_training_does():
    # In eval mode BatchNorm would use running statistics and could hide a failure of the batch statistics.
    model = tiny_model()
    model.eval()
    seen = []
    handle = model.fc.register_forward_hook(lambda module, args, output: seen.append(module.training))
    diagnose(model, *batch(), F.cross_entropy)
    handle.remove()
    assert seen == [True]
    assert not model.training


def test_nonfinite_entries_names_parameters_and_buffers_in_state_dict_order():
    model = tiny_model()
    assert nonfinite_entries(model) == []
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
        model.layer1[0].bn1.running_var[1] = float("inf")
    assert nonfinite_entries(model) == ["layer1.0.bn1.running_var", "fc.weight"]
