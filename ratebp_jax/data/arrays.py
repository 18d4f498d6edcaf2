"""Small in-memory datasets: scikit-learn's bundled digits (the offline default) and npz.

digits: 1,797 8x8 grey images of 0-9 shipped inside scikit-learn, so the default run needs
no download. The split is fixed: stratified 80/20 with ``random_state=0`` (1,437 train,
360 test). Pixel values 0..16 are scaled to uint8 0..255.

npz: a researcher's own arrays in one ``.npz`` file with ``x_train``, ``y_train``,
``x_test``, ``y_test``; images uint8 ``[N, H, W, C]``, labels integers in [0, K).
"""
from __future__ import annotations

import os

import numpy as np

from ratebp_jax.data import augment
from ratebp_jax.data.pipeline import ArraySource, Dataset

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _standardized(x_train_uint8):
    x = x_train_uint8.astype(np.float64) / 255.0
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)) + 1e-8


def from_arrays(name, x_train, y_train, x_test, y_test, *, num_classes=None,
                flip=False, crop_padding=0) -> Dataset:
    """A Dataset over uint8 NHWC arrays, standardised with the training set's statistics."""
    check_arrays(name, x_train, y_train, x_test, y_test, num_classes)
    num_classes = num_classes or int(max(y_train.max(), y_test.max())) + 1
    mean, std = _standardized(x_train)
    train_tf = augment.compose(
        *([augment.random_crop(crop_padding)] if crop_padding else []),
        *([augment.random_flip] if flip else []),
        augment.standardize(mean, std))
    return Dataset(name, ArraySource(x_train, y_train), ArraySource(x_test, y_test),
                   num_classes, tuple(x_train.shape[1:]), train_tf,
                   augment.standardize(mean, std))


def check_arrays(name, x_train, y_train, x_test, y_test, num_classes=None):
    """Shapes, dtypes and label range, each failure naming the array and what is allowed."""
    for key, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{name}: x_{key} must be uint8 [N, H, W, C], got "
                             f"{x.dtype} {list(x.shape)}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: y_{key} must be integer [N] with N={len(x)}, got "
                             f"{y.dtype} {list(y.shape)}")
        if len(y) == 0:
            raise ValueError(f"{name}: x_{key} is empty")
        if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
            raise ValueError(f"{name}: y_{key} has labels in [{y.min()}, {y.max()}]; allowed "
                             f"is [0, {num_classes if num_classes else 'K'})")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: x_train images are {list(x_train.shape[1:])} but x_test "
                         f"images are {list(x_test.shape[1:])}")


def load_digits(config) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    return from_arrays("digits", x_train, y_train, x_test, y_test, num_classes=10)


def load_npz(config) -> Dataset:
    path = config.data_path
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"data_path={path!r}: no such file; dataset 'npz' needs a .npz "
                                f"file with {', '.join(NPZ_KEYS)}")
    with np.load(path) as f:
        missing = [k for k in NPZ_KEYS if k not in f]
        if missing:
            raise ValueError(f"data_path={path!r}: missing arrays {', '.join(missing)}; "
                             f"needs {', '.join(NPZ_KEYS)}")
        arrays = [f[k] for k in NPZ_KEYS]
    return from_arrays("npz", *arrays, num_classes=config.get("num_classes") or None,
                       flip=config.get("augment_flip", False),
                       crop_padding=config.get("augment_crop_padding", 0))
