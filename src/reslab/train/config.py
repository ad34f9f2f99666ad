"""The training configuration: one dataclass, filled from a YAML recipe and then from command-line flags.

Every default says why it is what it is. ``resolve()`` turns "auto" values into what this machine supports;
checkpoints store the resolved config so a resumed or evaluated run rebuilds exactly the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reslab.errors import ReslabError

MAX_TTA_TRANSLATE = 4  # pixels; images are at least 8 px, and a reflected shift must be smaller than the image


@dataclass
class TrainConfig:
    # --- what to train -----------------------------------------------------------------------------------
    model: str = "resnet20"  # a name from `reslab models`; the paper's CIFAR ResNet-20 suits 28-32 px images
    model_args: dict[str, Any] = field(default_factory=dict)  # extra create_model options, e.g. widths
    dataset: str = "fashion-mnist"  # or mnist, cifar10, cifar100, imagefolder, synthetic
    data_dir: str | None = None  # looked in first; then $RESLAB_DATA, then /usr/share/datasets
    download: bool = True  # let torchvision fetch missing files where the network allows
    val_ratio: float = 0.2  # held out of the training set, stratified, for early stopping (as the seeds)
    train_subset: int = 0  # train on about this many training images, the same share of each class; 0 = all
    image_size: int | None = None  # imagefolder only: resize to this square size (default 224)
    in_chans: int | None = None  # imagefolder only: 1 for grayscale, 3 (default) for RGB
    on_bad_image: str = "skip"  # imagefolder: skip (listed in bad_images.txt) or fail on unreadable files
    max_image_pixels: int = 89_478_485  # imagefolder: larger images are refused as decompression bombs (PIL's limit)

    # --- fine-tuning -------------------------------------------------------------------------------------
    weights: str = ""  # start from these: a .pth / .safetensors file, a reslab best.pt, or imagenet (torchvision's)
    force_weights: bool = False  # load weights of another network whose tensors fit (v1.5 weights into a v1 model)
    freeze: str = ""  # parts kept fixed, comma-separated (stem,layer1,...); their BatchNorm stays in inference mode
    freeze_until: str = ""  # or: freeze the stem and every stage up to and including this one
    finetune: int = 0  # epochs training only the head (all else frozen), then everything with layer_decay (fastai)
    layer_decay: float = 0.0  # each part learns at this times the next part's lr, the head at lr; 0 = off (timm)
    mean: list[float] = field(default_factory=list)  # input mean in place of the weights' or the data's (0..1)
    std: list[float] = field(default_factory=list)  # input std in place of the weights' or the data's

    # --- optimization ------------------------------------------------------------------------------------
    epochs: int = 30  # passes over the training split (fewer when early stopping ends the run)
    steps: int = 0  # optimizer steps in all, in place of epochs (the last epoch may be partial); 0 = epochs' worth
    budget: str = ""  # wall-clock budget (90s, 4m, 1h): the run times a few steps and sets `steps` to what fits
    batch_size: int = 128  # per process; the paper's CIFAR runs use 128
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # the paper's CIFAR learning rate for SGD at batch 128
    lr_reference_batch: int = 0  # 0: lr as given; N: lr is for a global batch of N, scaled to batch_size x processes
    momentum: float = 0.9  # SGD momentum; also Adam's beta1
    nesterov: bool = True  # a free, small gain over heavy-ball momentum for ResNets
    weight_decay: float = 5e-4  # applied to conv / linear weights only, never to BN or biases
    schedule: str = "cosine"  # step | cosine | onecycle | constant
    step_size: int = 30  # step schedule: epochs between decays (StepLR(step_size=30) in the seeds)
    gamma: float = 0.1  # step schedule: decay factor
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)
    warmup_fraction: float = 0.0  # or in a share of the run's steps, e.g. 0.1 (for budgets, whose steps vary)
    label_smoothing: float = 0.0  # e.g. 0.1: a regularizer that helps short schedules
    ema_decay: float = 0.0  # 0 = off; e.g. 0.99: also keep an average of the weights, used where it validates better

    # --- augmentation (training split only) --------------------------------------------------------------
    crop_padding: int = 4  # RandomCrop(size, padding=4); 0 turns it off
    flip: bool = True  # RandomHorizontalFlip
    random_erasing: float = 0.0  # probability of erasing a random rectangle of each image (Zhong et al. 2017: 0.5)
    progressive_sizes: list[int] = field(default_factory=list)  # training image size per epoch, e.g. [16, 20, 28]
    tta_flip: bool = False  # test set: average the logits of each image and its mirror (not used for validation)
    tta_translate: int = 0  # test set: also average over the image shifted this many pixels (0 to 4)

    # --- early stopping ----------------------------------------------------------------------------------
    patience: int = 0  # stop after this many epochs without a better validation accuracy; 0 = never
    max_loss: float = 0.0  # a step whose loss exceeds this stops the run as diverged; 0 = 100 x ln(classes)

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
    overwrite: bool = False  # a folder that holds a run is never overwritten unless this says so
    hist_every: int = 1  # weight histograms every this many epochs (0 = never)
    save_every_steps: int = 0  # also checkpoint inside an epoch every N steps; 0 = auto, about once a minute
    log_every_steps: int = 10  # TensorBoard: training loss and learning rate every N steps
    sync_every_steps: int = 10  # the host reads losses and the divergence check every N steps, so a GPU never waits
    quiet: bool = False  # no progress bar: one line per epoch, for logs and CI

    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.model}-{self.dataset}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_help() -> dict[str, str]:
    """Each option's comment in the class above: the one text for both readers of this file and `--help`."""
    import inspect
    import re

    source = inspect.getsource(TrainConfig)
    return {m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^#\n]*#\s*(.*)$", source, flags=re.M)}


# What a resumed run may change: how it runs and reports, never what it computes (so resuming stays exact).
RESUMABLE_OVERRIDES = (
    "patience",
    "device",
    "quiet",
    "num_workers",
    "hist_every",
    "eval_batch_size",
    "out_dir",
    "compile",
    "tta_flip",
    "download",
    "data_dir",
    "save_every_steps",
    "log_every_steps",
    "sync_every_steps",
    "max_loss",
    "tta_translate",
)


def check_resumable(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """A run may resume a checkpoint whose config (``saved``) differs from ``cfg`` only in RESUMABLE_OVERRIDES."""
    defaults = TrainConfig()
    for key, value in cfg.to_dict().items():
        if key in RESUMABLE_OVERRIDES or key == "overwrite":
            continue
        before = saved.get(key, getattr(defaults, key))  # an option newer than the checkpoint had its default
        if before != value:
            raise ReslabError(
                f"cannot resume: the checkpoint has {key}={before!r}, this run {value!r} "
                f"(a resumed run may change only {', '.join(RESUMABLE_OVERRIDES)})"
            )


CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("step", "cosine", "onecycle", "constant"),
    "amp": ("auto", "bf16", "fp16", "off"),
    "on_bad_image": ("skip", "fail"),
}


# Each option's type, for values that arrive as text (YAML reads `lr: 1e-3` as a string) or of the wrong kind.
_OPTIONAL = {"data_dir": str, "image_size": int, "in_chans": int, "channels_last": bool, "out_dir": str}
_TYPES = {name: _OPTIONAL.get(name) or type(getattr(TrainConfig(), name)) for name in FIELDS}


def _coerce(name: str, value: Any) -> Any:
    kind = _TYPES[name]
    if value is None and name in _OPTIONAL:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (float, str)):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
    elif kind is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, kind):
        return value
    raise ReslabError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, not {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that cannot work, with the option's name in the message."""
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            raise ReslabError(f"{name} must be one of {', '.join(options)}, not {getattr(cfg, name)!r}")
    if cfg.budget:
        from reslab.train.budget import parse_budget

        parse_budget(cfg.budget)  # one line for "4 minutes", "-1m", "0"
        if cfg.progressive_sizes:  # the probe times the first epoch's size; later, larger epochs cost more
            raise ReslabError("budget and progressive_sizes do not go together: give epochs or steps instead")
    positive = ("epochs", "batch_size", "eval_batch_size", "step_size", "sync_every_steps")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ReslabError(f"{name} must be at least 1, not {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ReslabError(f"lr must be a positive number, not {cfg.lr}")
    if not 0 <= cfg.momentum < 1:
        raise ReslabError(f"momentum must be in [0, 1), not {cfg.momentum}")
    if not 0 < cfg.gamma <= 1:
        raise ReslabError(f"gamma must be in (0, 1], not {cfg.gamma}")
    clash = sorted({"num_classes", "in_chans"} & set(cfg.model_args))
    if clash:
        raise ReslabError(f"model_args cannot set {', '.join(clash)}: the dataset decides them")
    for name in ("random_erasing", "ema_decay"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ReslabError(f"{name} must be in [0, 1), not {getattr(cfg, name)}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ReslabError(f"label_smoothing must be in [0, 1), not {cfg.label_smoothing}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise ReslabError(f"warmup_fraction must be in [0, 1), not {cfg.warmup_fraction}")
    if cfg.warmup_fraction and cfg.warmup_epochs:
        raise ReslabError("give warmup_epochs or warmup_fraction, not both")
    if not 0 <= cfg.val_ratio < 1:
        raise ReslabError(f"val_ratio must be in [0, 1), not {cfg.val_ratio}")
    if cfg.patience and cfg.val_ratio == 0:
        raise ReslabError("patience (early stopping) needs a validation split: set val_ratio above 0")
    negative = [
        n
        for n in (
            "patience",
            "warmup_epochs",
            "crop_padding",
            "weight_decay",
            "num_workers",
            "hist_every",
            "save_every_steps",
            "max_loss",
            "tta_translate",
            "lr_reference_batch",
            "steps",
            "train_subset",
        )
        if getattr(cfg, n) < 0
    ]
    if negative:
        raise ReslabError(f"{', '.join(negative)} cannot be negative")
    if cfg.in_chans not in (None, 1, 3):
        raise ReslabError(f"in_chans must be 1 (grayscale) or 3 (RGB), not {cfg.in_chans}")
    if cfg.log_every_steps < 1:
        raise ReslabError(f"log_every_steps must be at least 1, not {cfg.log_every_steps}")
    if cfg.max_image_pixels < 1:
        raise ReslabError(f"max_image_pixels must be at least 1, not {cfg.max_image_pixels}")
    if any(not isinstance(n, int) or n < 8 for n in cfg.progressive_sizes):
        raise ReslabError(f"progressive_sizes must be image sizes of at least 8 pixels, not {cfg.progressive_sizes}")
    if cfg.tta_translate > MAX_TTA_TRANSLATE:
        raise ReslabError(f"tta_translate is a shift of 0 to {MAX_TTA_TRANSLATE} pixels, not {cfg.tta_translate}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise ReslabError(f"image_size must be at least 8 pixels, not {cfg.image_size}")
    _validate_finetuning(cfg)
    return cfg


def _validate_finetuning(cfg: TrainConfig) -> None:
    if not 0 <= cfg.layer_decay <= 1:
        raise ReslabError(f"layer_decay must be in (0, 1] (or 0 for off), not {cfg.layer_decay}")
    if cfg.finetune < 0:
        raise ReslabError(f"finetune cannot be negative, not {cfg.finetune}")
    if cfg.finetune and not cfg.weights:
        raise ReslabError("finetune trains a pretrained body's new head first: give --weights too")
    if cfg.finetune and not cfg.steps and not cfg.budget and cfg.finetune >= cfg.epochs:
        raise ReslabError(f"finetune {cfg.finetune} leaves no epoch to train the whole net in a run of {cfg.epochs}")
    if cfg.freeze and cfg.freeze_until:
        raise ReslabError("give freeze or freeze_until, not both")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in [*cfg.mean, *cfg.std]):
        raise ReslabError(f"mean and std are numbers per channel, not {cfg.mean} and {cfg.std}")
    if len(cfg.mean) != len(cfg.std):
        raise ReslabError(f"mean and std go together, one value per channel: {cfg.mean} and {cfg.std}")
    if any(not (math.isfinite(s) and s > 0) for s in cfg.std):
        raise ReslabError(f"std must be positive, not {cfg.std}")


def from_dict(values: dict[str, Any], base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """A config from ``values`` over ``base`` (default: the defaults); unknown keys are an error."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        import difflib

        hints = [
            f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, FIELDS, 1)) else k for k in unknown
        ]
        raise ReslabError(f"{source}: unknown option(s) {', '.join(hints)}")
    if isinstance(values.get("budget"), (int, float)) and not isinstance(values["budget"], bool):
        values = {**values, "budget": f"{values['budget']}s"}  # YAML `budget: 90`: seconds
    typed = {k: _coerce(k, v) for k, v in values.items()}
    return validate(dataclasses.replace(base or TrainConfig(), **typed))


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
    if not all(isinstance(k, str) for k in values):
        raise ReslabError(f"{path}: every option name must be text, e.g. `lr: 0.1`")
    return {k.replace("-", "_"): v for k, v in values.items()}
