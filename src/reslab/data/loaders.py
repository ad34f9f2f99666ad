"""Batches for training and evaluation: in-memory tensors on the device, or a DataLoader for image folders.

Both yield ``(images, labels)`` already on the device: images (B, C, H, W) float32, normalized, in the
requested memory format; labels (B,) int64. With ``world_size > 1`` each rank reads its own shard.

Training batches are a pure function of (seed, epoch, step, rank): the shuffling order comes from
(seed, epoch), and the augmentation of each batch (in memory) or each image (image folders) from a
generator seeded by its position. So a run stopped at any step resumes with exactly the batches it would
have seen (``set_epoch(epoch, start_step)``), and image folders augment alike whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from reslab.data.augment import normalize, random_crop, random_erase, random_hflip, resize
from reslab.data.types import DatasetInfo, TensorSplit
from reslab.errors import ReslabError


@dataclass(frozen=True)
class Augment:
    """Training-only augmentation: random crop after zero padding, random horizontal flip, random erasing, and
    progressive resizing (the training images of epoch ``e`` resized to ``sizes[e]``, the last size after)."""

    crop_padding: int = 4  # pixels; RandomCrop(32, padding=4) in the paper's CIFAR setup
    flip: bool = True
    erase: float = 0.0  # probability of erasing a random rectangle of each image (Zhong et al. 2017 use 0.5)
    sizes: tuple[int, ...] = ()  # per-epoch training image size (square); empty: the images' own size

    def size_at(self, epoch: int) -> int | None:
        """The training image size of ``epoch``, or None for the images' own size."""
        return self.sizes[min(epoch, len(self.sizes) - 1)] if self.sizes else None


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, step, ...), distinct for distinct tuples in practice."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) * 0xBF58476D1CE4E5B9
        value &= (1 << 64) - 1
    return value >> 1


def epoch_order(n: int, *, seed: int, epoch: int, rank: int, world_size: int) -> Tensor:
    """This rank's shard of the shuffled indices 0..n-1 for ``epoch``: equal shards of one order shared by all ranks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    per_rank = n // world_size  # equal shards, so every rank takes the same number of steps
    return order[rank * per_rank : (rank + 1) * per_rank]


class TensorBatchLoader:
    """Iterates a uint8 ``TensorSplit`` kept whole on the device, augmenting a batch at a time.

    Args:
        split: the images (N, C, H, W) uint8 and labels.
        batch_size: per rank.
        train: shuffle, augment and drop the last partial batch; otherwise fixed order, no augmentation.
        seed: with the epoch and step (``set_epoch``), decides the order and every random crop and flip.
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
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.mean = torch.tensor(info.mean, device=device)
        self.std = torch.tensor(info.std, device=device)
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields ``epoch``'s batches from ``start_step`` on (training only)."""
        self.epoch, self.start_step = epoch, start_step

    def _indices(self) -> Tensor:
        n = len(self.labels)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        return epoch_order(n, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        """Batches in a whole epoch (a resumed epoch yields ``len(self) - start_step`` of them)."""
        if self.train:
            return len(self.labels) // self.world_size // self.batch_size
        return -(-len(range(self.rank, len(self.labels), self.world_size)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        index = self._indices().to(self.images.device)
        for step in range(self.start_step if self.train else 0, len(self)):
            batch = index[step * self.batch_size : (step + 1) * self.batch_size]
            x = self.images[batch]
            if self.train:
                generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, step, self.rank))
                x = random_crop(x, self.augment.crop_padding, generator)
                if self.augment.flip:
                    x = random_hflip(x, generator)
                x = random_erase(x, self.augment.erase, generator)
            x = normalize(x, self.mean, self.std)
            size = self.augment.size_at(self.epoch) if self.train else None
            if size is not None and size != x.shape[-1]:
                x = resize(x, size)
            yield x.contiguous(memory_format=self.memory_format), self.labels[batch]


class _EpochSampler(Sampler):
    """(index, seed) pairs of one epoch's shard from ``start`` on; the seed decides that image's augmentation."""

    def __init__(self, n: int, *, seed: int, rank: int, world_size: int, batch_size: int) -> None:
        self.n, self.seed, self.rank, self.world_size, self.batch_size = n, seed, rank, world_size, batch_size
        self.epoch, self.start_step = 0, 0

    def steps(self) -> int:
        return self.n // self.world_size // self.batch_size

    def __len__(self) -> int:
        return (self.steps() - self.start_step) * self.batch_size

    def __iter__(self):
        order = epoch_order(self.n, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        for i in order[self.start_step * self.batch_size : self.steps() * self.batch_size].tolist():
            yield i, mix_seed(self.seed, self.epoch, i)


class _SeededSamples(Dataset):
    """Reads ``dataset[index]`` with torch's RNG seeded for that image (torchvision's random transforms use it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):  # leave the process's own random stream untouched
            torch.manual_seed(seed)
            return self.dataset[index]


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT and SIGTERM to the main process, which finishes its step and saves (train/signals.py);
    a Ctrl-C in a terminal reaches every process of the group, and a worker that died of it would end the run."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(items: list):
    """Stack a batch; a sample that could not be read (``folder.BadSample``) makes the whole batch that marker."""
    from reslab.data.folder import BadSample

    for item in items:
        if isinstance(item, BadSample):
            return item
    return torch.utils.data.default_collate(items)


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
        if train:
            self.sampler = _EpochSampler(
                len(dataset), seed=seed, rank=rank, world_size=world_size, batch_size=batch_size
            )
            dataset = _SeededSamples(dataset)
        elif world_size > 1:  # evaluation: disjoint shards, no padding, so every image counts exactly once
            dataset = Subset(dataset, range(rank, len(dataset), world_size))
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            drop_last=train,
            pin_memory=device.type == "cuda",
            collate_fn=_collate,
            worker_init_fn=_ignore_stop_signals,
            # Without a generator, each pass draws its workers' base seed from the global RNG, which stochastic
            # depth also uses: a resumed run would draw it at another moment. Augmentation is seeded per image.
            generator=torch.Generator().manual_seed(seed),
            # Evaluation reuses its workers; training restarts them each epoch (its sampler changes).
            persistent_workers=num_workers > 0 and not train,
        )
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields ``epoch``'s batches from ``start_step`` on (training only)."""
        self.sampler.epoch, self.sampler.start_step = epoch, start_step

    def __len__(self) -> int:
        """Batches in a whole epoch (a resumed epoch yields ``len(self) - start_step`` of them)."""
        return self.sampler.steps() if self.sampler is not None else len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        from reslab.data.folder import BadSample

        for batch in self.loader:
            if isinstance(batch, BadSample):
                raise ReslabError(
                    f"{batch.path} could not be read ({batch.reason}); put a good copy in its place and continue "
                    "with --resume auto (removing it changes the splits: that is a new run)"
                )
            x, y = batch
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)
