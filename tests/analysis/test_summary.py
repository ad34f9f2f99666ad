"""The summary reproduces the papers' tables: stage shapes, parameters, and FLOPs counted by torch."""

import pytest

from reslab.analysis.summary import summarize


@pytest.mark.parametrize(
    ("name", "shapes", "gmacs"),
    [
        # torchvision's model docs: ResNet-18 1.81 GFLOPS, ResNet-50 4.09 (they count multiply-adds).
        ("resnet18", [(64, 56, 56), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)], 1.81),
        ("resnet50", [(64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)], 4.09),
    ],
)
def test_imagenet_tables(name, shapes, gmacs):
    s = summarize(name, (3, 224, 224))
    assert [r.output_shape for r in s.rows[:-1]] == shapes
    assert s.rows[-1].output_shape == (1000,)
    assert round(s.macs / 1e9, 2) == gmacs
    assert s.params == {"resnet18": 11_689_512, "resnet50": 25_557_032}[name]


def test_cifar_table_and_overrides():
    s = summarize("resnet20", (1, 28, 28), in_chans=1, num_classes=10)
    assert [r.output_shape for r in s.rows] == [(16, 28, 28), (16, 28, 28), (32, 14, 14), (64, 7, 7), (10,)]
    assert round(summarize("resnet20", (3, 32, 32)).macs / 1e6) == 41  # ~41M MACs, as commonly reported


def test_stage_costs_add_up():
    s = summarize("preact_resnet164", (3, 32, 32))
    assert [r.name for r in s.rows] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert all(r.macs > 0 for r in s.rows)
