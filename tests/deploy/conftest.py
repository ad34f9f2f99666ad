"""A small model trained by ``reslab train`` on the real Fashion-MNIST (its recipe and command are in
fixtures/resnet8_w8.yaml): the deployment copies are checked against it on the real test set."""

import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "resnet8_w8.pt"


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory):
    """A copy of the trained checkpoint in its own folder (commands write next to it)."""
    path = tmp_path_factory.mktemp("trained") / "best.pt"
    shutil.copy(FIXTURE, path)
    return path


@pytest.fixture(scope="session")
def trained(checkpoint_path):
    """(checkpoint dict, eval-mode model) of the fixture."""
    from reslab.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint_path)
    return ckpt, model_from_checkpoint(ckpt)
