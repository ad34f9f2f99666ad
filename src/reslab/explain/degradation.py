"""The degradation problem (He et al. 2015, Fig. 1 and Fig. 6), at a size a laptop runs in minutes.

Plain nets of 20 and 56 layers and their residual twins are trained by ``reslab.train.fit`` with one recipe, the
same number of optimizer steps and the same batches in the same order. The step count comes from a budget for
the whole experiment: each model's step time is measured first (``reslab.train.measure_costs``), and the count
is the largest whose four runs fit together (``reslab.train.budget.plan``). The paper's finding: the deeper plain
net ends with *higher training error* than the shallower one (an optimization difficulty, not overfitting),
while the deeper ResNet ends at or below the shallower one.

The training error is measured once more at the end, on the final weights, on every training image, without
augmentation and with BatchNorm in inference mode: the error of the function the net has learned, with its
binomial standard error, rather than a running average over an epoch whose weights kept changing.

Every model's run folder (``<runs_dir>/<name>``: best.pt, last.pt, metrics, TensorBoard) stays; ``reslab report
<runs_dir>/<name>`` writes its report.html (left out of the budget: it evaluates the test set again).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.explain.options import declare
from reslab.models import get_spec
from reslab.train.budget import parse_budget

# `reslab explain degradation`: what it shows and the options it takes (each fills the keyword of ``measure``).
ABOUT = "train plain and residual nets of two depths alike (He et al. 2015, Fig. 1 and 6)"
OPTIONS = declare(
    "--depths",
    "--dataset",
    "--data-dir",
    budget=dict(default=None, help="wall clock for the whole experiment, e.g. 20m (default), 90s, 1h"),
    train_steps=dict(
        type=int,
        default=None,
        dest="steps",
        help="optimizer steps per model, in place of --budget (e.g. a count it printed)",
    ),
    train_subset=dict(type=int, default=None, help="training images per model (default 5000; 0: all)"),
    recipe=dict(default=None, help="YAML training recipe shared by every model (default: the built-in one)"),
    runs_dir=dict(default=None, metavar="DIR", help="where it trains (default runs/degradation)"),
    retrain=dict(action="store_true", help="train again even where a finished run of the same recipe exists"),
)

DEFAULT_RUNS_DIR = "runs/degradation"  # where the fresh runs of this experiment go
MAX_FINAL_TRAIN_IMAGES = 10_000  # the final training error's sample: no more than a test set's cost
DEFAULT_BUDGET = "20m"  # the whole experiment: four models on a 2-core CPU (see README, "The degradation problem")

# The paper's CIFAR recipe (Sec. 4.2: SGD, batch 128, lr 0.1, momentum 0.9, weight decay 1e-4, no dropout) fitted
# to a budget of minutes. Each change is measured in README ("The degradation problem"):
# - a training subset that 80,000 images per model go through many times, so that depth can show what it fits
#   (on all 48,000 images and with augmentation, 80,000 images end with ResNet-56 above ResNet-20);
# - no augmentation: the experiment is about optimization (fitting the training set), not generalization;
# - a 10% warmup and a linear decay to zero over the steps the budget fixed (one-cycle).
RECIPE: dict[str, Any] = dict(
    train_subset=5000,
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    nesterov=True,
    weight_decay=1e-4,
    schedule="onecycle",
    warmup_fraction=0.1,  # a linear warmup over 10% of the steps, then a linear decay to zero (Li et al. 2020)
    label_smoothing=0.0,
    crop_padding=0,
    flip=False,
    val_ratio=0.05,  # 3,000 held-out training images for the per-epoch validation curve
    patience=0,  # the same number of steps for every model
    hist_every=0,  # no weight histograms: they cost time at every one of the many short epochs
    quiet=True,
)


def _names(depths: tuple[int, ...]) -> list[str]:
    names = []
    for depth in depths:
        for prefix in ("plain", "resnet"):
            get_spec(f"{prefix}{depth}")  # one clear line for a depth the paper does not define
            names.append(f"{prefix}{depth}")
    return names


def _config(name: str, values: dict[str, Any], *, runs_dir: Path, device: str):
    from reslab.train import TrainConfig, from_dict

    values = {**values, "model": name, "device": device, "out_dir": str(runs_dir / name), "overwrite": True}
    values["download"] = False
    return from_dict(values, TrainConfig(), source="degradation recipe")


_RUN_ONLY = {"out_dir", "overwrite", "quiet", "device", "amp", "channels_last", "steps", "budget"}


def _finished(cfg) -> tuple[int, str | None] | None:
    """(steps, budget) of the saved run of this recipe, if one finished: its best.pt holds the final results and
    its last.pt the same config and history (a run started again over it and stopped early has a last.pt of its
    own). The step count, and the budget that fixed it, are the run's own."""
    from reslab.checkpoint import load_checkpoint

    run = Path(cfg.out_dir)
    if not (run / "best.pt").is_file() or not (run / "last.pt").is_file():
        return None
    best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
    saved = {k: v for k, v in best["config"].items() if k not in _RUN_ONLY}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_ONLY}
    if saved != wanted or "results" not in best or not best["config"].get("steps"):
        return None
    if last["config"] != best["config"] or last["history"] != best["history"]:
        return None
    return best["config"]["steps"], best["config"]["budget"] or None


