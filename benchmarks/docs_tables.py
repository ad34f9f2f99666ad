"""The result tables of the documentation, each rendered from the JSON file a benchmark wrote.

Every function takes the repository root and returns the Markdown of one generated block: the table, then
one line naming the command, the machine (as the file records it) and the file. ``docs_pages.py`` puts each
block between its markers in the pages and checks that the pages still say what the files say.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path("benchmarks/results")


def load(root: Path, name: str) -> dict:
    """The JSON file ``benchmarks/results/<name>`` under ``root``."""
    return json.loads((root / RESULTS / name).read_text())


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine_text(provenance: dict) -> str:
    """The machine as the file records it: cores, CPU, key flags, torch, matrix-product peak, GPU."""
    m = provenance.get("machine")
    if not m:
        return "a machine its provenance does not record"
    cpu = m.get("cpu") or "unrecorded"
    article = "an" if cpu[0].lower() in "aeiou" else "a"
    flags = m.get("cpu_flags")
    if m.get("cores"):
        text = f"{m['cores']} cores of {article} {cpu}" + (
            f" ({', '.join(flags)})" if flags else " (flags not recorded)"
        )
    else:
        text = f"{article} {cpu} CPU ({m.get('threads', '?')} threads; cores" + (
            f" not recorded; {', '.join(flags)})" if flags else " and CPU flags not recorded)"
        )
    text += f", torch {m['torch']}" if m.get("torch") else ""
    if m.get("gpu"):
        text += f", GPU {m['gpu']}"
    if m.get("fp32_matmul_gflops"):
        text += f"; {m['fp32_matmul_gflops']:.1f} GFLOP/s fp32 matrix product"
    return text


def source(record: dict, path: str, command: str | None = None) -> str:
    """One line under a table: which command, on which machine, wrote which file."""
    prov = record.get("provenance", {})
    command = prov.get("command") or command
    said = f"`{command.strip()}`" if command else "A command the file does not record"
    return f"{said} on {machine_text(prov)}; `{RESULTS / path}`."


def transfer_table(record: dict) -> str:
    """The table of benchmarks/transfer.py's ``record``: test accuracy on the five other classes by method."""
    rows = list(record["rows"].values())
    shots = sorted({row["shots"] for row in rows})
    methods = list(dict.fromkeys((row["method"], row["what"]) for row in rows))
    body = []
    for method, what in methods:
        cells = []
        for s in shots:
            row = record["rows"].get(f"{method}/{s}")
            cells.append(f"{row['mean']:.1%} ± {row['stdev']:.1%}" if row else "")
        body.append([f"{method.replace('_', ' ')} ({what})", *cells])
    return table(["method", *(f"{s} images per class" for s in shots)], body)


def transfer(root: Path) -> str:
    """Test accuracy on the five other classes, mean +- spread over seeds (benchmarks/transfer.py)."""
    record = load(root, "transfer_fashion_mnist_cpu.json")
    rows = list(record["rows"].values())
    seconds = record["pretrain"]["seconds"] + sum(r["seconds"] for row in rows for r in row["runs"])
    pre = record["pretrain"]
    return (
        transfer_table(record)
        + f"\n\nPretrained on the five clothes classes: {pre['test_acc']:.2%} test accuracy ({pre['steps']} steps of "
        f"128); {seconds / 60:.0f} min in all. " + source(record, "transfer_fashion_mnist_cpu.json")
    )


def reference_accuracy(root: Path) -> str:
    """The shipped twins on the whole test set, against what their manifest recorded."""
    record = load(root, "reference_accuracy_cpu.json")
    rows = [
        [name, f"{r['images']:,}", pct(r["test_acc"]), pct(r["recorded"]), f"{100 * r['difference']:+.2f} points"]
        for name, r in record["models"].items()
    ]
    header = ["shipped net", "test images", "test accuracy here", "manifest (GPU run)", "difference"]
    return table(header, rows) + "\n\n" + source(record, "reference_accuracy_cpu.json")


