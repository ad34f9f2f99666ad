"""Fast inference and deployment: folded BatchNorm, optimized fp32/bf16/int8 copies, ONNX and safetensors
export, and the benchmark behind ``reslab bench``. onnx, onnxscript and onnxruntime (``reslab[deploy]``) are
imported only by what needs them."""

from reslab.deploy.export import (
    OnnxRuntimeModel,
    check_onnx,
    export_onnx,
    export_safetensors,
    model_metadata,
    quantize_onnx,
    read_onnx_metadata,
)
from reslab.deploy.fold import FoldPlan, fold_bn, fold_plan
from reslab.deploy.optimize import PRECISIONS, InferenceModel, optimize

__all__ = [
    "PRECISIONS",
    "FoldPlan",
    "InferenceModel",
    "OnnxRuntimeModel",
    "check_onnx",
    "export_onnx",
    "export_safetensors",
    "fold_bn",
    "fold_plan",
    "model_metadata",
    "optimize",
    "quantize_onnx",
    "read_onnx_metadata",
]
