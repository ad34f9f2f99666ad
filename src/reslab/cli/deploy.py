"""``reslab export`` and ``reslab bench``: the deployment commands, wired from ``reslab.deploy``, and the
``--precision`` flags that ``eval`` and ``predict`` share with them."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import sys
from pathlib import Path

from reslab.errors import ReslabError

# reslab.deploy.optimize's; kept here so that parsing imports no deploy code
PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("auto", "torch", "onnxruntime")


def quiet_compiler_logs() -> None:
    """torch.compile on a CPU-only build of torch logs that it found no CUDA runtime: true, and not news."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def add_precision_flags(p: argparse.ArgumentParser) -> None:
    """``--precision`` and ``--compile`` for eval and predict: run ``reslab.deploy.optimize``'s copy."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="run the deployment copy (folded BatchNorm, channels-last) in this precision; int8 calibrates on "
        "512 training images (default: the model as trained)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="with --precision: torch, onnxruntime (fp32, int8; CPU) or auto: for fp32 on a CPU, time both on "
        "16 images and keep the faster (default)",
    )
    p.add_argument("--compile", action="store_true", help="with --precision fp32/bf16: torch.compile it first")


def note_precision(args: argparse.Namespace) -> None:
    """One line before a slow choice runs: bf16 where this machine only emulates it."""
    if getattr(args, "precision", None) is None:
        return
    quiet_compiler_logs()
    if args.precision == "bf16":
        from reslab.device import pick_device
        from reslab.machine import bf16_native

        if not bf16_native(pick_device(args.device)):
            print("note: this machine has no native bf16 (AVX-512 BF16, AMX or an Ampere GPU): it is emulated, "
                  "and slower than fp32", file=sys.stderr)  # fmt: skip


# --- reslab export -------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> None:
    from reslab.checkpoint import load_checkpoint, model_from_checkpoint
    from reslab.deploy.export import export_safetensors, model_metadata

    if args.int8 and args.format != "onnx":
        raise ReslabError("--int8 applies to --format onnx (safetensors holds the trained fp32 weights)")
    ckpt = load_checkpoint(args.checkpoint)
    model, metadata = model_from_checkpoint(ckpt), model_metadata(ckpt)
    suffix = {"onnx": ".int8.onnx" if args.int8 else ".onnx", "safetensors": ".safetensors"}[args.format]
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(suffix)
    if args.format == "safetensors":
        path = export_safetensors(model, out, metadata=metadata)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): weights, with the classes and normalization")
        return
    _export_onnx(args, ckpt, model, metadata, out)


def _export_onnx(args: argparse.Namespace, ckpt: dict, model, metadata: dict[str, str], out: Path) -> None:
    import tempfile

    import torch

    from reslab.deploy import fold_plan
    from reslab.deploy.export import check_onnx, export_onnx, quantize_onnx
    from reslab.inference import calibration_batches

    shape = tuple(json.loads(metadata["reslab.input_shape"]))
    plan = fold_plan(model)
    images = None
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx" if args.int8 else out, input_shape=shape, metadata=metadata)
        if args.int8:
            batches = calibration_batches(ckpt, data_dir=args.data_dir, images=args.calibration_images)
            quantize_onnx(fp32, out, batches)
            images = torch.cat(batches)
    name, why = next(iter(plan.kept.items()), ("", ""))
    kept = f"; {len(plan.kept)} kept, e.g. {name}: {why}" if plan.kept else ""
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {'int8' if args.int8 else 'fp32'}, dynamic batch; "
          f"{len(plan.folded)} BatchNorms folded into their convolutions{kept}")  # fmt: skip
    differences = check_onnx(out, model, input_shape=shape, images=images)
    against = "int8 ONNX Runtime vs fp32 PyTorch on training images" if args.int8 else "ONNX Runtime vs PyTorch"
    print(f"{against}, largest logit difference: " + ", ".join(f"batch {b}: {d:.2g}" for b, d in differences.items()))


# --- reslab bench --------------------------------------------------------------------------------------------


def _bench_model(args: argparse.Namespace):
    """(model in eval mode on the device, one image's (C, H, W)) from a registry name or a checkpoint."""
    import torch

    from reslab.device import pick_device
    from reslab.models import create_model, get_spec

    device = pick_device(args.device)
    if (args.img_size is not None and args.img_size < 1) or (args.threads is not None and args.threads < 1):
        raise ReslabError("--img-size and --threads must be at least 1")
    if "int8" in args.precision and device.type != "cpu":  # before any row is measured
        raise ReslabError("int8 runs on the CPU (ONNX Runtime): add --device cpu, or drop int8 from --precision")
    if Path(args.target).suffix in (".pt", ".pth") or Path(args.target).is_file():
        from reslab.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(args.target)
        model, info = model_from_checkpoint(ckpt), ckpt["dataset"]
        channels, size = info["channels"], args.img_size or info["image_size"][0]
    else:
        family = get_spec(args.target).family
        channels, size = args.in_chans, args.img_size or (32 if family == "cifar" else 224)
        model = create_model(args.target, num_classes=args.num_classes, in_chans=channels)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return model.eval().to(device), (channels, size, size)


def cmd_bench(args: argparse.Namespace) -> None:
    from reslab.deploy.bench import BenchSpec, run_bench

    quiet_compiler_logs()
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 1:
        raise ReslabError("-b, --iters and --warmup must be at least 1")
    model, shape = _bench_model(args)
    if "int8" in args.precision or (args.baselines and next(model.parameters()).device.type == "cpu"):
        from reslab.deploy.export import require

        for package in ("onnx", "onnxscript", "onnxruntime"):  # before any row is measured
            require(package)
    spec = BenchSpec(
        model=model, batch_size=args.batch_size, input_shape=shape, bench=args.bench,
        precisions=tuple(dict.fromkeys(args.precision)), channels_last=args.channels_last,
        torchcompile=args.torchcompile, baselines=args.baselines, warmup=args.warmup, iters=args.iters,
        backend=args.backend,
    )  # fmt: skip
    report = run_bench(spec, progress=lambda what: print(f"measuring {what}", file=sys.stderr, flush=True))
    _print_bench(report)
    if args.results_file:
        _write_results(report, Path(args.results_file), args.results_format, args.argv)


def _print_bench(report) -> None:
    from rich.console import Console
    from rich.table import Table

    m = report.machine
    peaks = ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in report.peaks.items())
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, flags: {' '.join(m['cpu_flags'])}"
    console = Console()
    console.print(f"{where}; torch {m['torch']}; matrix-product peak: {peaks}")
    for kind in ("infer", "train"):
        rows = [row for row in report.rows if f"{kind}_samples_per_sec" in row]
        if not rows:
            continue
        first = rows[0]
        title = f"{first['model']} {kind}, batch {first[f'{kind}_batch_size']}, {first[f'{kind}_img_size']}px"
        table = Table(title=title)
        for col in ("backend", "precision", "images/s", "step ms", "ratio", "GFLOP/s", "of peak", "1st call s"):
            table.add_column(col, justify="left" if col in ("backend", "precision") else "right")
        for row in rows:
            table.add_row(
                row["backend"], row["precision"], f"{row[f'{kind}_samples_per_sec']:.1f}",
                f"{row[f'{kind}_step_time']:.1f}", f"{row['ratio']:.2f}x", f"{row['gflops']:.0f}",
                f"{row['peak_share']:.0%} {row['peak_precision']}", f"{row['first_call_s']:.1f}",
            )  # fmt: skip
        console.print(table)


