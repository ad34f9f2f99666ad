"""The shipped reference twins: present, small, checked against their SHA-256, and as accurate as recorded."""

import shutil

import pytest

from reslab.errors import ReslabError
from reslab.explain import reference

NAMES = ("plain20", "resnet20", "plain56", "resnet56")


def test_the_four_twins_are_shipped_with_their_provenance():
    manifest = reference.manifest()
    assert manifest is not None and reference.shipped() == NAMES
    assert {"command", "commit", "date", "machine", "seconds", "steps", "recipe"} <= set(manifest)
    assert manifest["command"].startswith("python benchmarks/reference_twins.py")
    total = sum((reference.FOLDER / entry["file"]).stat().st_size for entry in manifest["models"].values())
    assert total <= 12 * 2**20  # the limit for the four together


@pytest.mark.parametrize("name", NAMES)
def test_each_loads_and_gives_its_recorded_accuracy(name):
    model, entry = reference.load_weights(name)
    assert not model.training and model.config == entry["model_config"]
    accuracy, images = reference.test_accuracy(name, images=1000)
    # The same images, weights and float32 arithmetic; another thread count may round one image differently.
    assert images == 1000 and accuracy == pytest.approx(entry["test_acc_first_1000"], abs=1.5e-3)


def test_a_damaged_file_or_an_unknown_name_is_one_line(tmp_path, monkeypatch):
    copy = tmp_path / "reference_nets"
    shutil.copytree(reference.FOLDER, copy)
    data = (copy / "resnet20.safetensors").read_bytes()
    (copy / "resnet20.safetensors").write_bytes(data[:-8] + bytes(8))
    monkeypatch.setattr(reference, "FOLDER", copy)
    monkeypatch.setattr(reference, "MANIFEST", copy / "manifest.json")
    with pytest.raises(ReslabError, match="fail their SHA-256 check"):
        reference.load_weights("resnet20")
    with pytest.raises(ReslabError, match=r"no shipped trained weights for resnet110 \(shipped: plain20"):
        reference.check_shipped(["resnet20", "resnet110"])
