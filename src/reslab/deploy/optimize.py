"""The fastest inference copy of a model that this machine runs: folded BatchNorm, channels-last, compiled,
in fp32, bf16 or int8.

- fp32 and bf16: ``fold_bn``, channels-last, weights cast once (bf16 holds no per-call casts, unlike autocast),
  then ``torch.compile``: on a CPU with freezing (weights become constants that inductor pre-packs for oneDNN),
  on a GPU with max-autotune and CUDA graphs. Calls run under ``torch.inference_mode``.
- fp32 on a CPU can also run in ONNX Runtime (folded, exported): ``backend="auto"`` times both and keeps the
  faster. On this project's AVX2 CPU ONNX Runtime won: 14.9 against 12.7 images/s for ResNet-50 at batch 16
  (``reslab bench``, benchmarks/results/bench_resnet50_b16_cpu*.json, README "Deployment and performance").
- int8: exported to ONNX and quantized statically by ONNX Runtime (``export.quantize_onnx``), calibrated on
  training images; ONNX Runtime then runs it on the CPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from reslab.deploy.export import OnnxRuntimeModel, export_onnx, quantize_onnx
from reslab.deploy.fold import fold_bn
from reslab.errors import ReslabError

PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("auto", "torch", "onnxruntime")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class InferenceModel(nn.Module):
    """A folded, cast and (optionally) compiled model: (B, C, H, W) float -> (B, classes) float32 logits.

    A compiled model is specialized to the first batch size it sees; a smaller batch later (the last one of a
    dataset) is padded with zeros up to it and the padding's outputs dropped, which costs less than compiling
    again, and is exact: in inference each image's output is independent of the rest of its batch. A larger
    batch compiles again.
    """

    def __init__(self, net: nn.Module, *, dtype: torch.dtype, channels_last: bool, compiled: bool) -> None:
        super().__init__()
        self.net, self.dtype, self.channels_last, self.compiled = net, dtype, channels_last, compiled
        self.compiled_batch: int | None = None
        self.backend = "torch.compile" if compiled else "torch eager"

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if self.compiled:
            self.compiled_batch = self.compiled_batch or n
            if n < self.compiled_batch:
                x = torch.cat([x, x.new_zeros(self.compiled_batch - n, *x.shape[1:])])
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.inference_mode():
            logits = self.net(x.to(self.dtype).contiguous(memory_format=memory_format))
        # A copy: under CUDA graphs the output lives in a buffer that the next call overwrites.
        return logits[:n].float() if logits.dtype != torch.float32 else logits[:n].clone()


def _compile(net: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":  # max-autotune's kernel search, then CUDA graphs: one launch per batch
        return torch.compile(net, mode="max-autotune", dynamic=False)
    # Freezing treats the weights as constants: inductor folds them and pre-packs them in oneDNN's layout.
    return torch.compile(net, options={"freezing": True}, dynamic=False)


def optimize(
    model: nn.Module,
    precision: str = "fp32",
    *,
    backend: str = "auto",
    compile: bool = True,
    channels_last: bool = True,
    calibration: Iterable[Tensor] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> nn.Module:
    """An inference copy of ``model`` (left unchanged), on ``model``'s device.

    Args:
        model: an eval-mode model, e.g. ``model_from_checkpoint(ckpt)``.
        precision: ``"fp32"``; ``"bf16"`` (native on Ampere+ GPUs and CPUs with AVX-512 BF16 or AMX, emulated
            and slow elsewhere: ``reslab.machine.bf16_native`` tells); ``"int8"`` (CPU, ONNX Runtime).
        backend: ``"torch"`` (folded, cast, compiled), ``"onnxruntime"`` (fp32 or int8, CPU) or ``"auto"``:
            for fp32 on a CPU with ``input_shape`` given, both are built, timed on a batch of 16, and the
            faster kept (on this project's AVX2 CPU ONNX Runtime's convolutions won); otherwise torch.
        compile: ``torch.compile`` the torch copy; its first call per batch size compiles (seconds).
        channels_last: NHWC activations, the layout oneDNN and cuDNN convolutions are fastest in.
        calibration: int8 only: batches (B, C, H, W) of normalized training images that set the int8 ranges.
        input_shape: one image's (C, H, W): needed by ONNX Runtime (int8, and fp32 on that backend).

    Returns:
        A module mapping (B, C, H, W) float inputs to (B, classes) float32 logits; its ``backend`` attribute
        says what runs it.
    """
    if precision not in PRECISIONS:
        raise ReslabError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if backend not in BACKENDS:
        raise ReslabError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if model.training:
        raise ReslabError("optimize needs a model in eval mode: call model.eval() first")
    device = next(model.parameters()).device
    if precision == "int8":
        if backend == "torch":
            raise ReslabError("int8 runs through ONNX Runtime: use the onnxruntime or auto backend")
        return _int8(model, device, calibration, input_shape)
    if backend == "onnxruntime":
        return _onnxruntime_fp32(model, device, precision, input_shape)
    fast = _torch_copy(model, precision, compile=compile, channels_last=channels_last, device=device)
    if backend == "auto" and precision == "fp32" and device.type == "cpu" and input_shape and _has_onnxruntime():
        return _faster(fast, _onnxruntime_fp32(model, device, precision, input_shape), input_shape)
    return fast


def _torch_copy(
    model: nn.Module, precision: str, *, compile: bool, channels_last: bool, device: torch.device
) -> InferenceModel:
    dtype = _DTYPES[precision]
    net = fold_bn(model).to(dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile:
        net = _compile(net, device)
    return InferenceModel(net, dtype=dtype, channels_last=channels_last, compiled=compile)


def _has_onnxruntime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def _onnxruntime_fp32(
    model: nn.Module, device: torch.device, precision: str, input_shape: tuple[int, int, int] | None
) -> nn.Module:
    if precision != "fp32" or device.type != "cpu" or input_shape is None:
        raise ReslabError("the onnxruntime backend runs fp32 or int8 on the CPU, and needs the input shape")
    with tempfile.TemporaryDirectory() as tmp:
        return OnnxRuntimeModel(export_onnx(model, Path(tmp) / "fp32.onnx", input_shape=input_shape))


def _faster(first: nn.Module, second: nn.Module, input_shape: tuple[int, int, int]) -> nn.Module:
    """The one of two copies that runs a batch of 16 sooner (best of 3 runs, after one that may compile)."""
    x = torch.randn(16, *input_shape)

    def seconds(net: nn.Module) -> float:
        net(x)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            net(x)
            runs.append(time.perf_counter() - start)
        return min(runs)

    chosen = first if seconds(first) <= seconds(second) else second
    if isinstance(chosen, InferenceModel):
        chosen.compiled_batch = None  # the timing batch does not set the size that later batches are padded to
    return chosen


def _int8(
    model: nn.Module,
    device: torch.device,
    calibration: Iterable[Tensor] | None,
    input_shape: tuple[int, int, int] | None,
) -> nn.Module:
    if device.type != "cpu":
        raise ReslabError("int8 runs on the CPU (ONNX Runtime): add --device cpu, or use bf16 on a GPU")
    if calibration is None or input_shape is None:
        raise ReslabError("int8 needs calibration images and the input shape")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", input_shape=input_shape)
        int8 = quantize_onnx(fp32, Path(tmp) / "int8.onnx", calibration)
        return OnnxRuntimeModel(int8)  # the session holds the model in memory once created