def _read_run(run: Path) -> dict[str, Any]:
    from reslab.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "best.pt")
    return {
        "history": ckpt["history"],
        "results": ckpt["results"],
        "steps": ckpt["config"]["steps"],
        "budget": ckpt["config"]["budget"] or None,  # what fixed the step count (None: given by hand)
        "final": _final_errors(run),
    }


def _final_errors(run: Path) -> dict[str, Any]:
    """The final weights' error on the training images the run trained on (at most ``MAX_FINAL_TRAIN_IMAGES``
    of them) and on the test set, BatchNorm in inference mode, no augmentation; each with its binomial standard
    error."""
    from reslab.checkpoint import load_checkpoint, model_from_checkpoint
    from reslab.data import load_dataset
    from reslab.data.loaders import TensorBatchLoader
    from reslab.data.types import subset_of_train
    from reslab.explain.common import device_of
    from reslab.train import evaluate

    ckpt = load_checkpoint(run / "last.pt")
    cfg = ckpt["config"]
    device = device_of(cfg["device"])
    bundle = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], val_ratio=cfg["val_ratio"], seed=cfg["seed"])
    if cfg["train_subset"]:
        bundle.train = subset_of_train(bundle, cfg["train_subset"], cfg["seed"])
    if len(bundle.train) > MAX_FINAL_TRAIN_IMAGES:  # a fixed sample: a standard error under 0.3 points
        bundle.train = subset_of_train(bundle, MAX_FINAL_TRAIN_IMAGES, cfg["seed"])
    model = model_from_checkpoint(ckpt).to(device)
    errors = {}
    for split, data in (("train", bundle.train), ("test", bundle.test)):
        loader = TensorBatchLoader(data, bundle.info, batch_size=1000, train=False, device=device)
        result = evaluate(model, loader, num_classes=bundle.info.num_classes, device=device, amp_dtype=None)
        error, n = 1 - result.accuracy, len(data)
        errors[split] = {"error": error, "se": math.sqrt(error * (1 - error) / n), "images": n}
    return errors


# Four runs of several minutes each, planned from probes at the start: on this project's 2-core VM their steps
# and epoch ends then took 10-20% longer than probed (a 20-minute experiment ran 1,432 s, then 1,329 s, with
# the budget's usual 95%), so the experiment plans to 85% of its budget.
SAFETY = 0.85


