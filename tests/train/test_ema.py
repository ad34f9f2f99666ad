"""The weight average: its definition on a tiny model, and its use in place of the weights when it validates better."""

import torch
from torch import nn

from reslab.checkpoint import load_checkpoint
from reslab.train import fit
from reslab.train import state as state_module
from reslab.train import trainer as trainer_module
from reslab.train.ema import ModelEma


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def test_the_average_is_its_definition_step_by_step():
    torch.manual_seed(0)
    model = _tiny()
    ema = ModelEma(model, decay=0.9)
    expected = {k: v.clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for t in range(30):
        model(torch.randn(8, 1, 6, 6)).square().mean().backward()  # train mode: BN statistics move too
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))  # the warmed-up decay of update t
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = d * expected[key] + (1 - d) * value.double()
    averaged = ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(averaged[key].double(), value, rtol=1e-5, atol=1e-6)
    assert ema.decay_at(0) == 0.1 and ema.decay_at(1000) == 0.9 and ema.updates == 30
    # Integer buffers are copied, not averaged; the average is never trained itself.
    assert int(averaged["1.num_batches_tracked"]) == 30
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_a_saved_average_resumes_exactly():
    torch.manual_seed(0)
    model = _tiny()
    ema = ModelEma(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
    clone = ModelEma(_tiny(), decay=0.99)
    clone.load_state_dict(ema.state_dict())
    assert clone.updates == 3
    for a, b in zip(clone.module.state_dict().values(), ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_average_replaces_the_weights_where_it_validates_better(tiny_config, monkeypatch):
    """The validation scores of the average are made higher: best.pt then holds the average, not the weights."""
    real = trainer_module.evaluate

    def average_wins(model, batches, **kwargs):
        result = real(model, batches, **kwargs)
        if getattr(model, "is_average", False):  # validation of the average (the test set scores the weights)
            result.accuracy += 0.5
        return result

    monkeypatch.setattr(trainer_module, "evaluate", average_wins)
    monkeypatch.setattr(state_module, "ModelEma", _MarkedEma)
    cfg = tiny_config(epochs=2, ema_decay=0.9)
    results = fit(cfg)
    assert results["best_weights"] == "ema"
    last, best = load_checkpoint(cfg.run_dir() / "last.pt"), load_checkpoint(cfg.run_dir() / "best.pt")
    assert all("val_acc_ema" in r for r in last["history"]) and last["ema"]["updates"] == 2 * 15
    for key, value in last["ema"]["module"].items():
        assert torch.equal(best["model"][key], value), key  # the average of the last epoch, the best one
    assert best["best"]["weights"] == "ema"


class _MarkedEma(ModelEma):
    def __init__(self, model, decay):
        super().__init__(model, decay)
        self.module.is_average = True
