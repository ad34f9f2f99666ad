"""Training: config, engine (forward_backward, optimizer_step, evaluate), logging, runtime and DDP, fit.

Checkpoint files are ``reslab.checkpoint``; device and precision choice is ``reslab.device``.
"""

from reslab.train.checkpointing import ResumePoint
from reslab.train.config import TrainConfig, from_dict, load_recipe
from reslab.train.engine import evaluate
from reslab.train.trainer import fit, measure_costs

__all__ = [
    "ResumePoint",
    "TrainConfig",
    "evaluate",
    "fit",
    "from_dict",
    "load_recipe",
    "measure_costs",
]