def _plan_steps(configs: list, budget: str, started: float) -> tuple[int, str]:
    """One step count for every run: the most whose runs fit ``budget`` together, from each model's measured
    costs. Returns (steps, the line that says how it was chosen)."""
    import dataclasses

    from reslab.train import measure_costs
    from reslab.train.budget import plan

    # Each probe times steps for as long as a run of the whole budget would (budget.probe_seconds).
    measured = [measure_costs(dataclasses.replace(cfg, budget=budget)) for cfg in configs]
    # Each run ends with one more pass over the test set and at most as many training images (_final_errors).
    costs = [dataclasses.replace(c, final_seconds=2 * c.final_seconds) for c, _ in measured]
    steps_per_epoch = measured[0][1]
    spent = time.perf_counter() - started
    return plan(dataclasses.replace(configs[0], budget=budget), spent, costs, steps_per_epoch, safety=SAFETY)


def measure(
    *,
    depths: tuple[int, ...] = (20, 56),
    budget: str = DEFAULT_BUDGET,
    steps: int | None = None,
    recipe: str | None = None,
    runs_dir: str = DEFAULT_RUNS_DIR,
    retrain: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    train_subset: int | None = None,
    device: str = "cpu",
    reference: bool = True,
    shipped: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) plain and residual nets of each depth for one step count; their curves and final errors.

    ``budget`` (the whole experiment's wall clock) sets the step count, unless ``steps`` gives it. ``recipe``
    (a YAML file), ``dataset``, ``data_dir`` and ``seed`` override the built-in recipe (Fashion-MNIST, seed 0).
    ``reference``: add the shipped reference twins' curves (``reslab.explain.reference``) for comparison.
    ``shipped``: train nothing; the result of the shipped reference twins' own run, from their manifest.
    Returns ``{"recipe", "steps", "runs": {name: {"history", "results", "final", "reused"}}, "table",
    "verdict", "reference", "seconds"}``.
    """
    if shipped:
        return _shipped_result()
    started = time.perf_counter()
    values = _recipe(recipe, dataset=dataset, data_dir=data_dir, seed=seed, train_subset=train_subset)
    if len(set(depths)) < 2:
        raise ReslabError("--depths needs at least two different depths to compare, e.g. 20 56")
    names = _names(tuple(sorted(depths)))
    if steps is not None and steps < 1:
        raise ReslabError(f"--train-steps must be at least 1, not {steps}")
    if steps is None:
        parse_budget(budget)  # a bad budget is one line before anything is measured
    configs = [_config(name, values, runs_dir=Path(runs_dir), device=device) for name in names]
    finished = [] if retrain else [_finished(cfg) for cfg in configs]
    if finished and None not in finished and len(set(finished)) == 1 and _same_count(finished[0], steps, budget):
        print(f"reusing the finished runs in {runs_dir} (--retrain trains them again)")
        runs = {cfg.model: {**_read_run(Path(cfg.out_dir)), "reused": True} for cfg in configs}
    else:
        runs = _train_all(configs, budget=budget, steps=steps, started=started)
    table = [_row(name, run) for name, run in runs.items()]
    return {
        "recipe": values,
        "budget": budget if steps is None else None,
        "steps": next(iter(runs.values()))["steps"],
        "dataset": values["dataset"],
        "runs": runs,
        "table": table,
        "verdict": _verdict(table, depths),
        "reference": _reference_curves(names) if reference else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _same_count(saved: tuple[int, str | None], steps: int | None, budget: str) -> bool:
    """Whether finished runs of (steps, budget) are what this call asks for: that step count, or that budget."""
    return saved[0] == steps if steps is not None else saved[1] == budget


def _recipe(recipe: str | None, **given: Any) -> dict[str, Any]:
    from reslab.train import load_recipe

    values = {**RECIPE, "dataset": "fashion-mnist", "seed": 0}
    if recipe is not None:
        values.update(load_recipe(recipe))
    values.update({k: v for k, v in given.items() if v is not None})
    if not values.get("val_ratio"):
        raise ReslabError("the degradation recipe needs a validation split (val_ratio > 0) for its error curves")
    if values.get("budget") or values.get("steps"):
        raise ReslabError("the degradation recipe's step count comes from --budget or --steps, not the recipe")
    return values


def _train_all(configs: list, *, budget: str, steps: int | None, started: float) -> dict[str, dict[str, Any]]:
    import dataclasses

    from reslab.train import fit

    planned = steps is None
    if planned:
        steps, note = _plan_steps(configs, budget, started)
        print(note.replace("--steps", "reslab explain degradation --train-steps"))
    runs = {}
    for cfg in configs:
        # The budget is recorded with the count it fixed (a run with both set trains the count, no new probe).
        cfg = dataclasses.replace(cfg, steps=steps, budget=budget if planned else "")
        print(f"training {cfg.model} for {steps} steps into {cfg.out_dir}")
        fit(cfg)
        runs[cfg.model] = {**_read_run(Path(cfg.out_dir)), "reused": False}
    return runs


def _shipped_result() -> dict[str, Any]:
    """The shipped reference twins' degradation run (``benchmarks/reference_twins.py``), as ``measure`` returns
    a fresh one."""
    from reslab.explain import reference

    shipped = reference.manifest()
    if shipped is None:
        raise ReslabError("this installation has no shipped reference twins (reslab/explain/reference_nets)")
    runs = {
        name: {**{k: entry[k] for k in ("history", "results", "final")}, "steps": shipped["steps"], "reused": True}
        for name, entry in shipped["models"].items()
    }
    table = [_row(name, run) for name, run in runs.items()]
    depths = sorted({int(name.removeprefix("plain").removeprefix("resnet")) for name in runs})
    return {
        "recipe": shipped["recipe"],
        "budget": shipped["budget"],
        "steps": shipped["steps"],
        "dataset": shipped["recipe"]["dataset"],
        "runs": runs,
        "table": table,
        "verdict": _verdict(table, depths),
        "reference": None,
        "seconds": shipped["seconds"],
        "shipped": {k: shipped[k] for k in ("command", "commit", "date", "machine")},
    }


def _reference_curves(names: list[str]) -> dict[str, Any] | None:
    """The shipped reference twins' training curves (longer budget), for the models that have them."""
    from reslab.explain import reference

    shipped = reference.manifest()
    if shipped is None:
        return None
    curves = {name: shipped["models"][name]["history"] for name in names if name in shipped["models"]}
    return {"command": shipped["command"], "machine": shipped["machine"], "steps": shipped["steps"], "curves": curves}


def _row(name: str, run: dict[str, Any]) -> dict[str, Any]:
    final = run["final"]
    return {
        "model": name,
        "train_error": final["train"]["error"],
        "train_error_se": final["train"]["se"],
        "train_images": final["train"]["images"],
        "running_train_error": 1 - run["history"][-1]["train_acc"],
        "test_error": final["test"]["error"],
        "test_error_se": final["test"]["se"],
        "train_seconds": run["results"]["train_seconds"],
        "device": run["results"]["device"],
        "amp": run["results"].get("amp"),
    }


def _verdict(table: list[dict[str, Any]], depths) -> dict[str, Any]:
    """Does the paper's finding hold here? The final training errors of the deepest and the shallowest net of each
    kind, their difference and its standard error (the two nets' binomial errors over the training images)."""
    low, high = min(depths), max(depths)
    rows = {row["model"]: row for row in table}

    def gap(prefix: str) -> tuple[float, float]:
        deep, shallow = rows[f"{prefix}{high}"], rows[f"{prefix}{low}"]
        return deep["train_error"] - shallow["train_error"], math.hypot(
            deep["train_error_se"], shallow["train_error_se"]
        )

    plain_gap, plain_se = gap("plain")
    resnet_gap, resnet_se = gap("resnet")
    return {
        "shallow": low,
        "deep": high,
        "plain_deep_minus_shallow_train_error": plain_gap,
        "plain_gap_se": plain_se,
        "resnet_deep_minus_shallow_train_error": resnet_gap,
        "resnet_gap_se": resnet_se,
        "plain_degrades": plain_gap > 2 * plain_se,  # above by more than twice its standard error
        "resnet_does_not_degrade": resnet_gap <= 0,
        "resnet_within_uncertainty": abs(resnet_gap) <= 2 * resnet_se,
    }


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Fig. 6 of the paper: plain nets left, ResNets right; training error dashed, validation error bold, against
    the training images seen. A second row shows the shipped reference twins (a longer budget) where present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = result.get("reference") or None
    rows = [("this run", {n: r["history"] for n, r in result["runs"].items()})]
    if reference and reference["curves"]:
        rows.append((f"shipped reference twins, {reference['steps']} steps", reference["curves"]))
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), sharey="row", squeeze=False)
    for (label, curves), row_axes in zip(rows, axes, strict=True):
        for ax, prefix, title in ((row_axes[0], "plain", "plain networks"), (row_axes[1], "resnet", "ResNets")):
            _plot_kind(ax, {n: h for n, h in curves.items() if n.startswith(prefix)}, prefix)
            ax.set(title=f"{title} ({label})", xlabel="training images seen")
        row_axes[0].set_ylabel("error (%)")
    fig.suptitle(f"Degradation on {result['dataset']} (He et al. 2015, Fig. 6)", fontsize=11)
    fig.tight_layout()
    path = out_dir / "degradation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _plot_kind(ax, curves: dict[str, list[dict]], prefix: str) -> None:
    for k, (name, history) in enumerate(curves.items()):
        seen = list(_cumulative(r["train_images"] for r in history))
        color = f"C{k}"
        ax.plot(seen, [100 * (1 - r["train_acc"]) for r in history], "--", color=color, lw=1.2)
        label = f"{prefix}-{name.removeprefix(prefix)}"
        ax.plot(seen, [100 * (1 - r["val_acc"]) for r in history], "-", color=color, lw=2.2, label=label)
    ax.grid(alpha=0.3)
    ax.legend(title="dashed: train, bold: validation", fontsize=8, title_fontsize=8)


