"""Datasets (a registry: :func:`register_dataset`), a device's own data files (:func:`load_local_data`), checksummed downloads, federated partitioners and per-device label statistics."""

from __future__ import annotations

from qflare.data.download import KNOWN_FILES, MirrorFile, default_cache_dir, download_dataset, fetch
from qflare.data.local import load_local_data
from qflare.data.partition import PARTITIONERS, dirichlet, iid, partition, quantity_skew, shards
from qflare.data.sources import (
    DATASETS,
    SPLITS,
    ArrayDataset,
    DatasetLoader,
    load_dataset,
    parse_idx,
    read_idx,
    register_dataset,
)
from qflare.data.stats import label_counts, label_table, save_heatmap, summary

__all__ = [
    "DATASETS",
    "KNOWN_FILES",
    "PARTITIONERS",
    "SPLITS",
    "ArrayDataset",
    "DatasetLoader",
    "MirrorFile",
    "default_cache_dir",
    "dirichlet",
    "download_dataset",
    "fetch",
    "iid",
    "label_counts",
    "label_table",
    "load_dataset",
    "load_local_data",
    "parse_idx",
    "partition",
    "quantity_skew",
    "read_idx",
    "register_dataset",
    "save_heatmap",
    "shards",
    "summary",
]
