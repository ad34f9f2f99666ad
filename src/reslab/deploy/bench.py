"""``reslab bench``: inference and training speed of a model against torchvision and ONNX Runtime, in one run.

Columns and flags follow timm's ``benchmark.py`` (``infer_samples_per_sec``, ``infer_step_time`` in ms,
``infer_batch_size``, ``infer_img_size``, ``infer_gmacs`` per image, ``param_count`` in millions; ``train_*``
alike). Each row adds its ratio to the first baseline, the GFLOP/s it achieved and that rate's share of this
machine's matrix-product peak in the row's precision. Every backend runs with the same number of threads.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from reslab.deploy.export import OnnxRuntimeModel, export_onnx
from reslab.deploy.optimize import optimize
from reslab.machine import bf16_native, describe, matmul_peak, synchronize


@dataclass
class BenchSpec:
    """What to measure. ``precisions`` are reslab's rows; the baselines are added unless ``baselines`` is False."""

    model: nn.Module  # eval mode, with ``.name`` when it comes from the registry or a checkpoint
    batch_size: int = 256
    input_shape: tuple[int, int, int] = (3, 224, 224)
    bench: str = "inference"  # inference, train or both
    precisions: tuple[str, ...] = ("fp32",)
    channels_last: bool = True
    torchcompile: bool = True
    baselines: bool = True
    warmup: int = 2  # steps before timing; the first also compiles
    iters: int = 5  # rounds, each timing one step of every backend in turn; the median is reported
    backend: str = "auto"  # of reslab's fp32 and bf16 rows: torch, onnxruntime or auto (int8 is onnxruntime's)
    calibration: list[Tensor] | None = None  # int8's calibration batches (default: the benchmark's random input)


@dataclass
class BenchReport:
    machine: dict[str, object]
    peaks: dict[str, float]  # GFLOP/s of a 2048 x 2048 matrix product, per precision measured
    rows: list[dict[str, object]] = field(default_factory=list)


def torchvision_twin(model: nn.Module) -> nn.Module | None:
    """torchvision's model of the same name holding the same weights, or None where torchvision has no twin."""
    import torchvision

    builder = getattr(torchvision.models, getattr(model, "name", ""), None)
    if builder is None or not callable(builder):
        return None
    try:
        twin = builder(num_classes=model.fc.out_features)
        twin.load_state_dict(model.state_dict())
    except (RuntimeError, TypeError, AttributeError):  # another architecture under the same name
        return None
    return twin.eval().to(next(model.parameters()).device)


