import dataclasses
from pathlib import Path

import pytest
import torch

from reslab.data import DatasetInfo
from reslab.train import TrainConfig
from reslab.train.checkpoint import FORMAT


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP's spin-waiting
    # made these tests about 10x slower with two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_checkpoint(path: Path, model, info: DatasetInfo, **config) -> Path:
    """A reslab checkpoint of ``model`` as `reslab train` writes it (the fields explain reads), without training."""
    cfg = TrainConfig(model=model.name, **config)
    ckpt = {
        "format": FORMAT,
        "model_name": cfg.model,
        "model_config": model.config,
        "dataset": dataclasses.asdict(info),
        "config": cfg.to_dict(),
        "model": model.state_dict(),
    }
    torch.save(ckpt, path)
    return path
