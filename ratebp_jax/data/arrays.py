"""Small in-memory datasets: scikit-learn's bundled digits (the offline default) and npz.

digits: 1,797 8x8 grey images of 0-9 shipped inside scikit-learn, so the default run needs
no download. The split is fixed: scikit-learn's stratified 80/20 ``train_test_split`` with
``random_state=0`` (1,437 train, 360 test), stored as its index order in
``digits_split.npy``. Pixel values 0..16 are scaled to uint8 0..255.

npz: a researcher's own arrays in one ``.npz`` file with ``x_train``, ``y_train``,
``x_test``, ``y_test``; images uint8 ``[N, H, W, C]``, labels integers in [0, K). With
``augment`` on, training images get ``augment_flip`` and ``augment_crop_padding``.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import zipfile

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
        if x.shape[1] in (1, 2, 3, 4) and x.shape[3] > 4:
            raise ValueError(f"{name}: x_{key} has shape {list(x.shape)}, which looks "
                             f"channels-first [N, C, H, W]; images must be channels-last "
                             f"[N, H, W, C] (np.transpose(x, (0, 2, 3, 1)))")
    low = int(min(y_train.min(), y_test.min()))
    if low > 0 and num_classes is None:
        raise ValueError(f"{name}: labels start at {low}, not 0, which would train "
                         f"{low} class(es) that never occur; labels must be 0..K-1 "
                         f"(subtract {low}, or set num_classes if that is intended)")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: x_train images are {list(x_train.shape[1:])} but x_test "
                         f"images are {list(x_test.shape[1:])}")


# scikit-learn's split of the digits, train_test_split(range(1797), test_size=0.2,
# random_state=0, stratify=target): the 1,437 training indices in its order, then the 360
# test indices. Stored, so that loading the default dataset does not import scikit-learn
# (about 2 s, most of it scipy.stats), which every training process and notebook paid;
# tests/test_data.py checks it against scikit-learn's own split.
DIGITS_SPLIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_split.npy")
DIGITS_TRAIN = 1437


def digits_images_and_labels():
    """scikit-learn's bundled digits, ``images`` float ``[1797, 8, 8]`` (0..16) and integer
    ``labels``, read from the file its ``load_digits`` reads (gzip CSV, 64 pixels then the
    label per row) without importing scikit-learn; through ``load_digits`` itself if that
    file is not where this scikit-learn keeps it."""
    spec = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                        "digits.csv.gz") if spec and spec.submodule_search_locations else ""
    if not os.path.isfile(path):
        from sklearn.datasets import load_digits as sk_digits
        digits = sk_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits(config) -> Dataset:
    images, labels = digits_images_and_labels()
    images = np.clip(images * 16, 0, 255).astype(np.uint8)[..., None]
    order = np.load(DIGITS_SPLIT).astype(np.intp)
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return from_arrays("digits", images[train], labels[train], images[test], labels[test],
                       num_classes=10)


def load_npz(config) -> Dataset:
    path = config.data_path
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"data_path={path!r}: no such file; dataset 'npz' needs a .npz "
                                f"file with {', '.join(NPZ_KEYS)}")
    if not zipfile.is_zipfile(path):  # np.load would guess a pickle and say so, misleadingly
        raise ValueError(f"data_path={path!r}: not an .npz archive (not a zip file, or "
                         f"truncated); write it with np.savez({', '.join(NPZ_KEYS)})")
    try:
        return _load_npz(path, config)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"data_path={path!r}: unreadable .npz ({type(e).__name__}: {e}); "
                         f"is it truncated?") from None


def _load_npz(path, config) -> Dataset:
    with np.load(path) as f:
        missing = [k for k in NPZ_KEYS if k not in f]
        if missing:
            raise ValueError(f"data_path={path!r}: missing arrays {', '.join(missing)}; "
                             f"needs {', '.join(NPZ_KEYS)}")
        arrays = [f[k] for k in NPZ_KEYS]
    return from_arrays("npz", *arrays, num_classes=config.num_classes or None,
                       flip=config.augment and config.augment_flip,
                       crop_padding=config.augment_crop_padding if config.augment else 0)
