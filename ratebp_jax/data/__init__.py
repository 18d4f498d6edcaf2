"""Datasets by name: ``load_dataset(config) -> Dataset`` (see ``pipeline.Dataset``).

| name | loader | needs |
|---|---|---|
| digits | scikit-learn's bundled 8x8 digits (offline default) | nothing extra |
| npz | your own arrays in ``config.data_path`` | nothing extra |
| cifar10, cifar100 | ``tfds.data_source`` (array_record) | tensorflow-datasets, array-record (pinned); tensorflow-cpu once, to prepare |
| imagenet | as above, manual download | as above |
| cifar10_dvs | tonic's CIFAR10DVS -> T frames | tonic (pinned) |
| dvsgesture | tonic's DVSGesture (DVS128 Gesture) -> T frames | tonic (pinned) |
| shd | tonic's SHD (Spiking Heidelberg Digits) -> T bins of 700 channels | tonic, h5py (pinned) |
| events_npz | npz event files of any camera in ``config.data_path`` | nothing extra |
| nmnist | N-MNIST as events_npz files | nothing extra |
"""
from __future__ import annotations

from typing import Callable

from ratebp_jax import checks
from ratebp_jax.data import arrays, events, tfds_datasets
from ratebp_jax.data.pipeline import DataWorkerError, Dataset, TrainIterator, train_iterator

# tensorflow-datasets and tonic are imported inside their loaders, so the default path
# (digits) imports neither.
LOADERS: dict[str, Callable] = {
    "digits": arrays.load_digits,
    "npz": arrays.load_npz,
    "cifar10": tfds_datasets.load_cifar,
    "cifar100": tfds_datasets.load_cifar,
    "imagenet": tfds_datasets.load_imagenet,
    "cifar10_dvs": events.load_cifar10_dvs,
    "dvsgesture": events.load_dvsgesture,
    "shd": events.load_shd,
    "events_npz": events.load_events_npz,
    "nmnist": events.load_nmnist,
}


def load_dataset(config) -> Dataset:
    """Load ``config.dataset`` (one of LOADERS)."""
    checks.check_choice("dataset", config.dataset, LOADERS)
    return LOADERS[config.dataset](config)


__all__ = ["DataWorkerError", "Dataset", "LOADERS", "TrainIterator", "load_dataset",
           "train_iterator"]
