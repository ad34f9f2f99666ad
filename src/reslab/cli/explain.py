"""``reslab explain``: a subcommand per experiment of ``reslab.explain``, with the options the experiment declares.

Each experiment module says what it shows (``ABOUT``) and which flags it takes (``OPTIONS``, see
``reslab.explain.options``); this module only turns those into subcommands and a run into files.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def add_parsers(sub) -> None:
    """``reslab explain NAME`` for every experiment, and ``reslab explain [all]`` for all of them."""
    from reslab.explain import EXPERIMENTS
    from reslab.explain.options import SHARED

    p = sub.add_parser(
        "explain",
        help="residual learning, measured: numbers, a figure and a page per experiment",
        description="With no experiment: all of them, as `reslab explain all`.",
    )
    p.set_defaults(func=cmd_explain_all, out_dir=None, seed=None, device="cpu", data_dir=None)
    whats = p.add_subparsers(dest="what")
    for what in EXPERIMENTS:
        experiment = importlib.import_module(f"reslab.explain.{what}")
        q = whats.add_parser(what, help=experiment.ABOUT, description=experiment.ABOUT)
        for flag, kwargs in experiment.OPTIONS.items():
            q.add_argument(flag, **kwargs)
        q.add_argument("--out-dir", default=None, help=f"default: explain/{what}")
        q.set_defaults(func=cmd_explain, options=experiment.OPTIONS)
    help_text = "every experiment at its defaults on the shipped trained nets (degradation: their own run), timed"
    q = whats.add_parser("all", help=help_text, description=help_text)
    for flag in ("--data-dir", "--seed", "--device"):
        q.add_argument(flag, **SHARED[flag])
    q.add_argument("--out-dir", default=None, help="default: explain (each experiment in a folder of its own)")
    q.set_defaults(func=cmd_explain_all)


def cmd_explain(args: argparse.Namespace) -> None:
    from reslab.explain.common import device_of, save
    from reslab.explain.options import destination
    from reslab.machine import record

    experiment = importlib.import_module(f"reslab.explain.{args.what}")
    dests = [destination(flag, kwargs) for flag, kwargs in args.options.items()]
    options = {d: getattr(args, d) for d in dests if getattr(args, d) is not None}
    out_dir = Path(args.out_dir or Path("explain") / args.what)
    result = experiment.measure(**options)  # first: a mistake ends here, before any folder is made
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = experiment.plot(result, out_dir)
    summary = experiment.summarize(result)
    written = save(args.what, result, figures, summary, out_dir, provenance=record(device_of(args.device)))
    for line in summary:
        print(line)
    print(f"wrote {', '.join(str(f) for f in figures)}, {written['json']} and {written['html']}")


def cmd_explain_all(args: argparse.Namespace) -> None:
    from reslab.explain.common import run_all

    out_root = Path(args.out_dir or "explain")
    run_all(out_root, device=args.device, seed=args.seed, data_dir=args.data_dir)
    print(f"wrote {out_root / 'index.html'} and {out_root / 'all.json'}")
