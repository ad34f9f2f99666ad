"""Real datasets from their standard files, verified and split; batch augmentation; loaders."""

from reslab.data.datasets import DATASETS, channel_stats, load_dataset, search_roots
from reslab.data.loaders import Augment, FolderBatchLoader, TensorBatchLoader
from reslab.data.types import DataBundle, DatasetInfo, TensorSplit, stratified_split

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
