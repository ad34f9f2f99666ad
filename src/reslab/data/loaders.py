"""Batches for training and evaluation: in-memory tensors on the device, or a DataLoader for image folders.

Both yield ``(images, labels)`` already on the device: images (B, C, H, W) float32, normalized, in the
requested memory format; labels (B,) int64. With ``world_size > 1`` each rank reads its own shard.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from reslab.data.augment import normalize, random_crop, random_hflip
from reslab.data.types import DatasetInfo, TensorSplit


@dataclass(frozen=True)
class Augment:
    """Training-only augmentation: random crop after zero padding, random horizontal flip."""

    crop_padding: int = 4  # pixels; RandomCrop(32, padding=4) in the paper's CIFAR setup
    flip: bool = True


class TensorBatchLoader:
    """Iterates a uint8 ``TensorSplit`` kept whole on the device, augmenting a batch at a time.

    Args:
        split: the images (N, C, H, W) uint8 and labels.
        batch_size: per rank.
        train: shuffle, augment and drop the last partial batch; otherwise fixed order, no augmentation.
        generator: CPU generator for augmentation (shuffling uses ``order_generator``).
    """

    def __init__(
        self,
        split: TensorSplit,
        info: DatasetInfo,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        augment: Augment = Augment(),
        channels_last: bool = False,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.mean = torch.tensor(info.mean, device=device)
        self.std = torch.tensor(info.std, device=device)
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Two CPU generators: the shuffling order must be the same on every rank (each takes its own slice
        # of it), while augmentation should differ between ranks. The trainer reseeds both every epoch.
        self.order_generator = torch.Generator().manual_seed(0)
        self.generator = generator or torch.Generator().manual_seed(1)
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        order = torch.randperm(n, generator=self.order_generator)
        per_rank = n // self.world_size  # equal shards, so every rank takes the same number of steps
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = len(self._indices()) if not self.train else len(self.labels) // self.world_size
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        index = self._indices().to(self.images.device)
        steps = len(self)
        for step in range(steps):
            batch = index[step * self.batch_size : (step + 1) * self.batch_size]
            x = self.images[batch]
            if self.train:
                x = random_crop(x, self.augment.crop_padding, self.generator)
                if self.augment.flip:
                    x = random_hflip(x, self.generator)
            x = normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)
            yield x, self.labels[batch]


class FolderBatchLoader:
    """A DataLoader with workers over an image-folder split, moving batches to the device."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        train: bool,
        device: torch.device,
        channels_last: bool = False,
        num_workers: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sampler = None
        if world_size > 1 and train:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
        elif world_size > 1:  # evaluation: disjoint shards, no padding, so every image counts exactly once
            dataset = Subset(dataset, range(rank, len(dataset), world_size))
        generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and self.sampler is None,
            sampler=self.sampler,
            num_workers=num_workers,
            drop_last=train,
            pin_memory=device.type == "cuda",
            generator=generator,
            # Workers restart each epoch so their random seeds come from the (per-epoch reseeded) generator:
            # persistent workers would carry augmentation state across epochs and break exact resume.
            persistent_workers=num_workers > 0 and not train,
        )
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)
