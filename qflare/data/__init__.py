"""Datasets, checksummed downloads, federated partitioners and per-device label statistics."""

from __future__ import annotations

from qflare.data.download import KNOWN_FILES, MirrorFile, default_cache_dir, download_dataset, fetch
from qflare.data.partition import PARTITIONERS, dirichlet, iid, partition, quantity_skew, shards
from qflare.data.sources import DATASETS, SPLITS, ArrayDataset, load_dataset, parse_idx, read_idx
from qflare.data.stats import label_counts, label_table, save_heatmap, summary

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "SPLITS",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "MirrorFile",
    "KNOWN_FILES",
    "fetch",
    "download_dataset",
    "default_cache_dir",
    "PARTITIONERS",
    "partition",
    "iid",
    "dirichlet",
    "shards",
    "quantity_skew",
    "label_counts",
    "label_table",
    "save_heatmap",
    "summary",
]
