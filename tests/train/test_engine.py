"""Test-time augmentation, the step window's divergence flag, and the large-batch learning rate."""

import math

import pytest
import torch
from torch import nn

from reslab.train import TrainConfig
from reslab.train.engine import predict_logits
from reslab.train.guard import StepWindow
from reslab.train.optim import build_optimizer, scaled_lr


class _Recorder(nn.Module):
    """Logits = the top-left pixel and the pixel right of it: a model that sees exactly which view it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.views: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.views.append(x.clone())
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, 1]], dim=1)


def test_tta_views_and_their_weights():
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    model = _Recorder()
    assert torch.equal(predict_logits(model, x), model(x)[:, :])
    model.views.clear()
    logits = predict_logits(model, x, flip=True, translate=1)
    original, mirrored, down_right, down_right_mirrored, up_left, up_left_mirrored = model.views
    assert torch.equal(mirrored, x.flip(3))
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])  # moved one pixel down and right
    assert torch.equal(up_left[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # the uncovered row is the reflected one
    assert torch.equal(down_right_mirrored, down_right.flip(3)) and torch.equal(up_left_mirrored, up_left.flip(3))

    def pair(view):
        return torch.stack([view[:, 0, 0, 0], view[:, 0, 0, 1]], dim=1)

    mean = [(pair(a) + pair(b)) / 2 for a, b in ((original, mirrored), (down_right, down_right_mirrored))]
    mean.append((pair(up_left) + pair(up_left_mirrored)) / 2)
    torch.testing.assert_close(logits, (mean[0] + (mean[1] + mean[2]) / 2) / 2)  # untranslated: half the weight


def test_tta_keeps_channels_last():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    model = _Recorder()
    predict_logits(model, x, translate=2)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in model.views)


def test_the_window_flags_a_bad_step_on_the_device_and_keeps_it_flagged():
    window = StepWindow(torch.device("cpu"), max_loss=10.0)
    rng = torch.get_rng_state()
    finite = torch.ones(3)
    flags = [
        window.check(0, torch.tensor(2.0), finite, rng),
        window.check(1, torch.tensor(11.0), finite, rng),  # above max_loss
        window.check(2, torch.tensor(2.0), finite, rng),  # fine itself, but after a bad step
    ]
    assert [float(f) for f in flags] == [0.0, 1.0, 1.0]
    records = window.read()
    assert [(r.step, r.loss, r.bad) for r in records] == [(0, 2.0, False), (1, 11.0, True), (2, 2.0, False)]
    assert len(window) == 0 and window.read() == []
    window.check(3, torch.tensor(1.0), torch.tensor([1.0, math.inf]), rng)  # a non-finite gradient
    window.check(4, torch.tensor(math.nan), None, rng)  # gradients unchecked (fp16): the loss still is
    assert [r.bad for r in window.read()] == [True, True]


def test_the_fused_optimizer_skips_a_flagged_step():
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, TrainConfig(lr=0.1), torch.device("cpu"))
    assert optimizer.defaults["fused"]
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert torch.equal(model.weight, before)
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    assert not torch.equal(model.weight, before)


def test_large_batch_lr_scales_linearly_with_the_global_batch():
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=1024)) == 0.1  # no reference batch: as given
    cfg = TrainConfig(lr=0.1, batch_size=1024, lr_reference_batch=256)
    assert scaled_lr(cfg) == pytest.approx(0.4) and scaled_lr(cfg, world_size=2) == pytest.approx(0.8)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg, torch.device("cpu"), world_size=2)
    assert all(group["lr"] == pytest.approx(0.8) for group in optimizer.param_groups)
