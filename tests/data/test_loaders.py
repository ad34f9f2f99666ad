"""Training batches as a function of (seed, epoch, step): what exact resume from any step rests on."""

import pytest
import torch

from reslab import ReslabError
from reslab.data import Augment, DatasetInfo, FolderBatchLoader, TensorBatchLoader, TensorSplit, load_dataset
from reslab.data.folder import train_transform
from tests.data.fixtures import write_image_folder


def _folder_loader(tmp_path, workers: int):
    root = write_image_folder(tmp_path / "images", per_class=12, size=12)
    bundle = load_dataset("imagefolder", data_dir=root, val_ratio=0.2, image_size=8, in_chans=3)
    info = bundle.info
    bundle.train.transform = train_transform(8, 3, info.mean, info.std, crop_padding=2, flip=True)
    loader = FolderBatchLoader(bundle.train, batch_size=4, train=True, device=torch.device("cpu"), num_workers=workers)
    return bundle, loader


def _batches(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_in_memory_batches_resume_at_any_step():
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)

    info = DatasetInfo("t", [str(i) for i in range(4)], 1, (8, 8), mean=(0.5,), std=(0.25,))
    loader = TensorBatchLoader(
        TensorSplit(images, torch.arange(40) % 4),
        info,
        batch_size=8,
        train=True,
        device=torch.device("cpu"),
        augment=Augment(crop_padding=2, flip=True),
        seed=3,
    )
    whole = _batches(loader, epoch=1)
    assert len(whole) == 5
    for start in range(5):
        tail = _batches(loader, epoch=1, start=start)
        assert all(
            torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[start:], tail, strict=True)
        )
    other = _batches(loader, epoch=2)
    assert not torch.equal(whole[0][0], other[0][0])  # another epoch: another order and other crops


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_batches_resume_at_any_step_whatever_the_workers(tmp_path, workers):
    """Each image's augmentation is seeded by (seed, epoch, image), so neither resuming mid-epoch nor the
    number of workers changes a single pixel."""
    _, reference = _folder_loader(tmp_path / "a", workers=0)
    _, loader = _folder_loader(tmp_path / "b", workers=workers)
    whole = _batches(reference, epoch=1)
    tail = _batches(loader, epoch=1, start=2)
    assert len(whole) == len(reference) and len(tail) == len(whole) - 2
    for (x, y), (x2, y2) in zip(whole[2:], tail, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_a_file_that_turns_bad_during_training_is_named_not_a_worker_traceback(tmp_path):
    bundle, loader = _folder_loader(tmp_path, workers=1)
    victim = bundle.train.folder.samples[bundle.train.indices[0]][0]
    with open(victim, "r+b") as f:
        f.truncate(20)
    with pytest.raises(ReslabError) as err:
        _batches(loader, epoch=0)
    message = str(err.value)
    assert message.startswith(f"{victim} could not be read (") and "\n" not in message
