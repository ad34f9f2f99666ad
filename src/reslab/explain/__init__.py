"""Residual learning, measured: each claim about ResNets as an experiment that returns numbers.

Every experiment is a module with the same three functions, so the CLI (``reslab explain <what>``) treats
them alike:

- ``measure(**options) -> dict``: runs the experiment and returns JSON-serializable numbers, each measured
  quantity with its uncertainty (standard errors or intervals over images or batches; or a statement that the
  numbers are exact checks);
- ``plot(result, out_dir) -> list[Path]``: the figure(s) made from those numbers alone;
- ``summarize(result) -> list[str]``: a few lines of text that state what was measured, on which nets;

and two declarations the CLI reads: ``ABOUT`` (one line) and ``OPTIONS`` (its flags, see ``options``).

A module named ``<experiment>_<part>`` holds one part of an experiment's machinery, used only by it
(``block_batchnorm``, ``block_backward``, ``gradients_probe``, ``lesion_surgery``); the experiment's own module
is its whole interface.

They study the reference twins shipped with reslab (``reference``) unless told otherwise (``common``).
``common.save`` writes the numbers (``<what>.json``), and ``index.html`` over the figures; ``common.run_all``
(``reslab explain all``) runs every experiment at its defaults and times them.
"""

EXPERIMENTS = ("block", "backprop", "gradients", "degradation", "responses", "lesion", "landscape")