def _cumulative(values):
    total = 0
    for v in values:
        total += v
        yield total


def summarize(result: dict[str, Any]) -> list[str]:
    first = next(iter(result["runs"].values()))
    how = f"a budget of {result['budget']}" if result.get("budget") else "--steps"
    lines = [
        f"{len(result['runs'])} models, {result['steps']} steps of {result['recipe']['batch_size']} images each "
        f"(from {how}), the same batches in the same order, on {result['dataset']}; final errors of the last "
        f"weights, BatchNorm in inference mode, on {first['final']['train']['images']} of the training images "
        f"they trained on and on the test set, +- one standard error over images:"
    ]
    for row in result["table"]:
        lines.append(
            f"  {row['model']:>9}: training error {row['train_error']:.2%} +- {row['train_error_se']:.2%}, "
            f"test error {row['test_error']:.2%} +- {row['test_error_se']:.2%} "
            f"({row['train_seconds']:.0f} s of training, {row['device']}, {row['amp']})"
        )
    v = result["verdict"]
    plain = f"{v['plain_deep_minus_shallow_train_error']:+.2%} +- {v['plain_gap_se']:.2%}"
    resnet = f"{v['resnet_deep_minus_shallow_train_error']:+.2%} +- {v['resnet_gap_se']:.2%}"
    if v["plain_degrades"]:
        lines.append(
            f"plain-{v['deep']} ends above plain-{v['shallow']} ({plain}): the degradation problem, as in the paper."
        )
    else:
        lines.append(
            f"plain-{v['deep']} does not end clearly above plain-{v['shallow']} ({plain}): "
            "no degradation at this budget, unlike the paper."
        )
    if v["resnet_does_not_degrade"]:
        lines.append(
            f"resnet-{v['deep']} ends at or below resnet-{v['shallow']} ({resnet}): "
            "with shortcuts, depth helps, as in the paper."
        )
    else:
        within = " (within two standard errors)" if v["resnet_within_uncertainty"] else ""
        lines.append(
            f"resnet-{v['deep']} ends above resnet-{v['shallow']} ({resnet}){within}: unlike the paper at this budget."
        )
    lines.append(
        f"the experiment took {result['seconds']:.0f} s"
        + (f" of its {result['budget']}" if result.get("budget") else "")
    )
    return lines
