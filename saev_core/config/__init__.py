"""Every job's configuration, as frozen dataclasses.

One definition each: the tyro CLI, the pipeline file (TOML) and the Dagster layer all build these classes.
Field docstrings become the CLI's ``--help``. Every name is used as ``saev_core.config.X``; the modules say where
each lives: ``fields`` (range checks), ``thresholds``, ``machine`` (device, memory, cache folder), ``record``
(image sources, recording), ``train`` (SAE, data, run), ``analysis`` (visuals, evaluate, explore, probes).
"""

from saev_core.config.analysis import (
    PROBE_CONTROLS,
    EvaluateConfig,
    ExploreConfig,
    ProbeConfig,
    ProbeDataConfig,
    VisualsConfig,
    VisualsDataConfig,
)
from saev_core.config.fields import ANY, AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_fields
from saev_core.config.machine import Device, available_memory, cache_dir, check_memory, resolve_device, size_text
from saev_core.config.record import (
    SEG_DATASETS,
    ActivationsConfig,
    DatasetConfig,
    EmbeddedDataset,
    EmbeddedSegDataset,
    ImageFolderDataset,
    SegFolderDataset,
)
from saev_core.config.thresholds import DENSE_FREQ, MIN_GAIN_VS_RANDOM
from saev_core.config.train import DataLoadConfig, SaeArch, SparseAutoencoderConfig, TrainConfig

__all__ = [
    "ANY",
    "AT_LEAST_0",
    "AT_LEAST_1",
    "DENSE_FREQ",
    "MIN_GAIN_VS_RANDOM",
    "POSITIVE",
    "PROBE_CONTROLS",
    "SEED",
    "SEG_DATASETS",
    "ActivationsConfig",
    "DataLoadConfig",
    "DatasetConfig",
    "Device",
    "EmbeddedDataset",
    "EmbeddedSegDataset",
    "EvaluateConfig",
    "ExploreConfig",
    "ImageFolderDataset",
    "ProbeConfig",
    "ProbeDataConfig",
    "SaeArch",
    "SegFolderDataset",
    "SparseAutoencoderConfig",
    "TrainConfig",
    "VisualsConfig",
    "VisualsDataConfig",
    "available_memory",
    "cache_dir",
    "check_fields",
    "check_memory",
    "resolve_device",
    "size_text",
]
