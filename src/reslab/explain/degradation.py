"""The degradation problem (He et al. 2015, Fig. 1 and Fig. 6), at a size a laptop runs.

Plain nets of 20 and 56 layers and their residual twins are trained by ``reslab.train.fit`` with one recipe and
one budget. The paper's finding: the deeper plain net ends with *higher training error* than the shallower one
(an optimization difficulty, not overfitting), while the deeper ResNet ends at or below the shallower one.
Every model's run folder (``<runs_dir>/<name>``: best.pt, last.pt, metrics, TensorBoard, report) stays, so
``responses``, ``lesion`` and ``landscape`` study the same trained models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reslab.errors import ReslabError
from reslab.explain.common import DEFAULT_RUNS_DIR
from reslab.models import get_spec

# The paper's CIFAR recipe (Sec. 4.2: SGD, batch 128, lr 0.1, momentum 0.9, weight decay 1e-4, no dropout,
# 4-pixel crops and flips), with a cosine schedule in place of the two step decays so a short budget ends at a
# small learning rate. No warmup and no label smoothing: the plain nets get the paper's treatment, and the
# training error is the plain classification error.
RECIPE: dict[str, Any] = dict(
    epochs=3,  # about 40 minutes for the four models on a 2-core AVX2 CPU in float32 (minutes on a GPU)
    batch_size=128,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    schedule="cosine",
    warmup_epochs=0.0,
    label_smoothing=0.0,
    crop_padding=2,  # 28x28 Fashion-MNIST: the CIFAR recipe's 4 pixels at 32x32, scaled down
    flip=True,
    val_ratio=0.2,  # per-epoch "test" curve on held-out training images; the test set is scored at the end
    patience=0,  # the same budget for every model
    quiet=True,
)


def _names(depths: tuple[int, ...]) -> list[str]:
    names = []
    for depth in depths:
        for prefix in ("plain", "resnet"):
            get_spec(f"{prefix}{depth}")  # one clear line for a depth the paper does not define
            names.append(f"{prefix}{depth}")
    return names


def _config(name: str, recipe: dict[str, Any], *, runs_dir: Path, device: str):
    from reslab.train import TrainConfig, from_dict

    values = {**recipe, "model": name, "device": device, "out_dir": str(runs_dir / name), "overwrite": True}
    values["download"] = False
    return from_dict(values, TrainConfig(), source="degradation recipe")


def _finished(cfg) -> dict[str, Any] | None:
    """The saved run of exactly this config, if one finished (its results.json and best.pt agree with it)."""
    from reslab.train import load_checkpoint

    run = Path(cfg.out_dir)
    if not (run / "results.json").is_file() or not (run / "best.pt").is_file():
        return None
    ckpt = load_checkpoint(run / "best.pt")
    ignore = {"out_dir", "overwrite", "quiet", "device", "amp", "channels_last"}
    saved = {k: v for k, v in ckpt["config"].items() if k not in ignore}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    if saved != wanted or "results" not in ckpt:
        return None
    return _read_run(run)


def _read_run(run: Path) -> dict[str, Any]:
    from reslab.train import load_checkpoint

    history = load_checkpoint(run / "best.pt")["history"]
    return {"history": history, "results": json.loads((run / "results.json").read_text())}


def measure(
    *,
    depths: tuple[int, ...] = (20, 56),
    epochs: int | None = None,
    recipe: str | None = None,
    runs_dir: str = DEFAULT_RUNS_DIR,
    retrain: bool = False,
    dataset: str | None = None,
    data_dir: str | None = None,
    seed: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train (or reuse) plain and residual nets of each depth; their per-epoch errors and final test errors.

    ``dataset``, ``data_dir``, ``seed`` and ``epochs`` override the recipe's (default: Fashion-MNIST, seed 0).
    Returns ``{"recipe", "runs": {name: {"history", "results", "reused"}}, "table", "verdict"}``.
    """
    from reslab.analysis.report import write_report
    from reslab.train import fit, load_recipe

    values = {**RECIPE, "dataset": "fashion-mnist", "seed": 0}
    if recipe is not None:
        values.update(load_recipe(recipe))
    given = {"epochs": epochs, "dataset": dataset, "data_dir": data_dir, "seed": seed}
    values.update({k: v for k, v in given.items() if v is not None})
    if len(set(depths)) < 2:
        raise ReslabError("--depths needs at least two different depths to compare, e.g. 20 56")
    if not values.get("val_ratio"):
        raise ReslabError("the degradation recipe needs a validation split (val_ratio > 0) for its error curves")
    runs: dict[str, dict[str, Any]] = {}
    for name in _names(tuple(sorted(depths))):
        cfg = _config(name, values, runs_dir=Path(runs_dir), device=device)
        done = None if retrain else _finished(cfg)
        if done is None:
            print(f"training {name} ({values['epochs']} epochs) into {cfg.out_dir}")
            fit(cfg)
            write_report(cfg.out_dir, device=device)  # as `reslab train` does: the run's report.html
            done = {**_read_run(Path(cfg.out_dir)), "reused": False}
        else:
            print(f"reusing the finished run in {cfg.out_dir} (--retrain trains it again)")
            done = {**done, "reused": True}
        runs[name] = done
    table = [_row(name, run) for name, run in runs.items()]
    return {
        "recipe": values,
        "dataset": values["dataset"],
        "runs": runs,
        "table": table,
        "verdict": _verdict(runs, depths),
    }


