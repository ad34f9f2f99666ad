"""What a run that starts from pretrained weights decides: the input preprocessing that travels with the weights,
which parts of the model are frozen in which epoch, and whether ``--finetune`` fits the run."""

from __future__ import annotations

from torch import nn

from reslab.data.types import Preprocessing
from reslab.errors import ReslabError
from reslab.models.pretrained import Pretrained
from reslab.train.config import TrainConfig


def preprocessing(cfg: TrainConfig, pretrained: Pretrained | None) -> tuple[Preprocessing | None, list[str]]:
    """The input the run trains on: the weights' mean, std, size and resize, each replaced by ``--mean``,
    ``--std``, ``--image-size`` where given; and the lines that say so. None: the dataset's own."""
    source = dict(pretrained.preprocessing) if pretrained is not None else {}
    if not source and not cfg.mean:
        return None, []
    lines = []
    if source:
        size, resize = source.get("image_size"), source.get("resize") or 0
        crop = f"a {size} px centre crop of a {resize} px resize" if resize else f"{size} px"
        lines.append(
            f"input as the weights expect it: mean {_numbers(source['mean'])}, std {_numbers(source['std'])}, "
            f"{crop} ({source.get('interpolation', 'bilinear')}; image folders) from {pretrained.origin}"
        )
    if cfg.mean:
        source.update(mean=tuple(cfg.mean), std=tuple(cfg.std))
        lines.append(f"--mean {_numbers(cfg.mean)} --std {_numbers(cfg.std)} replace them")
    if cfg.image_size and source.get("image_size") and cfg.image_size != source["image_size"]:
        if source.get("resize"):  # the same share of the image: 224 of 256 becomes 112 of 128
            source["resize"] = round(source["resize"] * cfg.image_size / source["image_size"])
        source["image_size"] = cfg.image_size
        lines.append(f"--image-size {cfg.image_size} replaces the weights' size")
    keys = ("mean", "std", "image_size", "resize", "interpolation")
    return Preprocessing(**{k: source.get(k) for k in keys}), lines


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def recorded_preprocessing(dataset: dict) -> Preprocessing:
    """The input a checkpoint's run trained on (its ``dataset`` record), for resuming it exactly."""
    return Preprocessing(
        mean=tuple(dataset["mean"]),
        std=tuple(dataset["std"]),
        image_size=dataset["image_size"][0],
        resize=dataset.get("resize", 0),
        interpolation=dataset.get("interpolation", "bilinear"),
    )


def part_names(cfg: TrainConfig) -> list[str]:
    """The parts of ``cfg.model`` that may be frozen (``stem``, ``layer1`` ..), read from the registry."""
    from reslab.models.registry import get_spec

    layers = cfg.model_args.get("layers", get_spec(cfg.model).kwargs.get("layers", ()))
    return ["stem", *(f"layer{i + 1}" for i in range(len(layers)))]


def check_parts(cfg: TrainConfig) -> None:
    """``--freeze`` and ``--freeze-until`` name parts the model has (a ReslabError otherwise)."""
    if cfg.freeze or cfg.freeze_until:
        permanently_frozen(cfg, part_names(cfg))


def permanently_frozen(cfg: TrainConfig, parts: list[str]) -> list[str]:
    """The parts ``--freeze`` or ``--freeze-until`` name, in the model's order, checked against ``parts``."""
    trainable = [p for p in parts if p != "head"]
    if cfg.freeze_until:
        if cfg.freeze_until not in trainable:
            raise ReslabError(f"--freeze-until {cfg.freeze_until}: {cfg.model} has the parts {', '.join(trainable)}")
        return trainable[: trainable.index(cfg.freeze_until) + 1]
    names = [n.strip() for n in cfg.freeze.split(",") if n.strip()]
    unknown = [n for n in names if n not in trainable]
    if unknown:
        raise ReslabError(f"--freeze {unknown[0]}: {cfg.model} has the parts {', '.join(trainable)} (the head trains)")
    return [p for p in trainable if p in names]


def frozen_in_epoch(cfg: TrainConfig, model: nn.Module, epoch: int) -> list[str]:
    """The parts frozen during ``epoch`` (from 0): ``--freeze``'s always, and with ``--finetune N`` every part
    but the head in the first N epochs."""
    if epoch < cfg.finetune:
        return [p for p in model.part_names if p != "head"]
    return permanently_frozen(cfg, list(model.part_names))


def check_finetune_fits(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> None:
    """``--finetune N`` must leave at least one epoch's steps for training the whole net."""
    if cfg.finetune and cfg.finetune * steps_per_epoch >= total_steps:
        raise ReslabError(
            f"finetune {cfg.finetune} is longer than the run ({total_steps / steps_per_epoch:.3g} epochs): give "
            "fewer finetune epochs or a longer run"
        )
