"""Fast inference and deployment: folded BatchNorm, optimized fp32/bf16/int8 copies, ONNX and safetensors
export, and the benchmark behind ``reslab bench``."""

from reslab.deploy.fold import FoldPlan, fold_bn, fold_plan
from reslab.deploy.optimize import PRECISIONS, InferenceModel, optimize

__all__ = ["PRECISIONS", "FoldPlan", "InferenceModel", "fold_bn", "fold_plan", "optimize"]
