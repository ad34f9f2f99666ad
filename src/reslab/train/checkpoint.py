"""Self-describing checkpoints, written atomically and read back without unpickling code.

A checkpoint holds everything a later command needs: the model's name and full arguments, the dataset's
classes and normalization, the resolved training config, the weights, and for resuming the optimizer,
scheduler, epoch, random-number states and the best model so far. Only tensors, numbers, strings, lists
and dicts go in, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from reslab.errors import ReslabError
from reslab.models import ResNet

FORMAT = "reslab-checkpoint-1"


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a reslab checkpoint; a ReslabError when the file is missing, unsafe or of another kind."""
    path = Path(path)
    if not path.is_file():
        raise ReslabError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ReslabError(f"{path} is not a readable reslab checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ReslabError(f"{path} is not a reslab checkpoint (plain weights load with create_model(weights=...))")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> ResNet:
    """Rebuild the exact model a checkpoint was trained as and load its weights (evaluation mode)."""
    model = ResNet(**ckpt["model_config"])
    model.name = ckpt["model_name"]
    model.load_state_dict(ckpt["model"])
    return model.eval()