def memory_format(root: Path) -> str:
    """Images/s in NCHW and NHWC (benchmarks/memory_format.py)."""
    record = load(root, "memory_format_cpu.json")
    rows = [
        [
            f"{r['model']}, {r['batch']}, {r['size']}x{r['size']}",
            r["mode"],
            r["dtype"],
            f"{r['nchw_img_s']}",
            f"{r['nhwc_img_s']}",
            f"{r['nhwc_over_nchw']}x",
        ]
        for r in record["results"]
    ]
    header = ["model, batch, input", "mode", "dtype", "NCHW", "NHWC", "NHWC / NCHW"]
    return table(header, rows) + "\n\n" + source(record, "memory_format_cpu.json")


THROUGHPUT_PATHS = {  # path in the file: (what it is, the precision whose peak it is measured against)
    "baseline_fp32_nchw_dataloader": (
        "baseline: DataLoader (2 workers) with per-image RandomCrop + flip, fp32, NCHW",
        "float32",
    ),
    "baseline_fp32_nchw_dataloader_no_workers": ("the same baseline with no DataLoader workers", "float32"),
    "reslab_data_fp32_nchw": ("reslab's batch augmentation, fp32, NCHW", "float32"),
    "reslab_default_path": ("reslab's default path: batch augmentation, bf16 autocast, channels-last", "bfloat16"),
    "reslab_default_path_compiled": ("the same under `torch.compile`", "bfloat16"),
}


def throughput(root: Path) -> str:
    """Training images/s of each data and precision path, and its share of the matrix-product peak."""
    record = load(root, "throughput_cpu.json")
    peaks = record["matmul_peak_gflops"]
    rows = []
    for r in record["results"]:
        what, precision = THROUGHPUT_PATHS.get(r["path"], (r["path"], "float32"))
        rows.append(
            [
                what,
                f"{r['images_per_second']:,.1f}",
                f"{r['speedup']:.2f}x",
                f"{pct(r['share_of_peak'], 1)} of {precision}",
            ]
        )
    peak = ", ".join(f"{v:,.1f} in {k}" for k, v in peaks.items())
    return (
        table(["path", "images/s", "vs. baseline", "share of peak"], rows)
        + f"\n\n{record['model']}, batch {record['batch_size']}; matrix-product peak measured by the same run: {peak}"
        f" GFLOP/s. " + source(record, "throughput_cpu.json")
    )


LOOP_PATHS = {
    "bare_step": "the bare step (forward, backward, fused SGD on the loader's batches)",
    "bare_step_eager": "the bare step, eager (not compiled)",
    "reslab_train_sync_every_1": "`reslab train`, the host looking at every step",
    "reslab_train_sync_every_10": "`reslab train`, the host looking every 10 steps",
}


def loop_overhead(root: Path) -> str:
    """`reslab train` against the bare step, eager and compiled (benchmarks/loop_overhead.py)."""
    parts = []
    for name in ("loop_overhead_cpu.json", "loop_overhead_cpu_compiled.json"):
        record = load(root, name)
        label = "compiled" if record.get("compile") else "eager"
        rows = [
            [LOOP_PATHS.get(r["path"], r["path"]), f"{r['images_per_second']:,.1f}", pct(r["share_of_bare_step"], 1)]
            for r in record["results"]
        ]
        parts.append(
            f"**{label}**, {record['model']}, batch {record['batch_size']}:\n\n"
            + table(["path", "images/s", "of the bare step"], rows)
            + "\n\n"
            + source(record, name)
        )
    return "\n\n".join(parts)


def _flags(record: dict) -> list[str]:
    return (record.get("provenance", {}).get("machine") or {}).get("cpu_flags") or []


