"""Batch augmentation matches torchvision's per-image semantics and touches only the training split."""

import torch
import torch.nn.functional as F

from reslab.data import Augment, DatasetInfo, TensorBatchLoader, TensorSplit
from reslab.data.augment import random_crop, random_erase, random_hflip, resize


def test_random_crop_is_a_window_of_the_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 2, 9, 7), dtype=torch.uint8)
    out = random_crop(images, 3, g)
    padded = F.pad(images, (3, 3, 3, 3))
    offsets = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(7)
            for dx in range(7)
            if torch.equal(out[i], padded[i, :, dy : dy + 9, dx : dx + 7])
        ]
        assert matches, f"image {i} is not a crop of its padded self"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets vary per image
    assert torch.equal(random_crop(images, 0, g), images)


def test_random_hflip_flips_about_half():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(1000 * 4, dtype=torch.uint8).reshape(1000, 1, 1, 4)
    out = random_hflip(images, g)
    flipped = (out == images.flip(3)).all(dim=(1, 2, 3))
    assert (flipped | (out == images).all(dim=(1, 2, 3))).all()
    assert 400 < int(flipped.sum()) < 600


def _loader(train: bool):
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    info = DatasetInfo("t", [str(i) for i in range(4)], 1, (8, 8), mean=(0.5,), std=(0.25,))
    split = TensorSplit(images, torch.arange(40) % 4)
    return images, TensorBatchLoader(
        split, info, batch_size=8, train=train, device=torch.device("cpu"), augment=Augment(crop_padding=2, flip=True)
    )


def test_evaluation_batches_are_the_exact_images_in_order():
    images, loader = _loader(train=False)
    x = torch.cat([b for b, _ in loader])
    torch.testing.assert_close(x, (images.float() / 255 - 0.5) / 0.25)


def test_training_batches_are_shuffled_and_augmented():
    images, loader = _loader(train=True)
    x = torch.cat([b for b, _ in loader])
    assert x.shape == (40, 1, 8, 8)
    plain = (images.float() / 255 - 0.5) / 0.25
    exact = sum(any(torch.equal(row, p) for p in plain) for row in x)
    assert exact < 20  # most images were cropped or flipped


def test_ranks_read_disjoint_shards_that_cover_the_split():
    images = torch.arange(41, dtype=torch.uint8).reshape(41, 1, 1, 1).expand(41, 1, 4, 4).contiguous()
    info = DatasetInfo("t", ["a"], 1, (4, 4), mean=(0.0,), std=(1 / 255,))  # normalize() then returns 0..255
    split = TensorSplit(images, torch.zeros(41, dtype=torch.long))

    def seen(rank, train):
        loader = TensorBatchLoader(
            split,
            info,
            batch_size=4,
            train=train,
            device=torch.device("cpu"),
            augment=Augment(crop_padding=0, flip=False),
            rank=rank,
            world_size=2,
        )
        return [int(v) for x, _ in loader for v in x[:, 0, 0, 0].round()]

    train0, train1 = seen(0, True), seen(1, True)
    assert len(train0) == len(train1) == 20 and not set(train0) & set(train1)  # equal, disjoint shards
    val0, val1 = seen(0, False), seen(1, False)
    assert sorted(val0 + val1) == list(range(41))  # evaluation: every image exactly once


def test_random_erasing_replaces_one_rectangle_of_about_half_the_images():
    g = torch.Generator().manual_seed(0)
    images = torch.full((2000, 1, 28, 28), 7, dtype=torch.uint8)  # 7: a value the noise rarely repeats
    out = random_erase(images, 0.5, g)
    changed = out != images
    erased = changed.flatten(1).any(dim=1)
    assert 900 < int(erased.sum()) < 1100
    for mask in changed[erased][:200, 0]:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        # One rectangle, each pixel of it replaced (a noise value that happens to be 7 aside).
        assert box.float().mean() > 0.95 and box.numel() <= 0.4 * 28 * 28 * 1.1
    assert torch.equal(random_erase(images, 0.0, g), images)


def test_random_erasing_and_progressive_sizes_leave_evaluation_untouched():
    """The evaluation batches are the exact images, whatever the training augmentation; training ones change."""
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    info = DatasetInfo("t", [str(i) for i in range(4)], 1, (8, 8), mean=(0.5,), std=(0.25,))
    split = TensorSplit(images, torch.arange(40) % 4)

    def batches(train: bool, augment: Augment, epoch: int = 0):
        loader = TensorBatchLoader(split, info, batch_size=8, train=train, device=torch.device("cpu"), augment=augment)
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    plain, heavy = Augment(crop_padding=0, flip=False), Augment(crop_padding=0, flip=False, erase=1.0, sizes=(16, 8))
    assert torch.equal(batches(False, heavy), batches(False, plain))
    torch.testing.assert_close(batches(False, heavy), (images.float() / 255 - 0.5) / 0.25)
    assert batches(True, heavy).shape == (40, 1, 16, 16)  # epoch 0 at 16 pixels
    erased, clean = batches(True, heavy, epoch=1), batches(True, plain, epoch=1)  # the same order and size
    assert erased.shape == clean.shape == (40, 1, 8, 8)
    assert all(not torch.equal(a, b) for a, b in zip(erased, clean, strict=True))  # every image erased (p = 1)
    assert Augment(sizes=(16, 20)).size_at(5) == 20 and Augment().size_at(0) is None


def test_resize_keeps_a_constant_image_constant():
    x = torch.full((2, 3, 28, 28), 0.25)
    torch.testing.assert_close(resize(x, 20), torch.full((2, 3, 20, 20), 0.25))
