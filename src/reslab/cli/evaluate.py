"""``reslab eval``, ``reslab predict`` and ``reslab samples``: a checkpoint on a test split or on image files."""

from __future__ import annotations

import argparse

from reslab.cli.deploy import add_precision_flags, note_precision
from reslab.errors import ReslabError


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


def add_parsers(sub) -> None:
    """The eval, predict and samples subcommands."""
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
