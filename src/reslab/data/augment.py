"""Whole-batch augmentation of uint8 image tensors on the device (the airbench approach).

One gather per batch replaces per-image PIL transforms: for Fashion-MNIST on a 2-core CPU the data path
then costs a few percent of a training step instead of dominating it. Random numbers come from a CPU
``torch.Generator`` that checkpoints save, so a resumed run sees the same crops and flips.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """``RandomCrop(size, padding)`` for a batch: zero-pad by ``padding``, crop back at a random offset.

    (N, C, H, W) -> (N, C, H, W), each image with its own offset in [0, 2 * padding] along each axis.
    """
    if padding <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2. (N, C, H, W) -> (N, C, H, W)."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std``, with mean and std of shape (C,)."""
    return (images.float().div_(255) - mean[:, None, None]).div_(std[:, None, None])
