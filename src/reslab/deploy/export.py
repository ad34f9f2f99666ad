"""Ship a trained model: ONNX (fp32, or int8 through ONNX Runtime's static quantization) and safetensors.

Each file carries what another program needs to use it alone: the class names, the input size and the
normalization (``x = (pixel / 255 - mean) / std``, per channel), under ``reslab.*`` metadata keys.
onnx, onnxscript and onnxruntime are the optional extra ``reslab[deploy]``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from reslab.deploy.fold import fold_bn
from reslab.errors import ReslabError
from reslab.machine import int8_native

INPUT, OUTPUT = "image", "logits"


def require(module: str) -> object:
    """Import an optional deployment package, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReslabError(
            f"this needs {module}: pip install 'reslab[deploy]' (onnx, onnxscript, onnxruntime)"
        ) from None


def export_onnx(
    model: nn.Module, path: str | Path, *, input_shape: tuple[int, int, int], metadata: Mapping[str, str] = {}
) -> Path:
    """Write ``model`` as fp32 ONNX with a dynamic batch dimension: input ``image`` (B, C, H, W) normalized,
    output ``logits`` (B, classes). BatchNorms are folded first (``fold_bn``).

    The example batch has 2 images: with 1, the new exporter fixes the batch size at 1 (pytorch#157621).
    """
    require("onnxscript")
    onnx = require("onnx")
    path = Path(path)
    folded = fold_bn(model).cpu().float()
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each of its passes
        program = torch.onnx.export(
            folded, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: batch},), external_data=False,
        )  # fmt: skip
    proto = program.model_proto
    _set_metadata(proto, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _set_metadata(proto, metadata: Mapping[str, str]) -> None:
    kept = {p.key: p.value for p in proto.metadata_props if p.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``reslab.*`` (and any other) metadata of an ONNX file, as strings."""
    ort = require("onnxruntime")
    return dict(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, called like a model: (B, C, H, W) float -> (B, classes) float32.

    Args:
        path: the .onnx file.
        threads: ONNX Runtime's intra-op threads (default: torch's, so that both are measured alike).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        super().__init__()
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle threads sleep instead of spinning, so that they never take a core from other work on the machine
        # (reslab bench times several backends in turn, in one process).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path, self.backend = str(path), "onnxruntime"
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

    def forward(self, x: Tensor) -> Tensor:
        array = x.detach().float().cpu().contiguous().numpy()
        (logits,) = self.session.run([OUTPUT], {INPUT: array})
        return torch.from_numpy(logits).to(x.device)


def check_onnx(
    path: str | Path,
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    batch_sizes: Iterable[int] = (1, 3, 16),
    images: Tensor | None = None,
) -> dict[int, float]:
    """Largest |ONNX Runtime - PyTorch| logit difference at each batch size, ``model`` in eval mode: on the first
    ``images`` (real, normalized ones: int8 ranges are calibrated for them), or on seeded random inputs."""
    runtime = OnnxRuntimeModel(path)
    on_cpu = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    generator = torch.Generator().manual_seed(0)
    differences = {}
    with torch.no_grad():
        for b in batch_sizes:
            x = images[:b].float().cpu() if images is not None else torch.randn(b, *input_shape, generator=generator)
            differences[len(x)] = (runtime(x) - on_cpu.float()(x)).abs().max().item()
    return differences


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over batches of normalized images (B, C, H, W)."""

    def __init__(self, batches: Iterable[Tensor]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch.detach().float().cpu().contiguous().numpy()}


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration: Iterable[Tensor],
    *,
    weights: str = "auto",
    fp32_ends: bool = True,
) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) of an fp32 ONNX file, calibrated on ``calibration``.

    Activations are uint8. ``weights="auto"`` makes weights int8 where the CPU has VNNI and uint8 where it has
    not, because x86's u8 x s8 instruction (VPMADDUBSW) saturates its 16-bit sums (ONNX Runtime's quantization
    guide), while u8 x u8 does not. ``fp32_ends`` keeps the first convolution and the classifier in fp32, as is
    usual: they hold a few percent of the work and much of the error. ``benchmarks/int8_choices.py`` measures
    both choices (README, "Deployment and performance").
    """
    if weights not in ("auto", "int8", "uint8"):
        raise ReslabError(f"int8 weights must be auto, int8 or uint8, not {weights!r}")
    require("onnx")
    quantization = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    signed = weights == "int8" or (weights == "auto" and int8_native())
    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantization.quantize_static(
            str(prepared),
            str(int8_path),
            _Calibration(calibration),
            nodes_to_exclude=_first_and_last_layers(prepared) if fp32_ends else [],
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8 if signed else quantization.QuantType.QUInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
    # Which weights: a file with int8 weights saturates on a CPU without VNNI (see above).
    _copy_metadata(
        fp32_path, int8_path, {"reslab.precision": "int8", "reslab.int8_weights": "int8" if signed else "uint8"}
    )
    return int8_path


def _first_and_last_layers(path: Path) -> list[str]:
    """Names of the convolution that reads the image and of the classifier's matrix products."""
    onnx = require("onnx")
    graph = onnx.load(str(path)).graph
    first = [n.name for n in graph.node if n.op_type == "Conv" and n.input[0] == graph.input[0].name]
    return first + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]


def _copy_metadata(source: str | Path, target: str | Path, extra: Mapping[str, str]) -> None:
    onnx = require("onnx")
    metadata = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    proto = onnx.load(str(target))
    _set_metadata(proto, {**metadata, **extra})
    onnx.save(proto, str(target))


def export_safetensors(model: nn.Module, path: str | Path, *, metadata: Mapping[str, str] = {}) -> Path:
    """The model's weights (not folded: they load back into reslab or torchvision) as a safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=dict(metadata))
    return path


def model_metadata(ckpt: Mapping[str, object]) -> dict[str, str]:
    """The ``reslab.*`` metadata of a checkpoint's model: name, config, classes, input size, normalization."""
    info = ckpt["dataset"]
    return {
        "reslab.model": str(ckpt["model_name"]),
        "reslab.config": json.dumps(ckpt["model_config"]),
        "reslab.classes": json.dumps(list(info["classes"])),
        "reslab.input_shape": json.dumps([info["channels"], *info["image_size"]]),
        "reslab.mean": json.dumps(list(info["mean"])),
        "reslab.std": json.dumps(list(info["std"])),
        "reslab.normalization": "x = (pixel / 255 - mean) / std, per channel; input (batch, C, H, W) float32",
        # Image files: the shorter side resized to `resize` then centre-cropped (0: the whole image resized).
        "reslab.resize": json.dumps(
            {"resize": info.get("resize", 0), "interpolation": info.get("interpolation", "bilinear")}
        ),
        "reslab.precision": "fp32",
    }
