"""The parts a run trains with, built the one way ``fit``, ``measure_costs`` and ``reslab lr-find`` build them.

The config as it runs on this machine, the pretrained weights (read once), the data with its preprocessing,
the loss, the model with its frozen parts and its optimizer, and the loaders. Nothing here writes a
checkpoint or a log: a run's own files are the trainer's (``trainer.py``, ``checkpointing.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from reslab.data import DataBundle, load_dataset
from reslab.data.types import DatasetInfo, subset_of_train
from reslab.errors import ReslabError
from reslab.models import create_model
from reslab.models.pretrained import Pretrained, load_pretrained, read_pretrained
from reslab.train import finetuning, runtime
from reslab.train.config import TrainConfig
from reslab.train.loaders import build_loaders
from reslab.train.optim import build_optimizer

if TYPE_CHECKING:
    from reslab.train.checkpointing import ResumePoint

AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def announcer(rt: runtime.Runtime):
    """``print`` on rank 0, silence on the others: every rank runs the same code, one speaks."""
    return print if rt.is_main else (lambda message: None)


def resolved_config(cfg: TrainConfig, rt: runtime.Runtime) -> TrainConfig:
    """``cfg`` as it runs here: "auto" replaced by what this machine chose (checkpoints store this one).

    Raises ReslabError when ``--freeze`` names a part the model lacks, before anything is read or written.
    """
    resolved = dataclasses.replace(
        cfg, device=rt.device.type, amp=AMP_NAMES[rt.amp_dtype], channels_last=rt.channels_last
    )
    finetuning.check_parts(resolved)
    return resolved


def read_weights(cfg: TrainConfig, rt: runtime.Runtime) -> Pretrained | None:
    """``cfg.weights`` read on every rank (an error on one ends all), or None when the run has none."""
    if not cfg.weights:
        return None
    return runtime.on_every_rank(lambda: read_pretrained(cfg.weights, cfg.model, download=cfg.download), rt)


def data_sizes(bundle: DataBundle) -> dict[str, int]:
    """Images per split: saved in checkpoints, compared when a run resumes."""
    splits = {"train": bundle.train, "val": bundle.val, "test": bundle.test}
    return {name: len(split) if split is not None else 0 for name, split in splits.items()}


@dataclass
class RunParts:
    """What every step of a run uses; made by ``prepare``.

    Attributes:
        cfg: the config as it runs here (``resolved_config``).
        bundle: the data; ``bundle.info`` its classes, channels and normalization.
        loss_fn: the training loss (label smoothing included).
        max_loss: a finite loss above this is divergence (``--max-loss``, or 100 times a uniform guess's loss).
        model: the raw model on the device, weights loaded and ``--freeze`` parts frozen.
        optimizer: over the parts that may train.
        loaders: (train, val, test); val and test may be None.
        host_checked: whether the host must look at each step before the optimizer applies it (fp16, whose
            GradScaler owns the optimizer's found_inf, or an optimizer without a fused kernel); otherwise the
            device skips a bad step by itself (``guard.py``).
    """

    cfg: TrainConfig
    bundle: DataBundle
    loss_fn: nn.Module
    max_loss: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loaders: tuple
    host_checked: bool

    @property
    def info(self) -> DatasetInfo:
        return self.bundle.info


def prepare(
    cfg: TrainConfig,
    rt: runtime.Runtime,
    *,
    pretrained: Pretrained | None = None,
    resume: ResumePoint | None = None,
) -> RunParts:
    """Seed, read the data, build the model, its optimizer and the loaders for a run of ``cfg`` (resolved).

    Args:
        cfg: the config as it runs here (``resolved_config``).
        rt: where it runs.
        pretrained: ``cfg.weights`` when already read; read here when None and the run is new.
        resume: the checkpoint a resumed run continues: its recorded preprocessing is used, its weights come
            later from its state (the pretrained ones are never read again), and its data must be the same.

    Returns:
        The run's parts; an error on any rank (under DDP) is raised on every rank.
    """
    runtime.seed_everything(cfg.seed + rt.rank)
    if resume is None and pretrained is None:  # the weights come with the input they expect: read before the data
        pretrained = read_weights(cfg, rt)
    bundle = _load_data(cfg, rt, pretrained, resume)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    max_loss = cfg.max_loss or 100 * math.log(max(bundle.info.num_classes, 2))
    with runtime.shared_errors(rt):
        if resume is not None:
            _check_same_data(resume, bundle)
        model, optimizer = _new_model(cfg, rt, bundle.info, pretrained)
        host_checked = rt.amp_dtype == torch.float16 or not optimizer.defaults.get("fused")
        loaders = build_loaders(bundle, cfg, rt)
    return RunParts(cfg, bundle, loss_fn, max_loss, model, optimizer, loaders, host_checked)


def wrap(model: nn.Module, cfg: TrainConfig, rt: runtime.Runtime) -> nn.Module:
    """``model`` as the steps call it: in DDP under torchrun, compiled with ``cfg.compile``."""
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    # dynamic=False: a shape seen twice (progressive sizes, the last partial batch) gets kernels of its own
    # rather than one slower shape-generic graph for every size.
    return torch.compile(model, dynamic=False) if cfg.compile else model


def _load_data(
    cfg: TrainConfig, rt: runtime.Runtime, pretrained: Pretrained | None, resume: ResumePoint | None
) -> DataBundle:
    if resume is not None and (cfg.weights or cfg.mean):  # resumed exactly as it began, whatever the weights say now
        preprocessing = finetuning.recorded_preprocessing(resume.checkpoint["dataset"])
    else:
        preprocessing, lines = finetuning.preprocessing(cfg, pretrained)
        for line in lines:
            announcer(rt)(line)

    def load() -> DataBundle:
        bundle = load_dataset(
            cfg.dataset,
            data_dir=cfg.data_dir,
            val_ratio=cfg.val_ratio,
            seed=cfg.seed,
            download=cfg.download,
            image_size=cfg.image_size,
            in_chans=cfg.in_chans,
            on_bad_image=cfg.on_bad_image,
            max_image_pixels=cfg.max_image_pixels,
            preprocessing=preprocessing,
        )
        if cfg.train_subset:
            bundle.train = subset_of_train(bundle, cfg.train_subset, cfg.seed)
        return bundle

    bundle = runtime.on_every_rank(load, rt)  # a user error on one rank ends every rank alike
    with runtime.shared_errors(rt):
        if bundle.bad_files and rt.is_main:
            from reslab.data.verify import write_bad_images

            listing = write_bad_images(bundle.bad_files, cfg.run_dir())
            print(f"skipped {len(bundle.bad_files)} unreadable image(s), listed in {listing}")
    return bundle


def _check_same_data(resume: ResumePoint, bundle: DataBundle) -> None:
    """A resumed run must see the data its checkpoint saw: a file removed since would change every split."""
    saved, now = resume.checkpoint.get("data_sizes"), data_sizes(bundle)
    if saved is not None and saved != now:
        raise ReslabError(
            f"the data changed since {resume.path} was saved (images per split then {saved}, now "
            f"{now}); restore the files to continue, or start a new run (--overwrite)"
        )


def _new_model(
    cfg: TrainConfig, rt: runtime.Runtime, info: DatasetInfo, pretrained: Pretrained | None
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (``pretrained`` loaded into it, when given), its ``--freeze`` parts frozen, and an optimizer over
    the parts that may train."""
    model_args = {"num_classes": info.num_classes, "in_chans": info.channels, **cfg.model_args}
    model = create_model(cfg.model, **model_args)
    if pretrained is not None:
        load_pretrained(model, pretrained, force=cfg.force_weights, say=announcer(rt))
    frozen = finetuning.permanently_frozen(cfg, list(getattr(model, "part_names", [])))
    if frozen:
        model.freeze(frozen)
        announcer(rt)(f"frozen for the whole run: {', '.join(frozen)} (BatchNorm statistics too)")
    model.to(rt.device, memory_format=torch.channels_last if rt.channels_last else torch.contiguous_format)
    return model, build_optimizer(model, cfg, rt.device, rt.world_size)
