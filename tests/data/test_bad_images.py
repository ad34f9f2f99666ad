"""Bad files in image folders are found before training (issue 8): skipped and listed, or refused."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from reslab.data import load_dataset, verify
from reslab.data.folder import BadSample, load_image_folder, whole_image_folder
from reslab.data.verify import check_images, read_image, write_bad_images
from reslab.errors import ReslabError
from tests.data.bad_files import noise_jpeg, png_header
from tests.data.fixtures import write_image_folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the check's cache out of the real home folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def add_bad_files(root: Path) -> dict[str, str]:
    """One of each kind of bad file among the good ones; {path: what its reason starts with}."""
    jpeg = noise_jpeg()
    bad = {
        root / "cat" / "empty.png": b"",
        root / "dog" / "cut.jpg": jpeg[: len(jpeg) // 2],
        root / "dog" / "notes.png": b"hello, this is text",
        root / "fish" / "bomb.png": png_header(12_000, 12_000),
    }
    for path, data in bad.items():
        path.write_bytes(data)
    dangling = root / "fish" / "gone.png"  # a link to a deleted file: listed by the folder, unreadable
    dangling.symlink_to(root / "deleted.png")
    starts = ["empty file (0 bytes)", "truncated: ", "not an image: ", "too large: 12000x12000 pixels"]
    return {str(p): s for p, s in zip(bad, starts, strict=True)} | {str(dangling): "unreadable: No such file"}


def split_paths(bundle) -> dict[str, set[str]]:
    """{split: the files in it}."""
    out = {}
    for name in ("train", "val", "test"):
        ds = getattr(bundle, name)
        idx = ds.indices if ds.indices is not None else range(len(ds.folder.samples))
        out[name] = {ds.folder.samples[i][0] for i in idx}
    return out


def test_each_kind_of_bad_file_gets_its_reason(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=3)
    expected = add_bad_files(root)
    good = [str(p) for p in sorted(root.rglob("[0-9].*"))]
    bad = check_images(good + list(expected), max_pixels=verify.DEFAULT_MAX_IMAGE_PIXELS, cache_dir=tmp_path / "c")
    assert set(bad) == set(expected)
    for path, start in expected.items():
        assert bad[path].startswith(start), (path, bad[path])
    assert "above --max-image-pixels 89478485" in bad[str(root / "fish" / "bomb.png")]


def test_skip_leaves_bad_files_out_before_splitting(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=10)
    clean = load_image_folder(root, val_ratio=0.2, seed=3, image_size=12, in_chans=3)
    expected = add_bad_files(root)
    bundle = load_image_folder(root, val_ratio=0.2, seed=3, image_size=12, in_chans=3)
    # The splits are those of the good files alone: a bad file shifts nothing.
    assert split_paths(bundle) == split_paths(clean)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 30
    assert clean.bad_files == []
    assert dict(bundle.bad_files).keys() == expected.keys()
    for path, reason in bundle.bad_files:
        assert reason.startswith(expected[path])
    folder = bundle.train.folder
    assert folder.samples is folder.imgs and folder.targets == [t for _, t in folder.samples]

    out = write_bad_images(bundle.bad_files, tmp_path / "run")
    lines = out.read_text().splitlines()
    assert out.name == "bad_images.txt" and lines[0].startswith("#")
    assert [line.split("\t") for line in lines[1:]] == [[p, r] for p, r in bundle.bad_files]
    assert write_bad_images([], tmp_path / "run2") is None and not (tmp_path / "run2").exists()


def test_fail_names_the_first_bad_files(tmp_path):
    root = write_image_folder(tmp_path / "images", split_dirs=("train", "test"), per_class=4)
    (root / "test" / "dog" / "empty.png").write_bytes(b"")
    (root / "train" / "cat" / "text.png").write_text("not a picture")
    with pytest.raises(ReslabError, match=r"2 of 26 images are bad: .*train/cat/text\.png \(not an image") as err:
        load_dataset("imagefolder", data_dir=root, image_size=12, on_bad_image="fail")
    assert "test/dog/empty.png (empty file (0 bytes))" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ReslabError, match="--on-bad-image must be skip or fail"):
        load_image_folder(root, val_ratio=0.2, seed=0, image_size=12, in_chans=3, on_bad_image="ignore")
    # skip, passed on by load_dataset, trains on the rest
    bundle = load_dataset("imagefolder", data_dir=root, image_size=12, val_ratio=0.25, on_bad_image="skip")
    assert len(bundle.bad_files) == 2 and len(bundle.test) == 12


def test_a_class_without_a_good_image_is_an_error(tmp_path):
    root = write_image_folder(tmp_path / "images", per_class=3)
    for path in (root / "fish").iterdir():
        path.write_bytes(b"")
    with pytest.raises(ReslabError, match=r"every image of class 'fish' is bad: .*empty file"):
        load_image_folder(root, val_ratio=0.2, seed=0, image_size=12, in_chans=3)
    for path in root.rglob("*.*"):
        path.write_bytes(b"")
    with pytest.raises(ReslabError, match="no good image left, all 9 are bad"):
        load_image_folder(root, val_ratio=0.2, seed=0, image_size=12, in_chans=3)


def test_too_large_images_are_never_decoded(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(path)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1) or real_load(self))
    bad = check_images([str(path)], max_pixels=10_000, cache_dir=tmp_path / "c")
    assert bad == {str(path): "too large: 200x200 pixels is above --max-image-pixels 10000"}
    assert decoded == []
    assert check_images([str(path)], max_pixels=40_000, cache_dir=tmp_path / "c") == {}
    assert decoded == [1]


@pytest.mark.parametrize("pil_limit", [30_000, 10_000])  # PIL warns above 1x its limit, raises above 2x
def test_pil_bomb_limit_is_replaced_by_ours(tmp_path, monkeypatch, pil_limit):
    """A 200x200 image within --max-image-pixels reads without PIL's warning or error, in the check and later."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    root = write_image_folder(tmp_path / "images", per_class=2)
    big = root / "cat" / "big.png"
    Image.fromarray(np.full((200, 200, 3), 99, np.uint8)).save(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        bundle = load_image_folder(root, val_ratio=0.25, seed=0, image_size=12, in_chans=3)
        assert bundle.bad_files == []
        assert read_image(str(big)).size == (200, 200)
        ds = bundle.train
        for i in range(len(ds)):
            assert not isinstance(ds[i], BadSample)
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # the process's setting is left as it was
    with pytest.raises(ReslabError, match="too large: 200x200 pixels is above --max-image-pixels 1000"):
        read_image(str(big), max_pixels=1_000)


def test_a_file_without_read_permission_is_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads any file: make the denial happen where the check opens it

        def denied(name, *args, **kwargs):
            if Path(name) == path and path.stat().st_mode & 0o777 == 0:
                raise PermissionError(13, "Permission denied", str(name))
            return open(name, *args, **kwargs)

        monkeypatch.setattr(verify, "open", denied, raising=False)
    bad = check_images([str(path)], max_pixels=100, cache_dir=tmp_path / "c")
    assert bad == {str(path): "unreadable: Permission denied"}
    # Fixing the permission changes neither size nor mtime: the file is checked again, not taken from the cache.
    path.chmod(0o644)
    assert check_images([str(path)], max_pixels=100, cache_dir=tmp_path / "c") == {}


def test_the_cache_checks_only_new_and_changed_files(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", per_class=3)
    paths = [str(p) for p in sorted(root.rglob("*.*"))]
    (root / "cat" / "empty.png").write_bytes(b"")
    paths.append(str(root / "cat" / "empty.png"))
    checked = []
    real_check = verify._check_file

    def counted(path, max_pixels):
        checked.append(path)
        return real_check(path, max_pixels)

    monkeypatch.setattr(verify, "_check_file", counted)
    cache = tmp_path / "cache"

    first = check_images(paths, max_pixels=10**6, cache_dir=cache)
    assert sorted(checked) == sorted(paths) and list(first) == [paths[-1]]
    checked.clear()
    assert check_images(paths, max_pixels=10**6, cache_dir=cache) == first
    assert checked == []  # every answer, good and bad, came from the cache

    changed = paths[0]
    stat = os.stat(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    Path(paths[1]).write_bytes(b"")  # size and mtime change: now empty
    assert check_images(paths, max_pixels=10**6, cache_dir=cache) == {paths[1]: "empty file (0 bytes)", **first}
    assert sorted(checked) == sorted(paths[:2])

    checked.clear()  # another limit decides "too large" differently: everything again
    check_images(paths, max_pixels=10**5, cache_dir=cache)
    assert len(checked) == len(paths)


def test_a_broken_or_unwritable_cache_does_not_fail_the_check(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", per_class=2)
    paths = [str(p) for p in sorted(root.rglob("*.*"))]
    cache = tmp_path / "cache"
    check_images(paths, max_pixels=10**6, cache_dir=cache)
    (cache_file,) = cache.iterdir()
    for junk in ("{not json", '{"version": 1, "root": 3}', '{"version": 1, "files": {"a": [1, 2]}}', "[]"):
        cache_file.write_text(junk)
        assert check_images(paths, max_pixels=10**6, cache_dir=cache) == {}
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert check_images(paths, max_pixels=10**6, cache_dir=blocker / "cache") == {}  # mkdir fails: no cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the default place, unusable
    assert check_images([*paths, str(blocker)], max_pixels=10**6) == {str(blocker): "empty file (0 bytes)"}


def test_many_files_are_checked_in_worker_processes(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "images", per_class=4)
    expected = add_bad_files(root)
    paths = sorted(str(p) for p in root.rglob("*.*"))
    serial = check_images(paths, max_pixels=10**8, workers=1, cache_dir=tmp_path / "c1")
    monkeypatch.setattr(verify, "PARALLEL_MIN_FILES", 1)
    parallel = check_images(paths, max_pixels=10**8, workers=2, cache_dir=tmp_path / "c2")
    assert parallel == serial and set(parallel) == set(expected)
    assert list(parallel) == [p for p in paths if p in expected]  # in the order given


def test_a_file_that_turns_bad_after_the_check_is_named(tmp_path):
    root = write_image_folder(tmp_path / "images", split_dirs=("train", "val"), per_class=4, size=40)
    bundle = load_image_folder(root, val_ratio=0.2, seed=0, image_size=12, in_chans=3)
    ds = bundle.val
    path, _ = ds.folder.samples[2]
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    image, label = ds[1]
    assert image.shape == (3, 12, 12) and isinstance(label, int)
    sample = ds[2]
    assert isinstance(sample, BadSample) and sample.path == path
    assert sample.reason.startswith(("truncated", "corrupt"))
    Path(path).unlink()
    assert ds[2] == BadSample(path, "unreadable: No such file or directory")


def test_evaluating_another_folder_refuses_bad_images(tmp_path):
    root = write_image_folder(tmp_path / "other", per_class=2)
    assert len(whole_image_folder(root, ["cat", "dog", "fish"])) == 6
    (root / "dog" / "empty.png").write_bytes(b"")
    with pytest.raises(ReslabError, match=r"1 of 7 images in .* are bad: .*dog/empty\.png \(empty file"):
        whole_image_folder(root, ["cat", "dog", "fish"])


def test_every_decodable_mode_passes_the_transform(tmp_path):
    """A file that passes the check must not fail in the first batch: LAB TIFFs convert through RGB."""
    root = write_image_folder(tmp_path / "images", per_class=2)
    Image.new("LAB", (9, 7), (50, 20, 30)).save(root / "cat" / "lab.tif")
    bundle = load_image_folder(root, val_ratio=0.25, seed=0, image_size=8, in_chans=1)
    whole = whole_image_folder(root, ["cat", "dog", "fish"])
    whole.transform = bundle.train.transform
    samples = [whole[i] for i in range(len(whole))]
    assert bundle.bad_files == [] and len(samples) == 7
    assert all(image.shape == (1, 8, 8) for image, _ in samples)
