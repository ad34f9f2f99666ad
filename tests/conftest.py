import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def signal_at_step(monkeypatch):
    """``signal_at_step(n, signum)``: the process sends itself ``signum`` during its n-th training step (1-based),
    as a scheduler's SIGTERM or a user's Ctrl-C would arrive; ``signal_at_step(None)`` stops sending."""
    import signal

    from reslab.train import trainer as trainer_module

    real = trainer_module.optimizer_step
    calls = {"n": 0, "at": None, "signum": signal.SIGTERM}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            signal.raise_signal(calls["signum"])
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "optimizer_step", step)

    def arm(n, signum=signal.SIGTERM):
        calls.update(n=0, at=n, signum=signum)

    return arm


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The image-folder check's cache (reslab.data.verify) goes to the test's folder, never to ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
