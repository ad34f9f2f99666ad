"""Where and in which precision a model runs: the device of ``--device`` and the autocast dtype of ``--amp``.

Training, evaluation, prediction, the run report and the explain experiments all choose here, so that one
``--amp auto`` means the same thing everywhere.
"""

from __future__ import annotations

import torch

from reslab.errors import ReslabError
from reslab.machine import bf16_native


def pick_device(name: str) -> torch.device:
    """The device of ``--device``: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps; one line of
    ReslabError for a device this machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ReslabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ReslabError("device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ReslabError("device mps was asked for, but Apple's MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ReslabError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` (off, fp16, bf16, auto) on ``device``; None means float32.

    auto: bf16 where it runs natively (``machine.bf16_native``: an Ampere-or-later GPU, a CPU with AVX-512 BF16
    or AMX), as it needs no loss scaling; float32 elsewhere, including CPUs where bf16 is only emulated.
    """
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_native(device) else None
