"""``reslab train``, ``reslab lr-find`` and ``reslab report``: a TrainConfig from a recipe and flags, then the
library's ``fit``, ``lr_find`` or ``write_report``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from reslab.errors import ReslabError


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
    """The run's config and the checkpoint it resumes, read once (a ``ResumePoint``; None for a new run).

    ``--resume PATH`` continues that checkpoint's own config (flags may change how it runs). ``--resume auto``
    looks in the run folder (``--out-dir``, or the recipe's) for its newest good checkpoint: found, it continues
    it (a recipe, when given, must agree with it); not found, the run starts anew, so a requeued job script
    needs no edit.
    """
    from reslab.checkpoint import resolve_resume
    from reslab.train import ResumePoint, TrainConfig, from_dict, load_recipe

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
    resume = ResumePoint(path, ckpt) if ckpt is not None else None  # read once: fit reads it no more
    if args.resume == "auto" and (ckpt is None or args.recipe):
        return cfg, resume
    given.setdefault("out_dir", str(run_dir))  # the folder resumed from, wherever it moved
    return from_dict(given, TrainConfig(**ckpt["config"]), source="command line"), resume


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


def add_parsers(sub) -> None:
    """The train, lr-find and report subcommands."""
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