def _first_call(step: Callable[[], object], device: torch.device, warmup: int) -> float:
    """Seconds of the first call (which compiles where it must), then the rest of the warm-up."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    return first


def _timed(step: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def _interleaved(steps: list[Callable[[], object]], device: torch.device, rounds: int) -> list[float]:
    """Median seconds per step of each of ``steps``, timed in turn, one step each per round: a shared machine's
    slow moments then fall on every backend alike, not on whichever ran during them."""
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for step, seconds in zip(steps, times, strict=True):
            seconds.append(_timed(step, device))
    return [statistics.median(seconds) for seconds in times]


@dataclass
class _Candidate:
    backend: str
    precision: str
    build: Callable[[], nn.Module]  # the callable model, built only when its turn comes
    autocast: torch.dtype | None = None
    channels_last: bool = False


def _inference_candidates(spec: BenchSpec, onnx_dir: Path) -> list[_Candidate]:
    model, rows = spec.model, []
    if spec.baselines:
        twin = torchvision_twin(model)
        eager = twin or model
        who = "torchvision" if twin is not None else "reslab (no torchvision twin)"
        rows += [
            _Candidate(f"{who} eager", "fp32", lambda: eager),
            _Candidate(f"{who} channels-last + autocast", "bf16", lambda: eager, torch.bfloat16, channels_last=True),
        ]
        if next(model.parameters()).device.type == "cpu":
            shape = spec.input_shape
            exported = lambda: OnnxRuntimeModel(export_onnx(model, onnx_dir / "m.onnx", input_shape=shape))  # noqa: E731
            rows.append(_Candidate("onnxruntime", "fp32", exported))
    for precision in spec.precisions:  # labelled "reslab <backend>" once built: auto picks one
        compiled = spec.torchcompile and precision != "int8"
        rows.append(_Candidate("reslab", precision, _optimizer(spec, precision, compiled)))
    return rows


def _optimizer(spec: BenchSpec, precision: str, compiled: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        device = next(spec.model.parameters()).device
        calibration = spec.calibration or [torch.randn(spec.batch_size, *spec.input_shape, device=device)]
        return optimize(
            spec.model, precision, backend="auto" if precision == "int8" else spec.backend, compile=compiled,
            channels_last=spec.channels_last,
            calibration=calibration, input_shape=spec.input_shape,
        )  # fmt: skip

    return build


def _inference_step(candidate: _Candidate, x: Tensor, spec: BenchSpec) -> Callable[[], object]:
    net = candidate.build()
    if candidate.backend == "reslab":
        candidate.backend = f"reslab {net.backend}" + (" QDQ" if candidate.precision == "int8" else ", folded")
    if candidate.channels_last:
        net = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> Tensor:
        with torch.inference_mode(), torch.autocast(x.device.type, candidate.autocast or torch.float32,
                                                    enabled=candidate.autocast is not None):  # fmt: skip
            return net(x)

    return step


def _train_candidates(spec: BenchSpec) -> list[_Candidate]:
    model, rows = spec.model, []
    if spec.baselines:
        twin = torchvision_twin(model)
        who = "torchvision" if twin is not None else "reslab (no torchvision twin)"
        rows.append(_Candidate(f"{who} eager", "fp32", lambda: copy.deepcopy(twin or model)))
    for precision in (p for p in spec.precisions if p != "int8"):
        name = "reslab" + (", compiled" if spec.torchcompile else "")
        autocast = torch.bfloat16 if precision == "bf16" else None
        rows.append(_Candidate(name, precision, _train_model(spec), autocast, spec.channels_last))
    return rows


def _train_model(spec: BenchSpec) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        net = copy.deepcopy(spec.model)
        if spec.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return torch.compile(net) if spec.torchcompile else net

    return build


def _train_step(candidate: _Candidate, x: Tensor, spec: BenchSpec) -> Callable[[], object]:
    net = candidate.build().train()
    if candidate.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.model.fc.out_features, (x.shape[0],), device=x.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        with torch.autocast(x.device.type, candidate.autocast or torch.float32, enabled=candidate.autocast is not None):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _peaks(device: torch.device) -> dict[str, float]:
    # On GPUs, strict fp32 (no TF32), which cuDNN convolutions may beat with TF32: their share can pass 100%.
    peaks = {"fp32": matmul_peak(device, torch.float32)}
    if bf16_native(device):  # emulated bf16 has no peak worth the name
        peaks["bf16"] = matmul_peak(device, torch.bfloat16)
    return peaks


def _row(kind: str, candidate: _Candidate, times: tuple[float, float], spec: BenchSpec, macs: int) -> dict:
    first, step = times
    rate = spec.batch_size / step
    return {
        "model": getattr(spec.model, "name", type(spec.model).__name__),
        "backend": candidate.backend,
        "precision": candidate.precision,
        f"{kind}_samples_per_sec": round(rate, 2),
        f"{kind}_step_time": round(step * 1000, 3),  # ms, as timm
        f"{kind}_batch_size": spec.batch_size,
        f"{kind}_img_size": spec.input_shape[-1],
        f"{kind}_gmacs": round(macs / 1e9, 3),
        "param_count": round(sum(p.numel() for p in spec.model.parameters()) / 1e6, 2),
        # A training step costs about three forward passes (forward, and the two products of backward).
        "gflops": round(2 * macs * rate * (3 if kind == "train" else 1) / 1e9, 1),
        "first_call_s": round(first, 2),
    }


def run_bench(spec: BenchSpec, *, progress: Callable[[str], None] = lambda _: None) -> BenchReport:
    """Measure every row of ``spec`` (baselines first, then reslab's precisions): each is built and warmed up,
    then all are timed in turn for ``spec.iters`` rounds. ``progress`` hears what is being done."""
    from reslab.analysis.summary import summarize

    device = next(spec.model.parameters()).device
    macs = summarize(spec.model, spec.input_shape).macs
    report = BenchReport(machine=describe(device), peaks=_peaks(device))
    x = torch.randn(spec.batch_size, *spec.input_shape, device=device)
    kinds = ("inference", "train") if spec.bench == "both" else (spec.bench,)
    with tempfile.TemporaryDirectory() as onnx_dir:
        for kind in kinds:
            short = "infer" if kind == "inference" else "train"
            candidates = _inference_candidates(spec, Path(onnx_dir)) if kind == "inference" else _train_candidates(spec)
            prepare = _inference_step if kind == "inference" else _train_step
            steps, firsts = [], []
            for candidate in candidates:  # every backend built and warm before any is timed
                progress(f"{kind}: building and warming up {candidate.backend} {candidate.precision}")
                steps.append(prepare(candidate, x, spec))
                firsts.append(_first_call(steps[-1], device, spec.warmup))
            progress(f"{kind}: timing {len(steps)} backends in turn, {spec.iters} rounds")
            medians = _interleaved(steps, device, spec.iters)
            kind_rows = [
                _row(short, c, (first, step), spec, macs)
                for c, first, step in zip(candidates, firsts, medians, strict=True)
            ]
            _add_ratios(kind_rows, short, report.peaks)
            report.rows += kind_rows
    return report


def _add_ratios(rows: list[dict], kind: str, peaks: dict[str, float]) -> None:
    base = rows[0][f"{kind}_samples_per_sec"]
    for row in rows:
        row["ratio"] = round(row[f"{kind}_samples_per_sec"] / base, 2)
        # int8, and bf16 where it is emulated, are shown against the fp32 peak
        row["peak_precision"] = row["precision"] if row["precision"] in peaks else "fp32"
        row["peak_share"] = round(row["gflops"] / peaks[row["peak_precision"]], 3)
