"""reslab's v1.5 ImageNet models are torchvision's, parameter for parameter and logit for logit."""

import pytest
import torch
import torchvision

from reslab import create_model

PARITY_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"]


def _randomize_(model: torch.nn.Module) -> None:
    """Give every parameter and BN statistic a distinct value, so a swapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.ndim == 1:  # BN scale
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.25)
            else:
                t.mul_(torch.rand(t.shape, generator=g) + 0.5)


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_loads_torchvision_state_dict_and_matches_logits(name):
    reference = getattr(torchvision.models, name)()
    _randomize_(reference)
    model = create_model(name)
    assert list(model.state_dict()) == list(reference.state_dict())  # same names, same order
    model.load_state_dict(reference.state_dict())  # strict: unchanged
    model.eval(), reference.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.argmax() == theirs.argmax()
