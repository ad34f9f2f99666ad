"""Training: config, engine (train_one_epoch, evaluate), checkpoints, logging, runtime and DDP, fit."""

from reslab.train.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.train.config import TrainConfig, from_dict, load_recipe
from reslab.train.engine import evaluate, train_one_epoch
from reslab.train.trainer import fit

__all__ = [
    "TrainConfig",
    "evaluate",
    "fit",
    "from_dict",
    "load_checkpoint",
    "load_recipe",
    "model_from_checkpoint",
    "train_one_epoch",
]
