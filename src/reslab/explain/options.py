"""The command-line options the explain experiments share; each experiment declares its own list next to its code.

Every experiment module has ``ABOUT`` (one line: what it shows) and ``OPTIONS`` (flag -> argparse keywords);
``reslab explain NAME`` offers exactly those flags, plus ``--seed`` and ``--device``, and passes each given flag to
the experiment's ``measure`` under the flag's destination (``--data-dir`` -> ``data_dir``). A flag left out is
not passed, so ``measure``'s own default applies.
"""

from __future__ import annotations

from typing import Any

SHARED: dict[str, dict[str, Any]] = {
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
    "--runs-dir": dict(default=None, metavar="DIR", help="study DIR/<model>/best.pt instead of the shipped weights"),
    "--images": dict(type=int, default=None, help="how many real images to measure on"),
    "--depths": dict(nargs="+", type=int, default=None, help="CIFAR depths 6n+2 to compare, e.g. 20 56 110"),
}

# The nets an experiment that compares trained nets studies, and the images it measures them on.
NETS_AND_IMAGES = ("--models", "--checkpoints", "--runs-dir", "--fresh", "--images", "--dataset", "--data-dir")


def declare(*shared: str, **own: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An experiment's options: the ``shared`` flags named, then its ``own`` (keyword ``block_name`` declares
    ``--block-name``), then ``--seed`` and ``--device``, which every experiment takes."""
    options = {flag: SHARED[flag] for flag in shared}
    options.update({"--" + name.replace("_", "-"): kwargs for name, kwargs in own.items()})
    options.update({flag: SHARED[flag] for flag in ("--seed", "--device")})
    return options


def destination(flag: str, kwargs: dict[str, Any]) -> str:
    """The keyword of ``measure`` that ``flag`` fills: argparse's ``dest``, as argparse derives it."""
    return kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
