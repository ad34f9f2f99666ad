"""The training configuration: one dataclass, filled from a YAML recipe and then from command-line flags.

Every default says why it is what it is. ``resolve()`` turns "auto" values into what this machine supports;
checkpoints store the resolved config so a resumed or evaluated run rebuilds exactly the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reslab.errors import ReslabError


@dataclass
class TrainConfig:
    # --- what to train -----------------------------------------------------------------------------------
    model: str = "resnet20"  # a name from `reslab models`; the paper's CIFAR ResNet-20 suits 28-32 px images
    model_args: dict[str, Any] = field(default_factory=dict)  # extra create_model options, e.g. widths
    dataset: str = "fashion-mnist"  # the benchmark available offline here (Debian's dataset-fashion-mnist)
    data_dir: str | None = None  # looked in first; then $RESLAB_DATA, then /usr/share/datasets
    download: bool = True  # let torchvision fetch missing files where the network allows
    val_ratio: float = 0.2  # held out of the training set, stratified, for early stopping (as the seeds)
    image_size: int | None = None  # imagefolder only: resize to this square size (default 224)
    in_chans: int | None = None  # imagefolder only: 1 for grayscale, 3 (default) for RGB

    # --- optimization ------------------------------------------------------------------------------------
    epochs: int = 30
    batch_size: int = 128  # per process; the paper's CIFAR runs use 128
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # the paper's CIFAR learning rate for SGD at batch 128
    momentum: float = 0.9  # SGD momentum; also Adam's beta1
    nesterov: bool = True  # a free, small gain over heavy-ball momentum for ResNets
    weight_decay: float = 5e-4  # applied to conv / linear weights only, never to BN or biases
    schedule: str = "cosine"  # step | cosine | onecycle | constant
    step_size: int = 30  # step schedule: epochs between decays (StepLR(step_size=30) in the seeds)
    gamma: float = 0.1  # step schedule: decay factor
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)
    label_smoothing: float = 0.0  # e.g. 0.1: a regularizer that helps short schedules

    # --- augmentation (training split only) --------------------------------------------------------------
    crop_padding: int = 4  # RandomCrop(size, padding=4); 0 turns it off
    flip: bool = True  # RandomHorizontalFlip
    tta_flip: bool = False  # also evaluate mirrored images and average the logits

    # --- early stopping ----------------------------------------------------------------------------------
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = never

    # --- runtime -----------------------------------------------------------------------------------------
    seed: int = 0  # the same seed gives the same metrics on the CPU
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    amp: str = "auto"  # auto | bf16 | fp16 | off; auto = bf16 where the hardware runs it fast
    channels_last: bool | None = None  # None = auto: on for CPU (oneDNN) and CUDA
    compile: bool = False  # torch.compile the model (slow first epoch, faster later ones)
    num_workers: int = 2  # imagefolder DataLoader workers
    eval_batch_size: int = 1000

    # --- output ------------------------------------------------------------------------------------------
    out_dir: str | None = None  # default runs/<model>-<dataset>
    hist_every: int = 1  # weight histograms every this many epochs (0 = never)
    quiet: bool = False  # no progress bar: one line per epoch, for logs and CI

    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.model}-{self.dataset}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("step", "cosine", "onecycle", "constant"),
    "amp": ("auto", "bf16", "fp16", "off"),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that cannot work, with the option's name in the message."""
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise ReslabError(f"{name} must be one of {', '.join(options)}, not {getattr(cfg, name)!r}")
    positive = ("epochs", "batch_size", "eval_batch_size", "step_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ReslabError(f"{name} must be at least 1, not {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ReslabError(f"lr must be positive, not {cfg.lr}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ReslabError(f"label_smoothing must be in [0, 1), not {cfg.label_smoothing}")
    if cfg.patience < 0 or cfg.warmup_epochs < 0 or cfg.crop_padding < 0 or cfg.weight_decay < 0:
        raise ReslabError("patience, warmup_epochs, crop_padding and weight_decay cannot be negative")
    if not isinstance(cfg.model_args, dict):
        raise ReslabError("model_args must be a mapping of create_model options")
    return cfg


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """A config from ``values`` over ``base`` (default: the defaults); unknown keys are an error."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        import difflib

        hints = [
            f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, FIELDS, 1)) else k for k in unknown
        ]
        raise ReslabError(f"{source}: unknown option(s) {', '.join(hints)}")
    return validate(dataclasses.replace(base or TrainConfig(), **values))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ReslabError(f"recipe not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ReslabError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ReslabError(f"{path} should hold a mapping of options, not a {type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}