def bench(root: Path) -> str:
    """`reslab bench resnet50`: every backend and precision in one run, then the torch backend alone."""
    parts = []
    for name in ("bench_resnet50_b16_cpu.json", "bench_resnet50_b16_cpu_torch_backend.json"):
        record = load(root, name)
        native_bf16 = any(f in _flags(record) for f in ("avx512_bf16", "amx_bf16"))
        rows = []
        for r in record["rows"]:
            precision = r["precision"] + (" (emulated)" if r["precision"] == "bf16" and not native_bf16 else "")
            rows.append(
                [
                    r["backend"],
                    precision,
                    f"{r['infer_samples_per_sec']:.2f}",
                    f"{r['ratio']:.2f}x",
                    f"{r['gflops']:.0f}",
                    f"{pct(r['peak_share'], 1)} of {r['peak_precision']}",
                ]
            )
        header = ["backend", "precision", "images/s", "vs the first row", "GFLOP/s", "share of peak"]
        peaks = ", ".join(f"{v:.0f} GFLOP/s in {k}" for k, v in record["peaks"].items())
        parts.append(table(header, rows) + f"\n\nMatrix-product peak in the same run: {peaks}. " + source(record, name))
    return "\n\n".join(parts)


def int8_choices(root: Path) -> str:
    """int8 quantization choices on the tests' small model (benchmarks/int8_choices.py)."""
    record = load(root, "int8_choices_cpu.json")
    rows = [[name, pct(r["accuracy"]), pct(r["agreement"])] for name, r in record["rows"].items()]
    return (
        table(["model", "test accuracy", "top-1 agreement with eager fp32"], rows)
        + f"\n\nCheckpoint `{record['checkpoint']}`, 10,000 test images. "
        + source(record, "int8_choices_cpu.json")
    )


def deploy_accuracy(root: Path) -> str:
    """Accuracy of each deployment precision on a trained checkpoint (benchmarks/deploy_accuracy.py)."""
    record = load(root, "deploy_accuracy_demo_cpu.json")
    rows = []
    for name, r in record["rows"].items():
        drop = 100 * r["accuracy_drop"]
        rows.append(
            [
                name,
                r.get("backend", "torch"),
                pct(r["accuracy"]),
                pct(r["agreement"]),
                f"{drop:+.2f} points" + (" (a gain)" if drop < -0.005 else ""),
                f"{r['seconds']:.1f}",
            ]
        )
    header = ["model", "backend", "test accuracy", "top-1 agreement with eager fp32", "accuracy drop", "seconds"]
    command = (
        f"python benchmarks/deploy_accuracy.py {record['checkpoint']} --out {RESULTS}/deploy_accuracy_demo_cpu.json"
    )
    return (
        table(header, rows)
        + f"\n\nCheckpoint `{record['checkpoint']}`, 10,000 test images, no test-time flip. "
        + source(record, "deploy_accuracy_demo_cpu.json", command)
    )


def _time_to_accuracy_command(record: dict, name: str) -> str:
    """The benchmark's command line, rebuilt from what the file records (its own command was not recorded)."""
    parts = ["python benchmarks/time_to_accuracy.py", record["recipe"]]
    if record["seeds"] != [0]:
        parts += ["--seeds", *map(str, record["seeds"])]
    target = record["target"]
    if target["test_acc"] != 0.94:
        parts.append(f"--target {target['test_acc']}")
    if target["seconds"]:
        parts.append(f"--max-seconds {target['seconds']:.0f}")
    if target["train_images"]:
        parts.append(f"--max-images {target['train_images']}")
    stem = Path(record["recipe"]).stem
    if name != f"time_to_accuracy_{stem}_cpu.json":
        parts.append(f"--name {name.removeprefix('time_to_accuracy_').removesuffix('_cpu.json')}")
    run = record["runs"][0]["command"].split()
    after_out_dir = run[run.index("--out-dir") + 2 :]  # flags passed through to `reslab train`
    if after_out_dir:
        parts += ["--", *after_out_dir]
    return " ".join(parts)


