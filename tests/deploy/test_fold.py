"""BatchNorm folding: same outputs after real training steps, for v1, v1.5, v2 and plain nets, and which stay."""

import pytest
import torch
from torch import nn

from reslab.deploy import fold_bn, fold_plan
from reslab.models import PreActBasicBlock, PreActBottleneck, create_model

NARROW_IMAGENET = dict(layers=[1, 1, 1, 1], widths=[8, 16, 32, 64], num_classes=10)
NARROW_CIFAR = dict(layers=[1, 1, 1], widths=[8, 16, 32], num_classes=10)
CASES = {
    "v1 CIFAR basic, zero-pad shortcuts": ("resnet20", NARROW_CIFAR, 16),
    "v1 bottleneck, projection shortcuts": ("resnet50_v1", NARROW_IMAGENET, 64),
    "v1.5 bottleneck": ("resnet50", NARROW_IMAGENET, 64),
    "v1.5 basic": ("resnet18", NARROW_IMAGENET, 64),
    "v2 pre-activation bottleneck": ("preact_resnet50", NARROW_IMAGENET, 64),
    "v2 pre-activation CIFAR": ("preact_resnet110", dict(layers=[1, 1, 1], widths=[4, 8, 16]), 16),
    "plain twin": ("plain20", NARROW_CIFAR, 16),
}


def _trained_a_little(name: str, args: dict, size: int) -> tuple[nn.Module, torch.Tensor]:
    """A model after 3 SGD steps (BatchNorm's affine weights moved, its running statistics updated), with
    the running statistics then spread further, as after a long training, so that no fold is trivial."""
    model = create_model(name, **args)
    x = torch.randn(16, 3, size, size) * 2 + 0.5
    y = torch.randint(0, model.fc.out_features, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    _spread_statistics(model)
    return model.eval(), x


def _spread_statistics(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.5, 2))


@pytest.mark.parametrize("case", CASES)
def test_folded_copy_matches_after_training_steps(case):
    name, args, size = CASES[case]
    model, x = _trained_a_little(name, args, size)
    bn_before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_bn(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    plan = fold_plan(model)
    assert sorted(remaining) == sorted(plan.kept) and len(plan.folded) + len(plan.kept) == bn_before
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn_before  # the original is untouched
    if model.config["version"] != "v2":
        assert remaining == []
    else:  # each block's pre-activation BN reads the block's input (a sum); final_bn reads the last sum
        blocks = [n for n, m in model.named_modules() if isinstance(m, (PreActBasicBlock, PreActBottleneck))]
        assert sorted(remaining) == sorted([f"{b}.bn1" for b in blocks] + ["final_bn"])
        reasons = ("a residual sum", "the identity path", "from MaxPool2d")  # MaxPool2d: the ImageNet stem's last op
        assert all(any(r in why for r in reasons) for why in plan.kept.values()), plan.kept


def test_folds_torchvision_models_too():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    _spread_statistics(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    folded = fold_bn(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_bn(create_model("resnet20", **NARROW_CIFAR))


def test_a_module_called_twice_is_not_folded():
    """One conv applied to two inputs (weight sharing): folding its BN into it would change the other call."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x.flip(3))

    model = Shared()
    _spread_statistics(model)
    plan = fold_plan(model.eval())
    assert plan.folded == [] and "called more than once" in plan.kept["bn"]
