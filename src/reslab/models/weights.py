"""Read weight files: torchvision / timm ``.pth`` state dicts, reslab checkpoints, safetensors (``pretrained.py``
loads them into a model).

Nothing is downloaded. ``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses pickled
code, so a file from the internet cannot run anything on load.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from reslab.errors import ReslabError

# Prefixes that wrappers add to every key: DDP (module.), torch.compile (_orig_mod.), some trainers (model.).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
# Keys under which training checkpoints nest the model's state dict.
_NESTED_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "ema")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a flat ``{name: tensor}`` state dict from a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file."""
    path = Path(path)
    return read_weights_file(path) if path.suffix == ".safetensors" else unwrap(read_weights_file(path), path)


def read_weights_file(path: str | Path) -> object:
    """What a weights file holds, as stored (a reslab checkpoint, a nested or flat state dict), read safely:
    ``.safetensors`` as tensors, PyTorch files with ``weights_only``; a ReslabError in one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ReslabError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ReslabError(f"{path} is not a readable safetensors file: {err}") from None
    if path.suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise ReslabError(f"{path}: unknown weights format {path.suffix!r}; use .pth, .pt or .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise ReslabError(
                f"{path} holds Python objects ({found.group(1)}), not only tensors, and was not loaded "
                "(unsafe pickle); save model.state_dict() instead"
            ) from None
        raise ReslabError(f"{path} is not a readable PyTorch file (corrupt or not a state dict)") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ReslabError(f"{path} is not a readable PyTorch file: {err}") from None
    return obj


def unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """The flat state dict inside what a file held: nested under ``state_dict``/``model``/.., prefixes removed."""
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            raise ReslabError(f"{path} holds no state dict (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = nested
    if not isinstance(obj, Mapping):
        raise ReslabError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _all_tensors(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())