TIME_TO_ACCURACY = (
    "time_to_accuracy_fashion_mnist_fast_cpu.json",
    "time_to_accuracy_fashion_mnist_best_cpu.json",
    "time_to_accuracy_fashion_mnist_fast_compiled_cpu.json",
)


def time_to_accuracy(root: Path) -> str:
    """Each time-to-accuracy run against its target (benchmarks/time_to_accuracy.py)."""
    rows, machines = [], set()
    for name in TIME_TO_ACCURACY:
        record = load(root, name)
        machines.add(machine_text(record["provenance"]))
        target, runs = record["target"], record["runs"]
        goal = f">= {pct(target['test_acc'], 1)}"
        goal += f" within {target['seconds']:,.0f} s" if target["seconds"] else ""
        goal += f" and {target['train_images']:,} training images" if target["train_images"] else ""
        goal += f", median of {len(runs)} seeds" if len(runs) > 1 else f" (seed {runs[0]['seed']})"
        if len(runs) > 1:
            accs = ", ".join(f"{100 * r['test_acc']:.2f}" for r in runs)
            result = (
                f"median {pct(record['median_test_acc'])} ({accs}) in a median {record['median_seconds']:,.1f} s "
                f"({record['min_seconds']:,.1f} to {record['max_seconds']:,.1f}), {record['train_images']:,} images"
            )
        else:
            r = runs[0]
            result = (
                f"{pct(r['test_acc'])} in {r['seconds_to_test_result']:,.1f} s ({r['epochs_run']} epochs, "
                f"{r['train_images']:,} images)"
            )
        short = 100 * (target["test_acc"] - record["median_test_acc"])
        within = [
            what
            for what, ok in (
                ("time", target["seconds"] and record["max_seconds"] <= target["seconds"]),
                ("images", target["train_images"] and record["train_images"] <= target["train_images"]),
            )
            if ok
        ]
        met = "yes" if record["reached"] else f"no: {short:.2f} points short"
        met += (
            f"; {' and '.join(within)} within budget"
            if within
            else ("; over the time budget" if target["seconds"] else "")
        )
        rows.append([goal, f"`{_time_to_accuracy_command(record, name)}`", result, met])
    assert len(machines) == 1, f"time-to-accuracy runs from different machines: {machines}"
    return (
        table(["target", "command", "result", "met?"], rows)
        + f"\n\nOn {machines.pop()}; each run's record, with its `reslab train` command, in "
        + ", ".join(f"`{RESULTS / n}`" for n in TIME_TO_ACCURACY)
        + "."
    )


DEMO_ABLATION = {  # variant in the file: what it changes, as the table says it
    "b128": "**the recipe** (batch 128, lr 0.1, 780 steps)",
    "b64": "batch 64 at lr 0.05 (1,560 steps)",
    "demo": "batch 256 at lr 0.2 (390 steps; the recipe before this ablation)",
    "no_label_smoothing": "batch 256, no label smoothing",
    "no_augmentation": "batch 256, no crops or flips",
    "noaug_nols": "batch 256, no crops, flips or label smoothing",
    "cosine": "batch 256, cosine in place of the linear decay to zero",
    "b128_ls2": "batch 128, label smoothing 0.2",
}


def demo_ablation(root: Path) -> str:
    """The demo recipe's ablation at 99,840 training images, bf16, and the recipe then in float32."""
    record = load(root, "demo_ablation_auto_cpu.json")
    variants = record["variants"]
    rows = [[label, pct(variants[key]["test_acc_median"])] for key, label in DEMO_ABLATION.items()]
    images = {r["train_images"] for v in variants.values() for r in v["runs"]}
    off = load(root, "demo_ablation_off_cpu.json")
    return (
        table([f"change at {images.pop():,} training images", "test accuracy"], rows)
        + f"\n\nOne run each, seed 0. {record['note']} "
        + source(record, "demo_ablation_auto_cpu.json")
        + f"\n\nIn float32, the batch-256 recipe reached {pct(off['variants']['demo']['test_acc_median'])}: "
        + source(off, "demo_ablation_off_cpu.json")
    )


