"""Local weights load from the files users have: torchvision .pth, checkpoints, safetensors; bad files fail clearly."""

import collections

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from reslab import ReslabError, create_model


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(3)
    return torchvision.models.resnet18(num_classes=10).eval()


def _same_logits(model, reference):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},  # trainer checkpoints
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},  # DDP-wrapped
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # torch.compile-wrapped
    ],
)
def test_pth(tmp_path, reference, wrap):
    path = tmp_path / "w.pth"
    torch.save(wrap(reference.state_dict()), path)
    _same_logits(create_model("resnet18", num_classes=10, weights=path), reference)


def test_safetensors(tmp_path, reference):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    _same_logits(create_model("resnet18", num_classes=10, weights=path), reference)


def test_a_classifier_of_another_size_is_reinitialized_and_said(tmp_path, reference, capsys):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    model = create_model("resnet18", weights=path)  # 1000 classes here, 10 in the file
    assert "fc.weight re-initialized: (10, 512) in the weights, (1000, 512) here" in capsys.readouterr().out
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_wrong_architecture_lists_keys(tmp_path, reference):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    with pytest.raises(ReslabError, match="does not fit the model"):
        create_model("resnet34", num_classes=10, weights=path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(ReslabError, match="unsafe pickle"):
        create_model("resnet18", weights=path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.pth", None, "not found"),
        ("w.onnx", b"x", "unknown weights format"),
        ("broken.pth", b"not a zip", "not a readable PyTorch file"),
        ("broken.safetensors", b"\x00\x01", "not a readable safetensors file"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ReslabError, match=message):
        create_model("resnet18", weights=path)


def test_ordered_dict_with_non_tensor_metadata(tmp_path, reference):
    # torchvision's own files are OrderedDicts; some carry a _metadata attribute. Both are plain data.
    sd = collections.OrderedDict(reference.state_dict())
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    _same_logits(create_model("resnet18", num_classes=10, weights=path), reference)
