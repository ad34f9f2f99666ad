"""A small model trained by ``reslab train`` on the real Fashion-MNIST (its recipe and command are in
fixtures/resnet8_w8.yaml), and the real test set to check the deployment copies against it."""

import shutil
from pathlib import Path

import pytest
import torch

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
    from reslab.train.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(checkpoint_path)
    return ckpt, model_from_checkpoint(ckpt)


@pytest.fixture(scope="session")
def fashion_test(trained):
    """The 10,000 real Fashion-MNIST test images, normalized as in training, in batches of 1,000, and labels."""
    from reslab.data import TensorBatchLoader, load_dataset
    from reslab.errors import ReslabError
    from reslab.inference import _info

    try:
        bundle = load_dataset("fashion-mnist", val_ratio=0.0, download=False)
    except ReslabError as err:
        pytest.skip(f"Fashion-MNIST is not installed here (make fashion-mnist): {err}")
    loader = TensorBatchLoader(bundle.test, _info(trained[0]), batch_size=1000, train=False, device=torch.device("cpu"))
    batches = [(x.contiguous(), y) for x, y in loader]
    return [x for x, _ in batches], torch.cat([y for _, y in batches])


@pytest.fixture(scope="session")
def reference_logits(trained, fashion_test):
    """The eager fp32 model's logits on the test set: what every deployment copy is compared to."""
    _, model = trained
    with torch.no_grad():
        return torch.cat([model(x) for x in fashion_test[0]])
