"""Data: synthetic cohorts, NIfTI ingest and preprocessing, WebDataset shards, streaming loader.

See ``preprocess`` (one preprocessing function for sharding, finetuning and prediction),
``ingest`` (input discovery), ``shardformat`` (the shard format: names, ``meta.json`` schema, tar
writer and reader, manifest), ``shards`` (preprocess subjects into shards), ``loader`` (streaming,
resumable), ``epochs`` (its epoch / resume arithmetic) and ``phantoms`` (synthetic MRI).
"""

from ssl_pretrain.data.ingest import Subject, discover
from ssl_pretrain.data.loader import (
    LoaderConfig,
    PretrainLoader,
    build_pretrain_loader,
)
from ssl_pretrain.data.phantoms import make_cohort, save_montage
from ssl_pretrain.data.preprocess import (
    InputError,
    PreprocessParams,
    Volume,
    load_nifti,
    preprocess,
    to_original_grid,
)
from ssl_pretrain.data.shardformat import CorruptShardError, read_manifest
from ssl_pretrain.data.shards import write_shards

__all__ = [
    "CorruptShardError",
    "InputError",
    "LoaderConfig",
    "PreprocessParams",
    "PretrainLoader",
    "Subject",
    "Volume",
    "build_pretrain_loader",
    "discover",
    "load_nifti",
    "make_cohort",
    "preprocess",
    "read_manifest",
    "save_montage",
    "to_original_grid",
    "write_shards",
]
