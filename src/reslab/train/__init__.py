"""Training: config, engine (forward_backward, optimizer_step, evaluate), checkpoints, logging, runtime and DDP, fit."""

from reslab.train.checkpoint import load_checkpoint, model_from_checkpoint
from reslab.train.config import TrainConfig, from_dict, load_recipe
from reslab.train.engine import evaluate
from reslab.train.trainer import fit, measure_costs

__all__ = [
    "TrainConfig",
    "evaluate",
    "fit",
    "from_dict",
    "load_checkpoint",
    "load_recipe",
    "measure_costs",
    "model_from_checkpoint",
]
