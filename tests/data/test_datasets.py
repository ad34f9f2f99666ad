"""Each loader reads its real file format, verifies it, and splits it stratified and seeded."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from reslab import ReslabError
from reslab.data import load_dataset, stratified_split
from tests.data.fixtures import write_cifar10, write_cifar100, write_image_folder, write_mnist_like


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_datasets(tmp_path, name, gz):
    write_mnist_like(tmp_path, n_train=100, n_test=30, gz=gz)
    b = load_dataset(name, data_dir=tmp_path, val_ratio=0.2, download=False)
    assert b.train.images.shape == (80, 1, 28, 28) and b.train.images.dtype == torch.uint8
    assert len(b.val) == 20 and len(b.test) == 30
    assert b.info.channels == 1 and b.info.num_classes == 10 and b.info.image_size == (28, 28)
    if name == "fashion-mnist":
        assert b.info.classes[0] == "T-shirt/top" and b.info.classes[-1] == "Ankle boot"


def test_torchvision_folder_layout_and_env_var(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "FashionMNIST" / "raw", n_train=50, n_test=10)
    monkeypatch.setenv("RESLAB_DATA", str(tmp_path))
    assert len(load_dataset("fashion-mnist", val_ratio=0.0, download=False).train) == 50


def test_cifar10(tmp_path):
    write_cifar10(tmp_path, per_batch=20, n_test=30)
    b = load_dataset("cifar10", data_dir=tmp_path, val_ratio=0.1, download=False)
    assert b.train.images.shape == (90, 3, 32, 32) and len(b.val) == 10 and len(b.test) == 30
    assert b.info.classes[1] == "automobile" and len(b.info.mean) == 3


def test_cifar10_pixels_keep_channel_order(tmp_path):
    folder = write_cifar10(tmp_path, per_batch=10, n_test=10)
    raw = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")
    b = load_dataset("cifar10", data_dir=tmp_path, val_ratio=0.0, download=False)
    expected = torch.from_numpy(np.asarray(raw["data"][3]).reshape(3, 32, 32))
    assert torch.equal(b.test.images[3], expected)  # rows are R plane, G plane, B plane


def test_cifar100(tmp_path):
    write_cifar100(tmp_path, n_train=200, n_test=100)
    b = load_dataset("cifar100", data_dir=tmp_path, val_ratio=0.0, download=False)
    assert b.info.num_classes == 100 and len(b.train) == 200 and int(b.test.labels.max()) == 99


def test_cifar_refuses_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_cifar10(tmp_path, per_batch=10, n_test=10)

    class Evil:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w')",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(
        ReslabError, match=r"test_batch is not a CIFAR python batch.*refusing to load (__builtin__|builtins)\.exec"
    ):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 8)), "truncated|data bytes"),
        (lambda p: p.write_bytes(gzip.compress(b"PK\x03\x04junk")), "not an IDX file"),
        (lambda p: p.write_bytes(b"not gzip at all"), "cannot read"),
        (lambda p: p.write_bytes(p.read_bytes()[:30] + b"\xff" * 40 + p.read_bytes()[70:]), "cannot read"),
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, damage, message):
    write_mnist_like(tmp_path, n_train=20, n_test=10)
    damage(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(ReslabError, match=rf"(?=.*train-images-idx3-ubyte\.gz)(?=.*({message}))"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def test_label_out_of_range_and_count_mismatch(tmp_path):
    from tests.data.fixtures import write_idx

    write_mnist_like(tmp_path, n_train=20, n_test=10, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 12, dtype=np.uint8), gz=False)
    with pytest.raises(ReslabError, match=r"t10k-labels-idx1-ubyte: labels range 12\.\.12, outside 0\.\.9"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9, dtype=np.uint8), gz=False)
    with pytest.raises(ReslabError, match=r"has 10 images but .* has 9 labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_missing_files_name_every_option(tmp_path, monkeypatch):
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    with pytest.raises(ReslabError) as err:
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "--data-dir" in message and "RESLAB_DATA" in message


def test_unknown_dataset():
    with pytest.raises(ReslabError, match=r"unknown dataset 'cifar11'.*fashion-mnist"):
        load_dataset("cifar11")


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 50, 30, 20])])
    train, val = stratified_split(labels, 0.2, seed=1)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(labels)))  # a partition
    assert torch.bincount(labels[val]).tolist() == [20, 10, 6, 4]
    again, _ = stratified_split(labels, 0.2, seed=1)
    other, _ = stratified_split(labels, 0.2, seed=2)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_image_folder_with_splits(tmp_path):
    write_image_folder(tmp_path, split_dirs=("train", "val", "test"), per_class=8)
    b = load_dataset("imagefolder", data_dir=tmp_path, image_size=16, in_chans=3)
    assert b.info.classes == ["cat", "dog", "fish"] and not b.in_memory
    assert (len(b.train), len(b.val), len(b.test)) == (24, 24, 24)
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0


def test_image_folder_without_splits_is_split_stratified(tmp_path):
    write_image_folder(tmp_path, per_class=10)
    b = load_dataset("imagefolder", data_dir=tmp_path, val_ratio=0.2, image_size=12, in_chans=1)
    assert (len(b.train), len(b.val), len(b.test)) == (18, 6, 6)
    assert sorted(b.test.targets) == [0, 0, 1, 1, 2, 2]
    assert b.train[0][0].shape == (1, 12, 12)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ReslabError, match="image folder not found"):
        load_dataset("imagefolder", data_dir=tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ReslabError, match="not an image folder"):
        load_dataset("imagefolder", data_dir=tmp_path / "empty")
