"""Real datasets from their standard files, verified and split; batch augmentation; loaders."""

from reslab.data.datasets import (
    DATASETS,
    DataBundle,
    DatasetInfo,
    TensorSplit,
    channel_stats,
    load_dataset,
    search_roots,
    stratified_split,
)
from reslab.data.loaders import Augment, FolderBatchLoader, TensorBatchLoader

__all__ = [
    "DATASETS",
    "Augment",
    "DataBundle",
    "DatasetInfo",
    "FolderBatchLoader",
    "TensorBatchLoader",
    "TensorSplit",
    "channel_stats",
    "load_dataset",
    "search_roots",
    "stratified_split",
]
