"""The ``reslab`` command: argparse subcommands that only wire library parts together.

A mistake a user can make (an unknown model, a missing file, a bad option) ends in one line on stderr and
exit status 2; a Ctrl-C ends with status 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from reslab.cli_deploy import add_deploy_parsers, add_precision_flags, note_precision
from reslab.errors import ReslabError


def _format_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _format_macs(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e8 else f"{n / 1e6:.1f}M"


def model_rows(pattern: str | None = None) -> list[dict[str, str]]:
    """One row per registered model: name, depth, block, version, shortcut, parameters."""
    return [dict(row) for row in _model_rows(pattern)]


@functools.cache  # building all 42 models, even on the meta device, takes seconds
def _model_rows(pattern: str | None) -> tuple[dict[str, str], ...]:
    import torch

    from reslab.models import create_model, get_spec, list_models

    rows = []
    for name in list_models(pattern):
        with torch.device("meta"):  # shapes only: counting parameters allocates nothing
            model = create_model(name)
        cfg = model.config
        spec = get_spec(name)
        rows.append(
            {
                "name": name,
                "family": spec.family,
                "depth": str(spec.depth or model.depth),
                "block": cfg["block"] + (f" {cfg['groups']}x{cfg['width_per_group']}d" if cfg["groups"] > 1 else ""),
                "version": cfg["version"],
                "shortcut": cfg["shortcut"] if cfg["residual"] else "none",
                "params": _format_count(sum(p.numel() for p in model.parameters())),
                "description": spec.description,
            }
        )
    return tuple(rows)


def models_markdown(pattern: str | None = None) -> str:
    """The model table as Markdown, exactly as README.md shows it (a test keeps the two equal)."""
    cols = ["name", "family", "depth", "block", "version", "shortcut", "params"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in model_rows(pattern)]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> None:
    if args.format == "markdown":
        print(models_markdown(args.filter))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reslab models")
    for col in ("name", "family", "depth", "block", "version", "shortcut", "params"):
        table.add_column(col, justify="right" if col in ("depth", "params") else "left", no_wrap=True)
    for r in model_rows(args.filter):
        table.add_row(r["name"], r["family"], r["depth"], r["block"], r["version"], r["shortcut"], r["params"])
    Console().print(table)


def cmd_summary(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from reslab.analysis.summary import summarize

    if any(v < 1 for v in args.input_size):
        raise ReslabError(f"--input-size needs three positive numbers C H W, got {args.input_size}")
    overrides = {"num_classes": args.num_classes} if args.num_classes is not None else {}
    if args.version:
        overrides["version"] = args.version
    overrides["in_chans"] = args.input_size[0]
    try:
        summary = summarize(args.model, tuple(args.input_size), **overrides)
    except RuntimeError as err:  # e.g. an input too small for the network's five halvings
        raise ReslabError(f"{args.model} cannot run on input {tuple(args.input_size)}: {err}") from None
    c, h, w = summary.input_shape
    table = Table(title=f"{summary.name} on a {c}x{h}x{w} input")
    for col in ("stage", "output (C x H x W)", "params", "MACs"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in summary.rows:
        shape = " x ".join(map(str, row.output_shape))
        table.add_row(row.name, shape, f"{row.params:,}", _format_macs(row.macs))
    table.add_section()
    table.add_row("total", "", f"{summary.params:,}", _format_macs(summary.macs))
    Console().print(table)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--batch-size``, ``--no-flip``, ...), defaulting to "not given"."""
    import dataclasses

    from reslab.train.config import CHOICES, TrainConfig, field_help

    defaults = TrainConfig()
    helps = field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "model_args":
            p.add_argument(
                "--model-arg",
                dest="model_args",
                action="append",
                metavar="KEY=VALUE",
                help="extra create_model option, e.g. drop_path_rate=0.1 or widths=[32,64,128]",
            )
        elif isinstance(default, list):
            p.add_argument(
                flag,
                dest=f.name,
                nargs="+",
                type=float if f.name in ("mean", "std") else int,
                default=None,
                help=f"{helps.get(f.name, '')} (default: none)",
            )
        elif isinstance(default, bool) or f.name == "channels_last":
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{helps.get(f.name, '')} (default: {default})",
            )
        else:
            kind = {
                "epochs": int,
                "batch_size": int,
                "step_size": int,
                "patience": int,
                "seed": int,
                "crop_padding": int,
                "num_workers": int,
                "eval_batch_size": int,
                "hist_every": int,
                "image_size": int,
                "in_chans": int,
                "save_every_steps": int,
                "log_every_steps": int,
                "max_image_pixels": int,
            }.get(f.name, type(default) if default is not None else str)
            p.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=None,
                choices=CHOICES.get(f.name),
                help=f"{helps.get(f.name, '')} (default: {default})",
            )


