"""Whole-batch augmentation of uint8 image tensors on the device (the airbench approach).

One gather per batch replaces per-image PIL transforms: for Fashion-MNIST on a 2-core CPU the data path
then costs a few percent of a training step instead of dominating it. Random numbers come from a CPU
``torch.Generator`` that checkpoints save, so a resumed run sees the same crops and flips.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Random erasing's rectangle (Zhong et al. 2017, Sec. 3.1, and torchvision's RandomErasing): 2% to 40% of
# the image's area, aspect ratio (height / width) from 0.3 to 1 / 0.3, log-uniform.
ERASE_AREA = (0.02, 0.4)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor (random draws) on ``device`` without the host waiting: on CUDA a copy from pageable
    memory waits for every kernel queued before it, one from pinned memory does not."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """``RandomCrop(size, padding)`` for a batch: zero-pad by ``padding``, crop back at a random offset.

    (N, C, H, W) -> (N, C, H, W), each image with its own offset in [0, 2 * padding] along each axis.
    """
    if padding <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), images.device)
    dx = to_device(torch.randint(0, 2 * padding + 1, (n,), generator=generator), images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_hflip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2. (N, C, H, W) -> (N, C, H, W)."""
    flip = to_device(torch.rand(images.shape[0], generator=generator) < 0.5, images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_erase(images: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Random erasing (Zhong et al. 2017) for a batch: with probability ``p`` per image, one rectangle of it
    is replaced by random pixel values. (N, C, H, W) uint8 -> (N, C, H, W) uint8.

    The paper draws again until the rectangle fits; here its sides are clipped to the image instead, so a
    whole batch is erased at once without a loop.
    """
    if p <= 0:
        return images
    n, _, h, w = images.shape
    area = torch.empty(n).uniform_(*ERASE_AREA, generator=generator) * (h * w)
    aspect = torch.empty(n).uniform_(*ERASE_LOG_ASPECT, generator=generator).exp()
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=generator) * (w - ew + 1)).long()
    erase = torch.rand(n, generator=generator) < p
    noise = torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8)
    top, left, eh, ew, erase, noise = (to_device(t, images.device) for t in (top, left, eh, ew, erase, noise))
    rows = torch.arange(h, device=images.device)[None, :]  # (1, H) against (N, 1) bounds
    cols = torch.arange(w, device=images.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (N, W)
    mask = inside_rows[:, None, :, None] & inside_cols[:, None, None, :] & erase[:, None, None, None]
    return torch.where(mask, noise, images)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std``, with mean and std of shape (C,)."""
    return (images.float().div_(255) - mean[:, None, None]).div_(std[:, None, None])


def resize(images: Tensor, size: int) -> Tensor:
    """Float images (N, C, H, W) -> (N, C, size, size), bilinear with antialiasing (no aliasing when shrinking).

    Progressive resizing (as in fast.ai's DAWNBench runs): early epochs on smaller images cost a fraction of
    the compute; a network with global average pooling takes any size, and the last epochs at full size adapt
    it (and its BatchNorm statistics) to the size it is tested at.
    """
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