def _row(name: str, run: dict[str, Any]) -> dict[str, Any]:
    last = run["history"][-1]
    res = run["results"]
    return {
        "model": name,
        "train_error": 1 - last["train_acc"],
        "val_error": 1 - last["val_acc"] if last.get("val_acc") is not None else None,
        "test_error": 1 - res["test_acc"] if res.get("test_acc") is not None else None,
        "train_seconds": res["train_seconds"],
        "device": res["device"],
    }


def _verdict(runs: dict[str, dict[str, Any]], depths) -> dict[str, Any]:
    """Does the paper's finding hold here? Compares the last epoch's training error of the deepest and the
    shallowest net of each kind."""
    low, high = min(depths), max(depths)

    def train_error(name: str) -> float:
        return 1 - runs[name]["history"][-1]["train_acc"]

    plain_gap = train_error(f"plain{high}") - train_error(f"plain{low}")
    resnet_gap = train_error(f"resnet{high}") - train_error(f"resnet{low}")
    return {
        "shallow": low,
        "deep": high,
        "plain_deep_minus_shallow_train_error": plain_gap,
        "resnet_deep_minus_shallow_train_error": resnet_gap,
        "plain_degrades": plain_gap > 0,
        "resnet_does_not_degrade": resnet_gap <= 0,
    }


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Fig. 6 of the paper: plain nets left, ResNets right; training error dashed, validation error bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, prefix, title in ((axes[0], "plain", "plain networks"), (axes[1], "resnet", "ResNets")):
        names = [n for n in result["runs"] if n.startswith(prefix)]
        for color, name in zip(colors, names, strict=False):
            history = result["runs"][name]["history"]
            epochs = [r["epoch"] + 1 for r in history]
            ax.plot(epochs, [100 * (1 - r["train_acc"]) for r in history], "--", color=color, lw=1.2)
            ax.plot(
                epochs,
                [100 * (1 - r["val_acc"]) for r in history],
                "-",
                color=color,
                lw=2.2,
                label=f"{prefix}-{name.removeprefix(prefix)}",
            )
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(title="dashed: train, bold: validation", fontsize=8, title_fontsize=8)
    axes[0].set_ylabel("error (%)")
    fig.suptitle(f"Degradation on {result['dataset']} (He et al. 2015, Fig. 6)", fontsize=11)
    fig.tight_layout()
    path = out_dir / "degradation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def summarize(result: dict[str, Any]) -> list[str]:
    epochs = result["recipe"]["epochs"]
    lines = [f"{len(result['runs'])} models, {epochs} epochs each, one recipe, on {result['dataset']}:"]
    for row in result["table"]:
        test = f"{row['test_error']:.2%}" if row["test_error"] is not None else "-"
        lines.append(
            f"  {row['model']:>10}: final training error {row['train_error']:.2%}, test error {test} "
            f"({row['train_seconds']:.0f} s of training on {row['device']})"
        )
    v = result["verdict"]
    lines.append(
        f"plain-{v['deep']} ends with {'higher' if v['plain_degrades'] else 'lower'} training error than "
        f"plain-{v['shallow']} ({v['plain_deep_minus_shallow_train_error']:+.2%}): "
        + ("the degradation problem, as in the paper." if v["plain_degrades"] else "no degradation at this budget.")
    )
    lines.append(
        f"resnet-{v['deep']} ends {'at or below' if v['resnet_does_not_degrade'] else 'above'} resnet-{v['shallow']} "
        f"({v['resnet_deep_minus_shallow_train_error']:+.2%}): "
        + ("depth helps once there are shortcuts." if v["resnet_does_not_degrade"] else "unlike the paper's finding.")
    )
    return lines