def _given_options(args: argparse.Namespace) -> dict:
    """The TrainConfig options given as flags (``--model-arg KEY=VALUE`` pairs parsed as YAML values)."""
    import dataclasses

    import yaml

    from reslab.train import TrainConfig

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if getattr(args, f.name, None) is not None
    }
    if "model_args" in given:
        pairs = {}
        for item in given["model_args"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise ReslabError(f"--model-arg needs KEY=VALUE, got {item!r}")
            pairs[key.strip()] = yaml.safe_load(value)
        given["model_args"] = pairs
    return given


def _train_config(args: argparse.Namespace):
    """The run's config and the checkpoint it resumes (None for a new run).

    ``--resume PATH`` continues that checkpoint's own config (flags may change how it runs). ``--resume auto``
    looks in the run folder (``--out-dir``, or the recipe's) for its newest good checkpoint: found, it continues
    it (a recipe, when given, must agree with it); not found, the run starts anew, so a requeued job script
    needs no edit.
    """
    from reslab.checkpoint import resolve_resume
    from reslab.train import TrainConfig, from_dict, load_recipe

    given = _given_options(args)
    recipe_cfg = from_dict(load_recipe(args.recipe) if args.recipe else {}, source=str(args.recipe or "defaults"))
    if not args.resume:
        return from_dict(given, recipe_cfg, source="command line"), None
    if args.resume == "auto":
        cfg = from_dict(given, recipe_cfg, source="command line")
        run_dir = cfg.run_dir()
    elif args.recipe:
        raise ReslabError("--resume PATH continues the checkpoint's own recipe; drop --recipe (or use --resume auto)")
    else:
        run_dir = Path(args.resume).parent
    path, ckpt, messages = resolve_resume(args.resume, run_dir)
    if os.environ.get("RANK", "0") == "0":
        for message in messages:
            print(message)
    if args.resume == "auto" and (ckpt is None or args.recipe):
        return cfg, path
    given.setdefault("out_dir", str(run_dir))  # the folder resumed from, wherever it moved
    return from_dict(given, TrainConfig(**ckpt["config"]), source="command line"), path


def cmd_train(args: argparse.Namespace) -> None:
    from reslab.train import fit

    cfg, resume = _train_config(args)
    fit(cfg, resume=resume)
    run = cfg.run_dir()
    if os.environ.get("RANK", "0") == "0" and (run / "best.pt").exists():  # under torchrun, rank 0 alone
        from reslab.analysis.report import write_report

        print(f"report: {write_report(run, device=cfg.device)}")


def cmd_lr_find(args: argparse.Namespace) -> None:
    from reslab.finetune.lr_find import lr_find
    from reslab.train import TrainConfig, from_dict, load_recipe

    recipe_cfg = from_dict(load_recipe(args.recipe) if args.recipe else {}, source=str(args.recipe or "defaults"))
    cfg: TrainConfig = from_dict(_given_options(args), recipe_cfg, source="command line")
    out = cfg.out_dir or f"runs/lr-find-{cfg.model}-{cfg.dataset}"
    result = lr_find(cfg, out, start=args.start_lr, end=args.end_lr, steps=args.range_steps)
    print(
        f"suggested lr {result.suggestion:.2e}: {result.rule}; the smoothed loss was lowest at "
        f"{result.minimum_lr:.2e} (minimum/10: {result.minimum_lr / 10:.2e}); {len(result.lrs)} steps; "
        f"curve: {out}/lr_find.png, numbers: {out}/lr_find.json"
    )


def cmd_report(args: argparse.Namespace) -> None:
    from reslab.analysis.report import write_report

    print(f"report: {write_report(args.run_dir, device=args.device, data_dir=args.data_dir)}")


def cmd_eval(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from reslab.inference import evaluate_checkpoint

    note_precision(args)
    result, report = evaluate_checkpoint(
        args.checkpoint,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        out_dir=args.out_dir,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        compile=args.compile,
    )
    run_by = f" ({report['backend']})" if args.precision else ""
    title = f"{report['dataset']} {report['split']}: {report['images']} images, {report['precision']}{run_by}"
    table = Table(title=title, min_width=44)
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in report["per_class_accuracy"].items():
        table.add_row(name, f"{acc:.2%}")
    table.add_section()
    table.add_row("all", f"{result.accuracy:.2%}")
    console = Console()
    console.print(table)
    console.print(f"loss {result.loss:.4f}; wrote {report['files']['json']} and {report['files']['png']}")


def cmd_predict(args: argparse.Namespace) -> None:
    from reslab.inference import predict_images

    if args.topk < 1:
        raise ReslabError(f"--topk must be at least 1, not {args.topk}")
    note_precision(args)
    predictions = predict_images(
        args.checkpoint,
        args.images,
        topk=args.topk,
        device=args.device,
        precision=args.precision,
        backend=args.backend,
        compile=args.compile,
        data_dir=args.data_dir,
    )
    for p in predictions:
        ranked = ", ".join(f"{name} {prob:.1%}" for name, prob in p.top)
        print(f"{p.path}: {ranked}")


def cmd_samples(args: argparse.Namespace) -> None:
    from reslab.data import load_dataset
    from reslab.data.datasets import save_samples

    bundle = load_dataset(args.dataset, data_dir=args.data_dir, val_ratio=0.0)
    split = bundle.test if args.split == "test" and bundle.test is not None else bundle.train
    for path in save_samples(split, bundle.info, args.out_dir, count=args.count, seed=args.seed):
        print(path)


# --- reslab explain ------------------------------------------------------------------------------------------
# Each flag's destination is the keyword of the experiment's ``measure`` function (see reslab/explain/).
_EXPLAIN_FLAGS: dict[str, dict] = {
    "--seed": dict(type=int, default=None, help="seeds fresh models, image choice and random directions (default 0)"),
    "--device": dict(default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)"),
    "--dataset": dict(default=None, help="real images for fresh models (default: fashion-mnist)"),
    "--data-dir": dict(default=None, help="folder looked in first for the dataset's files"),
    "--checkpoint": dict(
        default=None, metavar="CKPT", help="a trained model of your own (e.g. runs/x/best.pt) to study"
    ),
    "--checkpoints": dict(
        nargs="+", default=None, metavar="CKPT", help="trained models of your own to compare, in place of --models"
    ),
    "--models": dict(nargs="+", default=None, help="registry names to compare (default: shipped trained weights)"),
    "--fresh": dict(
        action="store_true", help="study fresh, seeded, untrained nets instead of the shipped trained weights"
    ),
    "--model": dict(
        default=None, help="the shipped trained net whose block to study (default with --block-name: resnet56)"
    ),
    "--runs-dir": dict(
        default=None,
        metavar="DIR",
        help="study DIR/<model>/best.pt instead of the shipped weights; degradation: where it trains "
        "(default runs/degradation)",
    ),
    "--images": dict(type=int, default=None, help="how many real images to measure on"),
    "--grid-images": dict(type=int, default=None, help="of those images, how many each 2-D grid point uses"),
    "--probes": dict(type=int, default=None, help="batches each state is measured on (default 3)"),
    "--block": dict(choices=("basic", "bottleneck"), default="bottleneck"),
    "--version": dict(choices=("v1", "v2"), default="v1", help="v1: ReLU after the sum; v2: pre-activation"),
    "--shape": dict(
        nargs=4,
        type=int,
        default=None,
        metavar=("N", "C", "H", "W"),
        help="input shape (default: 8 256 56 56 for a bottleneck, 8 64 56 56 for a basic block)",
    ),
    "--block-name": dict(
        default=None,
        help="a trained net's block, e.g. layer2.0: of --checkpoint, or of the shipped --model (default: the first)",
    ),
    "--depths": dict(nargs="+", type=int, default=None, help="CIFAR depths 6n+2 to compare, e.g. 20 56 110"),
    "--steps": dict(type=int, default=None, help="training steps before the second measurement"),
    "--batch-size": dict(type=int, default=None),
    "--train-subset": dict(type=int, default=None, help="training images per model (default 5000; 0: all)"),
    "--budget": dict(default=None, help="wall clock for the whole experiment, e.g. 20m (default), 90s, 1h"),
    "--train-steps": dict(
        type=int,
        default=None,
        dest="steps",
        help="optimizer steps per model, in place of --budget (e.g. a count it printed)",
    ),
    "--recipe": dict(default=None, help="YAML training recipe shared by every model (default: the built-in one)"),
    "--retrain": dict(action="store_true", help="train again even where a finished run of the same recipe exists"),
    "--draws": dict(type=int, default=None, help="random draws per number of deleted blocks"),
    "--points": dict(type=int, default=None, help="points along the 1-D line (default 41)"),
    "--grid": dict(type=int, default=None, help="points per side of the 2-D grid (default 21)"),
    "--span": dict(type=float, default=None, help="the plot covers -span..span times the direction"),
}
_EXPLAIN: dict[str, tuple[str, list[str]]] = {
    "block": (
        "one residual block step by step: forward, BatchNorm train vs eval, backward through both paths",
        ["--block", "--version", "--shape", "--checkpoint", "--model", "--block-name", "--data-dir"],
    ),
    "backprop": (
        "conv, BatchNorm, ReLU, residual sum and classifier backward by hand, checked against autograd",
        ["--checkpoint", "--data-dir"],
    ),
    "gradients": (
        "per-layer gradient norms of plain and residual nets: fresh of several depths, and the shipped trained twins",
        ["--depths", "--steps", "--batch-size", "--probes", "--checkpoints", "--fresh", "--dataset", "--data-dir"],
    ),
    "degradation": (
        "train plain and residual nets of two depths alike (He et al. 2015, Fig. 1 and 6)",
        [
            "--depths",
            "--budget",
            "--train-steps",
            "--train-subset",
            "--recipe",
            "--runs-dir",
            "--retrain",
            "--dataset",
            "--data-dir",
        ],
    ),
    "responses": (
        "std of each 3x3 layer's response, plain vs residual (He et al. 2015, Fig. 7)",
        ["--models", "--checkpoints", "--runs-dir", "--fresh", "--images", "--dataset", "--data-dir"],
    ),
    "lesion": (
        "delete and swap blocks at test time (Veit et al. 2016)",
        ["--models", "--checkpoints", "--runs-dir", "--fresh", "--images", "--draws", "--dataset", "--data-dir"],
    ),
    "landscape": (
        "the loss around the trained weights on filter-normalized directions (Li et al. 2018)",
        [
            "--models",
            "--checkpoints",
            "--runs-dir",
            "--fresh",
            "--images",
            "--grid-images",
            "--points",
            "--grid",
            "--span",
            "--dataset",
            "--data-dir",
        ],
    ),
}


def _add_explain_parsers(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="residual learning, measured: numbers, a figure and a page per experiment",
        description="With no experiment: all of them, as `reslab explain all`.",
    )
    p.set_defaults(func=cmd_explain_all, out_dir=None, seed=None, device="cpu", data_dir=None)
    whats = p.add_subparsers(dest="what")
    for what, (help_text, flags) in _EXPLAIN.items():
        q = whats.add_parser(what, help=help_text, description=help_text)
        for flag in [*flags, "--seed", "--device"]:
            q.add_argument(flag, **_EXPLAIN_FLAGS[flag])
        q.add_argument("--out-dir", default=None, help=f"default: explain/{what}")
        q.set_defaults(func=cmd_explain, explain_flags=flags)
    help_text = "every experiment at its defaults on the shipped trained nets (degradation: their own run), timed"
    q = whats.add_parser("all", help=help_text, description=help_text)
    for flag in ("--data-dir", "--seed", "--device"):
        q.add_argument(flag, **_EXPLAIN_FLAGS[flag])
    q.add_argument("--out-dir", default=None, help="default: explain (each experiment in a folder of its own)")
    q.set_defaults(func=cmd_explain_all)


def cmd_explain(args: argparse.Namespace) -> None:
    import importlib

    from reslab.explain.common import save

    module = importlib.import_module(f"reslab.explain.{args.what}")
    flags = [*args.explain_flags, "--seed", "--device"]
    dests = [_EXPLAIN_FLAGS[f].get("dest") or f.lstrip("-").replace("-", "_") for f in flags]
    options = {d: getattr(args, d) for d in dests if getattr(args, d) is not None}
    out_dir = Path(args.out_dir or Path("explain") / args.what)
    result = module.measure(**options)  # first: a mistake ends here, before any folder is made
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = module.plot(result, out_dir)
    summary = module.summarize(result)
    written = save(args.what, result, figures, summary, out_dir)
    for line in summary:
        print(line)
    print(f"wrote {', '.join(str(f) for f in figures)}, {written['json']} and {written['html']}")


def cmd_explain_all(args: argparse.Namespace) -> None:
    from reslab.explain.common import run_all

    out_root = Path(args.out_dir or "explain")
    run_all(out_root, device=args.device, seed=args.seed, data_dir=args.data_dir)
    print(f"wrote {out_root / 'index.html'} and {out_root / 'all.json'}")


def _add_lr_find_parser(sub) -> None:
    p = sub.add_parser(
        "lr-find",
        help="learning-rate range test of a run's recipe: loss against lr, a suggested lr (Smith 2017)",
        description="Train a fresh copy of the run's model while the lr grows exponentially; writes the curve "
        "and a suggestion into --out-dir (a new folder; default runs/lr-find-MODEL-DATASET). Any train option "
        "applies (--weights, --freeze, --finetune, --layer-decay, --batch-size, ...).",
    )
    p.add_argument("--recipe", help="YAML file of train options")
    p.add_argument("--start-lr", type=float, default=1e-7, help="the first learning rate (default 1e-7)")
    p.add_argument("--end-lr", type=float, default=10.0, help="the last learning rate (default 10)")
    p.add_argument("--range-steps", type=int, default=100, help="steps from start to end (default 100)")
    _add_config_flags(p)
    p.set_defaults(func=cmd_lr_find)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reslab", description="The ResNet family: build, inspect, train.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list every registered model")
    p.add_argument("--filter", help="glob pattern on names, e.g. 'preact*'")
    p.add_argument("--format", choices=("table", "markdown"), default="table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-stage output shapes, parameters and MACs of a model")
    p.add_argument("model")
    p.add_argument(
        "--input-size",
        nargs=3,
        type=int,
        default=None,
        metavar=("C", "H", "W"),
        help="one input image's size (default: 3 224 224, or 3 32 32 for CIFAR models)",
    )
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--version", choices=("v1", "v1.5", "v2"), default=None)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train a model on a dataset (flags override the recipe)")
    p.add_argument("--recipe", help="YAML file of options, e.g. recipes/fashion_mnist_demo.yaml")
    p.add_argument(
        "--resume",
        metavar="CKPT|auto",
        help="continue from a last.pt checkpoint; auto: the run folder's newest good one, or a new run if none",
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    _add_lr_find_parser(sub)

    p = sub.add_parser("report", help="(re)write a run folder's report.html: curves, test results, gradient norms")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by reslab train (it holds best.pt)")
    p.add_argument("--data-dir", default=None, help="where the dataset's files are, if not where the run found them")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("eval", help="accuracy, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default=None, help="default: the one it was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--out-dir", default=None, help="default: the checkpoint's folder")
    p.add_argument("--device", default="auto")
    add_precision_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None, help="--precision int8: where the training images are, if moved")
    add_precision_flags(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("samples", help="save some images of an in-memory dataset as PNG files (to look at, or predict)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="samples")
    p.set_defaults(func=cmd_samples)

    add_deploy_parsers(sub)
    _add_explain_parsers(sub)
    return parser


def _default_input_size(args: argparse.Namespace) -> None:
    if getattr(args, "input_size", "absent") is None:
        from reslab.models import get_spec

        args.input_size = [3, 32, 32] if get_spec(args.model).family == "cifar" else [3, 224, 224]


def _rank_speaks(err: BaseException | None = None) -> bool:
    """Whether this process prints ``err`` (without one: argparse's usage, help and errors).

    Run alone, or as rank 0 under torchrun: yes. Another rank stays silent about what every rank raised alike
    (``runtime.is_shared``), but reports an error that may be its own alone: no other rank knows of it.
    """
    if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
        return True
    # Not imported: this process never joined the process group, and every rank ran the same code on the same flags.
    runtime = sys.modules.get("reslab.train.runtime")
    return err is not None and runtime is not None and not runtime.is_shared(err)


def main(argv: Sequence[str] | None = None) -> int:
    import contextlib
    import io

    try:
        with contextlib.ExitStack() as quiet:
            if not _rank_speaks():  # under torchrun every rank parses the same flags: rank 0 alone shows the outcome
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            args = build_parser().parse_args(argv)  # imports torch: seconds in which a Ctrl-C may come
            args.argv = list(sys.argv[1:] if argv is None else argv)  # for results files that record their command
        func: Callable[[argparse.Namespace], None] = args.func
        _default_input_size(args)
        func(args)
    except (ReslabError, OSError) as err:  # OSError: a folder that cannot be written, a full disk: the user's to fix
        if _rank_speaks(err):
            text = str(err)
            if isinstance(err, OSError):
                text = f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")
            rank = "" if os.environ.get("RANK", "0") == "0" else f"rank {os.environ['RANK']}: "
            print(f"reslab: error: {rank}{text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # TrainingStopped (train/signals.py) has already said where its work is saved, and carries its status.
        if _rank_speaks() and not hasattr(err, "exit_code"):
            print("reslab: interrupted", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
