"""``reslab models`` and ``reslab summary``: the registry as a table, one model's shapes, parameters and MACs."""

from __future__ import annotations

import argparse
import functools

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
    """The model table as Markdown, exactly as docs/models.md shows it (tests/docs/test_pages.py keeps them equal)."""
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


def default_input_size(args: argparse.Namespace) -> None:
    """``summary``'s input size when not given: 3x32x32 for the CIFAR family, 3x224x224 otherwise."""
    if getattr(args, "input_size", "absent") is None:
        from reslab.models import get_spec

        args.input_size = [3, 32, 32] if get_spec(args.model).family == "cifar" else [3, 224, 224]


def add_parsers(sub) -> None:
    """The models and summary subcommands."""
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
