"""The ResNet family: blocks, the generic ResNet, and the registry of named variants."""

from reslab.models.blocks import (
    BasicBlock,
    Bottleneck,
    DropPath,
    PreActBasicBlock,
    PreActBottleneck,
    ZeroPadShortcut,
)
from reslab.models.pretrained import load_pretrained, read_pretrained
from reslab.models.registry import ModelSpec, create_model, get_spec, list_models
from reslab.models.resnet import ResNet
from reslab.models.weights import read_state_dict

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DropPath",
    "ModelSpec",
    "PreActBasicBlock",
    "PreActBottleneck",
    "ResNet",
    "ZeroPadShortcut",
    "create_model",
    "get_spec",
    "list_models",
    "load_pretrained",
    "read_pretrained",
    "read_state_dict",
]
