"""What this machine is and can do: its CPU flags or GPU, which precisions it runs natively, its matrix-product
peak, and ``record``: the one description of the machine, command, commit and date that every benchmark and
experiment writes beside its numbers (a claim holds on the machine it names)."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# The CPU features that decide which inference precision is fast: bf16 needs AVX-512 BF16 or AMX to run
# natively; int8 needs VNNI (or AMX) to multiply 8-bit values without saturating 16-bit sums.
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    first = path.read_text().split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def cpu_flags() -> list[str]:
    """The flags of ``FLAGS`` this CPU has (read from /proc/cpuinfo; empty where there is none)."""
    have = set(_cpuinfo().get("flags", "").split())
    return [f for f in FLAGS if f in have]


def int8_native() -> bool:
    """True where the CPU multiplies int8 in 32-bit sums (VNNI or AMX): no saturation, no reduced range."""
    return any(f in cpu_flags() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def bf16_native(device: torch.device) -> bool:
    """True where bf16 runs natively: an Ampere-or-later GPU, or a CPU with AVX-512 BF16 or AMX.

    The one bf16 test of reslab (``--amp auto`` and the deploy precisions ask it). On Linux it reads the CPU
    flags: oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says yes on AVX-512
    without BF16, where bf16 is emulated and slower than float32. Where there are no flags to read (macOS,
    Windows, ARM), oneDNN is asked.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if _cpuinfo().get("flags"):  # x86 Linux; ARM's cpuinfo lists "Features" instead
        return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def describe(device: torch.device) -> dict[str, object]:
    """The machine a measurement ran on: processor or GPU, cores, threads, flags, library versions."""
    info: dict[str, object] = {
        "cpu": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, *, n: int = 2048, seconds: float = 1.0
) -> float:
    """GFLOP/s of an n x n matrix product: the practical peak that a network's convolutions (matrix products
    underneath) can approach on this machine in this precision."""
    a = torch.randn(n, n, device=device).to(dtype)

    def product() -> torch.Tensor:
        return a @ a

    product()  # warm-up: first-call allocation and kernel selection
    reps, rates = 1, []
    while len(rates) < 3:  # double the repetitions until a timed batch lasts a third of ``seconds``; best of 3
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            product()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 3 or reps >= 4096:
            rates.append(2 * n**3 * reps / elapsed / 1e9)
        else:
            reps *= 2
    return max(rates)


def record(device: torch.device | str = "cpu", *, command: str | None = None, peak: bool = True) -> dict[str, object]:
    """What a result file says of where it came from: the command, the commit, the date and the machine
    (``describe`` plus the measured float32 matrix-product peak in GFLOP/s, and the GPU where there is one).

    Every benchmark and experiment stores this under its JSON's ``"provenance"`` key; the documentation labels
    each table with it. ``peak=False`` skips the 1-2 s peak measurement (``fp32_matmul_gflops`` is then None).
    """
    device = torch.device(device)
    machine = describe(device)
    machine["fp32_matmul_gflops"] = round(matmul_peak(device), 1) if peak else None
    return {
        "command": command or _command(),
        "commit": _commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
    }


def _command() -> str:
    """This process's command line as a user would type it: ``python benchmarks/x.py ...`` or ``reslab ...``."""
    first = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    if Path(first).name in ("reslab", "__main__.py"):  # the console script, or python -m reslab
        head = ["reslab"]
    elif first.endswith(".py"):
        path = Path(first)
        with contextlib.suppress(ValueError):  # a script outside the working folder keeps its absolute path
            path = path.resolve().relative_to(Path.cwd())
        head = ["python", str(path)]
    else:
        head = [Path(first).name]
    return shlex.join(head + sys.argv[1:])


def _commit() -> str | None:
    """The repository's commit, with ``-dirty`` when files differ from it; ``$RESLAB_COMMIT`` where the checkout
    is a copy without git (the lent GPU machine's); None where reslab is not run from its own checkout (an
    installed copy inside some other repository would name that one's commit)."""
    here = Path(__file__).resolve().parent
    if not (here.parents[1] / "pyproject.toml").is_file():  # src/reslab/machine.py -> the checkout's root
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return os.environ.get("RESLAB_COMMIT")
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("RESLAB_COMMIT")
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
