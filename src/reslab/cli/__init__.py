"""The ``reslab`` command: argparse subcommands that only wire library parts together.

Each module of this package adds its subcommands (``add_parsers``) and their ``cmd_*`` functions, which import
the library parts they need when they run, so that ``reslab --help`` stays quick. A mistake a user can make (an
unknown model, a missing file, a bad option) ends in one line on stderr and exit status 2; a Ctrl-C ends with
status 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from reslab.cli import deploy, evaluate, explain, models, train
from reslab.cli.models import model_rows, models_markdown
from reslab.errors import ReslabError

__all__ = ["build_parser", "main", "model_rows", "models_markdown"]


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order ``reslab --help`` lists them."""
    parser = argparse.ArgumentParser(prog="reslab", description="The ResNet family: build, inspect, train.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (models, train, evaluate, deploy, explain):
        module.add_parsers(sub)
    return parser


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
        models.default_input_size(args)
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
