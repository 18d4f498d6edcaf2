"""Datasets by name: ``load_dataset(config) -> Dataset`` (see ``pipeline.Dataset``).

| name | loader | needs |
|---|---|---|
| digits | scikit-learn's bundled 8x8 digits (offline default) | nothing extra |
| npz | your own arrays in ``config.data_path`` | nothing extra |
| cifar10, cifar100 | tensorflow-datasets | ``pip install tensorflow-datasets tensorflow-cpu`` |
| imagenet | tensorflow-datasets (manual download) | as above |
| cifar10_dvs, nmnist | tonic event streams -> T frames | ``pip install tonic`` |
"""
from __future__ import annotations

from typing import Callable

from ratebp_jax.data import arrays
from ratebp_jax.data.pipeline import Dataset, prefetch

LOADERS: dict[str, Callable] = {
    "digits": arrays.load_digits,
    "npz": arrays.load_npz,
}


def load_dataset(config) -> Dataset:
    """Load ``config.dataset`` (one of LOADERS)."""
    if config.dataset not in LOADERS:
        raise ValueError(f"dataset={config.dataset!r}: allowed values are {', '.join(LOADERS)}")
    return LOADERS[config.dataset](config)


__all__ = ["Dataset", "LOADERS", "load_dataset", "prefetch"]
