"""reslab: the ResNet family (v1, v1.5, pre-activation v2, CIFAR, plain twins) in PyTorch."""

from reslab.errors import ReslabError
from reslab.models import ResNet, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ResNet", "ReslabError", "create_model", "list_models"]
