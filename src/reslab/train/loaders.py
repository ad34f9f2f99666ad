"""The loaders a training run reads: in-memory tensors or an image folder, augmented for training only."""

from __future__ import annotations

from reslab.data import Augment, DataBundle, FolderBatchLoader, TensorBatchLoader
from reslab.data.folder import train_transform
from reslab.errors import ReslabError
from reslab.train import runtime
from reslab.train.config import TrainConfig


def build_loaders(bundle: DataBundle, cfg: TrainConfig, rt: runtime.Runtime):
    """(train, val, test) loaders of a bundle for this process: train augmented and sharded, val and test
    not augmented (None where the split is absent)."""
    info = bundle.info
    common = dict(
        device=rt.device, channels_last=rt.channels_last, seed=cfg.seed, rank=rt.rank, world_size=rt.world_size
    )
    if bundle.in_memory:
        augment = Augment(
            crop_padding=cfg.crop_padding,
            flip=cfg.flip,
            erase=cfg.random_erasing,
            sizes=tuple(cfg.progressive_sizes),
        )
        train = TensorBatchLoader(bundle.train, info, batch_size=cfg.batch_size, train=True, augment=augment, **common)

        def make_eval(split):
            return TensorBatchLoader(split, info, batch_size=cfg.eval_batch_size, train=False, **common)
    else:
        if cfg.progressive_sizes:
            raise ReslabError("progressive_sizes works on in-memory datasets; for an image folder set image_size")
        bundle.train.transform = train_transform(
            info.image_size[0],
            info.channels,
            info.mean,
            info.std,
            crop_padding=cfg.crop_padding,
            flip=cfg.flip,
            erase=cfg.random_erasing,
            resize=info.resize,
            interpolation=info.interpolation,
        )
        train = FolderBatchLoader(
            bundle.train, batch_size=cfg.batch_size, train=True, num_workers=cfg.num_workers, **common
        )

        def make_eval(split):
            return FolderBatchLoader(
                split, batch_size=cfg.eval_batch_size, train=False, num_workers=cfg.num_workers, **common
            )

    if len(train) == 0:
        raise ReslabError(f"the training split has fewer images than one batch ({cfg.batch_size} per process)")
    val = make_eval(bundle.val) if bundle.val is not None else None
    test = make_eval(bundle.test) if bundle.test is not None else None
    return train, val, test