FAST_ABLATIONS = {
    "b6": "ResNet-20 at 28 px",
    "p6": "progressive sizes 16, 20, 24, 28 px",
    "e6": "weight average, `--ema-decay 0.99`",
    "w2p6": "twice as wide, widths 32/64/128, progressive",
    "wrn4p6": "Wide ResNet-16-4, progressive",
    "re0": "ResNet-20, progressive, 12 epochs",
    "re5": "the same with `--random-erasing 0.5`",
}


def fast_ablations(root: Path) -> str:
    """What was tried for the 180-second budget, on the 48,000-image training split."""
    record = load(root, "fashion_mnist_ablations_cpu.json")
    rows = []
    for run in record["runs"]:
        val = pct(run["val_acc"])
        if run["val_acc_ema"] is not None:
            val += f" (average {pct(run['val_acc_ema'])}; the {run['best_weights']} weights won)"
        rows.append(
            [
                f"{FAST_ABLATIONS.get(run['run'], run['run'])} (`{run['run']}`)",
                f"{run['train_images']:,}",
                val,
                pct(run["test_acc"]),
                f"{run['train_seconds']:.0f}",
            ]
        )
    header = ["change", "training images", "validation", "test (flip + translate TTA)", "training s (shared cores)"]
    return (
        table(header, rows)
        + "\n\n"
        + source(record, "fashion_mnist_ablations_cpu.json", "python benchmarks/collect_runs.py")
    )


def tta_gain(root: Path) -> str:
    """Test accuracy of each checkpoint with each test-time augmentation (benchmarks/tta_gain.py)."""
    parts = []
    for name, runs_file in (
        ("tta_gain_cpu.json", TIME_TO_ACCURACY[0]),
        ("tta_gain_best_cpu.json", TIME_TO_ACCURACY[1]),
    ):
        record, runs = load(root, name), load(root, runs_file)
        seeds = {f"{r['run_dir']}/best.pt": r["seed"] for r in runs["runs"]}
        views = list(record["median"])
        rows = [
            [f"`{runs['recipe']}`, seed {seeds.get(ckpt, '?')}", *(pct(accs[v]) for v in views)]
            for ckpt, accs in record["checkpoints"].items()
        ]
        parts.append(
            table(["checkpoint", *views], rows)
            + "\n\n"
            + source(record, name, f"python benchmarks/tta_gain.py RUN/best.pt ... --out {RESULTS / name}")
        )
    return "\n\n".join(parts)


def degradation_recipes(root: Path) -> str:
    """Final training errors of the recipe trials for the degradation experiment."""
    record = load(root, "degradation_recipes_cpu.json")
    models = ["plain20", "plain56", "resnet20", "resnet56"]
    by_set: dict[tuple, dict] = {}
    for tag, trial in record["trials"].items():
        key = (trial["n_train"], trial["args"]["aug"])
        entry = by_set.setdefault(key, {"tags": [], "errors": {}})
        entry["tags"].append(tag)
        entry["errors"].update({m: r["train_err_eval"] for m, r in trial["models"].items()})
    rows = []
    for (n, aug), entry in by_set.items():
        what = f"{n:,} images, " + ("crops and flips" if aug else "no augmentation")
        tags = ", ".join(f"`{t}`" for t in entry["tags"])
        rows.append([f"{what} ({tags})", *(pct(entry["errors"][m]) if m in entry["errors"] else "-" for m in models)])
    images = {t["args"]["images"] for t in record["trials"].values()}
    return (
        table([f"training set ({images.pop():,} images per model)", *models], rows)
        + f"\n\nFinal training errors in eval mode on the training set used. {record['note']} "
        + source(record, "degradation_recipes_cpu.json", "python benchmarks/degradation_recipes.py")
    )