def _write_results(report, path: Path, fmt: str | None, argv: list[str]) -> None:
    fmt = fmt or ("csv" if path.suffix == ".csv" else "json")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        from reslab.machine import record

        provenance = {
            **record(report.machine["device"], command="reslab " + shlex.join(argv), peak=False),
            "machine": {**report.machine, "fp32_matmul_gflops": round(report.peaks["fp32"], 1)},
        }
        payload = {"provenance": provenance, "peaks": report.peaks, "rows": report.rows}  # fmt: skip
        path.write_text(json.dumps(payload, indent=2) + "\n")
    else:
        columns = list(dict.fromkeys(k for row in report.rows for k in row))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(report.rows)
    print(f"wrote {path}")


def add_parsers(sub) -> None:
    """The ``export`` and ``bench`` subcommands."""
    p = sub.add_parser("export", help="write a checkpoint as ONNX (fp32 or int8) or safetensors, ready to ship")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=("onnx", "safetensors"), default="onnx")
    p.add_argument("--int8", action="store_true", help="ONNX quantized to int8, calibrated on training images")
    p.add_argument("--out", default=None, help="default: next to the checkpoint (best.onnx, best.int8.onnx, ...)")
    p.add_argument("--data-dir", default=None, help="--int8: where the training images are, if moved")
    p.add_argument("--calibration-images", type=int, default=512)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help="inference/training speed against torchvision and ONNX Runtime (timm columns)")
    p.add_argument("target", metavar="MODEL|CKPT", help="a registry name (resnet50) or a checkpoint (runs/x/best.pt)")
    p.add_argument("--bench", choices=("inference", "train", "both"), default="inference")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=None, help="default: 224, 32 for CIFAR models, a checkpoint's own")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["fp32"], help="reslab's rows")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="of reslab's rows (see reslab eval --help)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--torchcompile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torchvision eager fp32 and bf16 channels-last, and ONNX Runtime fp32, in the same run",
    )
    p.add_argument("--threads", type=int, default=None, help="for every backend alike (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--iters",
        type=int,
        default=5,
        help="rounds that time one step of every backend in turn; the median is reported",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--results-file", default=None, help="write the rows and the machine there")
    p.add_argument("--results-format", choices=("json", "csv"), default=None, help="default: by the file's suffix")
    p.set_defaults(func=cmd_bench)
