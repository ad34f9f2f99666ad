"""Residual learning, measured: each claim about ResNets as an experiment that returns numbers.

Every experiment is a module with the same three functions, so the CLI (``reslab explain <what>``) treats
them alike:

- ``measure(**options) -> dict``: runs the experiment and returns JSON-serializable numbers;
- ``plot(result, out_dir) -> list[Path]``: the figure(s) made from those numbers alone;
- ``summarize(result) -> list[str]``: a few lines of text that state what was measured.

``common.save`` writes the numbers (``<what>.json``), and ``index.html`` over the figures.
"""

EXPERIMENTS = ("block", "backprop", "gradients", "degradation", "responses", "lesion", "landscape")
