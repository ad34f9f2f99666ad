"""Transfer on real data: pretrain on five Fashion-MNIST classes, fine-tune on the other five from few labels.

Usage:
    python benchmarks/transfer.py [--shots 10 100] [--seeds 0 1 2] [--pretrain-steps 2000] [--work-dir runs/transfer]

The protocol (no internet here, so no ImageNet weights; the same question at a size a CPU answers):
1. Image folders written from Debian's Fashion-MNIST files: "clothes" (T-shirt/top, Trouser, Pullover, Dress,
   Coat: 30,000 training and 5,000 test images) and "the other five" (Sandal, Shirt, Sneaker, Bag, Ankle boot).
2. Pretrain the paper's CIFAR ResNet-20 on the clothes (recipes/transfer_pretrain.yaml, --steps).
3. For each number of labelled images per class (--shots) and each seed, a training folder of that many images
   per class of the other five, drawn by the seed; the test set is all 5,000 of their test images. Four ways
   to train on it (recipes/transfer_finetune.yaml, the same steps and batches for each; only these differ):
   - scratch: a fresh ResNet-20 (lr 0.1);
   - linear probe: the pretrained body frozen (stem, layer1..3 and their BatchNorm statistics), a new head (lr 0.1);
   - full fine-tune: every part from the pretrained weights (lr 0.02);
   - --finetune: the new head alone for the first epochs, then every part with per-part lrs (lr 0.1, layer
     decay 0.5: layer3 at 0.05 .. the stem at 0.00625).
   No validation split (the labels are few): the last weights are tested.
Writes benchmarks/results/transfer_fashion_mnist_cpu.json (every run's test accuracy, mean and spread over
seeds, the commands, the machine) and prints the table; `make docs-pages` then writes it into docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from reslab import machine
from reslab.data import load_dataset
from reslab.train import fit, from_dict, load_recipe

CLOTHES = (0, 1, 2, 3, 4)
OTHERS = (5, 6, 7, 8, 9)
PRETRAIN = "recipes/transfer_pretrain.yaml"
FINETUNE = "recipes/transfer_finetune.yaml"
# name: (what it is, the options over FINETUNE's, with {pretrained} for the pretrained best.pt)
METHODS: dict[str, tuple[str, dict]] = {
    "scratch": ("a fresh ResNet-20", {"lr": 0.1}),
    "linear_probe": ("body frozen, new head", {"weights": "{pretrained}", "freeze_until": "layer3", "lr": 0.1}),
    "full_finetune": ("all parts from the weights", {"weights": "{pretrained}", "lr": 0.02}),
    "finetune": ("head first, then all, layer decay", {"weights": "{pretrained}", "finetune": 0, "lr": 0.1}),
}


def write_folder(images: np.ndarray, labels: np.ndarray, classes: list[str], out: Path) -> Path:
    """PNG files in one folder per class: what a user's own images look like."""
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(out / classes[label] / f"{i:05d}.png")
    return out


def split_images(split, wanted: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels renumbered 0..4) of the classes ``wanted``."""
    labels = split.labels.numpy()
    keep = np.isin(labels, wanted)
    remap = {c: i for i, c in enumerate(wanted)}
    return split.images[keep, 0].numpy(), np.array([remap[c] for c in labels[keep]])


def prepare(work: Path) -> tuple[Path, Path, tuple, list[str]]:
    """The clothes folder (train/ test/), the others' test folder, the others' training pool, their names."""
    bundle = load_dataset("fashion-mnist", val_ratio=0.0, download=False)
    names = [c.replace("/", "-") for c in bundle.info.classes]
    clothes, others = [names[c] for c in CLOTHES], [names[c] for c in OTHERS]
    pretrain_dir, others_test = work / "clothes", work / "others-test"
    if not pretrain_dir.exists():
        write_folder(*split_images(bundle.train, CLOTHES), clothes, pretrain_dir / "train")
        write_folder(*split_images(bundle.test, CLOTHES), clothes, pretrain_dir / "test")
    if not others_test.exists():
        write_folder(*split_images(bundle.test, OTHERS), others, others_test)
    return pretrain_dir, others_test, split_images(bundle.train, OTHERS), others


def few_shot_folder(pool: tuple, classes: list[str], shots: int, seed: int, test: Path, out: Path) -> Path:
    """``shots`` training images per class drawn by ``seed``, beside the shared test folder."""
    if not out.exists():
        images, labels = pool
        rng = np.random.default_rng(seed)
        chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in range(5)])
        write_folder(images[chosen], labels[chosen], classes, out / "train")
        (out / "test").symlink_to(test.resolve(), target_is_directory=True)
    return out


def run(recipe: str, options: dict, out_dir: Path) -> dict:
    cfg = from_dict({**load_recipe(recipe), **options, "out_dir": str(out_dir), "overwrite": True})
    started = time.perf_counter()
    results = fit(cfg)
    return {"test_acc": results["test_acc"], "seconds": round(time.perf_counter() - started, 1), "options": options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--finetune-epochs", type=int, default=None, help="--finetune's head-only epochs")
    parser.add_argument("--work-dir", default="runs/transfer")
    args = parser.parse_args()
    work = Path(args.work_dir)
    pretrain_dir, test_dir, pool, classes = prepare(work)
    pretrained = run(PRETRAIN, {"data_dir": str(pretrain_dir), "steps": args.pretrain_steps}, work / "pretrain")
    print(f"pretrained on the clothes: test accuracy {pretrained['test_acc']:.2%} ({pretrained['seconds']} s)")
    weights = str(work / "pretrain" / "best.pt")
    table = {}
    for shots in args.shots:
        for name, (what, options) in METHODS.items():
            runs = []
            for seed in args.seeds:
                data = few_shot_folder(pool, classes, shots, seed, test_dir, work / f"others-{shots}-seed{seed}")
                given = {k: (weights if v == "{pretrained}" else v) for k, v in options.items()}
                if "finetune" in given:  # the head alone for the first fifth of the run
                    given["finetune"] = args.finetune_epochs or _head_epochs(shots)
                given |= {"data_dir": str(data), "seed": seed}
                runs.append(run(FINETUNE, given, work / f"{name}-{shots}-seed{seed}"))
            accuracies = [r["test_acc"] for r in runs]
            table[f"{name}/{shots}"] = {
                "method": name,
                "what": what,
                "shots": shots,
                "mean": statistics.mean(accuracies),
                "stdev": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "runs": runs,
            }
            row = table[f"{name}/{shots}"]
            print(f"{shots:>4} per class  {name:>14}: {row['mean']:.2%} +- {row['stdev']:.2%}  {accuracies}")
    record = {
        "pretrain": {"recipe": PRETRAIN, "steps": args.pretrain_steps, **pretrained},
        "finetune_recipe": load_recipe(FINETUNE),
        "seeds": args.seeds,
        "test_images": 5000,
        "rows": table,
        "provenance": machine.record("cpu"),
    }
    out = Path("benchmarks/results/transfer_fashion_mnist_cpu.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    print(f"wrote {out}; `make docs-pages` puts its table into docs/training.md")


def _head_epochs(shots: int) -> int:
    """A fifth of the run's epochs (FINETUNE's steps over an epoch of 5 x shots images)."""
    recipe = load_recipe(FINETUNE)
    epochs = recipe["steps"] * recipe["batch_size"] / (5 * shots)
    return max(1, round(epochs / 5))


def markdown(record: dict) -> str:
    """The docs' table: test accuracy on the other five classes, mean +- spread over seeds."""
    from docs_tables import transfer_table

    return transfer_table(record)


if __name__ == "__main__":
    main()
