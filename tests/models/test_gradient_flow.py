"""Why shortcuts matter, measured: the stem's gradient in a deep plain net explodes, in its residual twin not."""

import pytest
import torch

from reslab import create_model


def stem_gradient_norm(name: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = create_model(name)  # training mode: BN uses batch statistics, as in training
    model(torch.randn(8, 3, 32, 32)).logsumexp(dim=1).mean().backward()
    return model.conv1.weight.grad.norm().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deep_plain_net_gradient_explodes_and_residual_twin_does_not(seed):
    plain, residual = stem_gradient_norm("plain110", seed), stem_gradient_norm("resnet110", seed)
    # README quotes these: plain110 ~3e6, resnet110 ~3.5-7.4, plain20 ~0.5 at seeds 0-2.
    assert 1e6 < plain < 1e7
    assert 1 < residual < 10
    assert stem_gradient_norm("plain20", seed) < 1  # shallow plain nets are fine: the problem is depth
