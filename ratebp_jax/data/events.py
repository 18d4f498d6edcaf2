"""Event-camera datasets as T-frame sequences: CIFAR10-DVS (via tonic) and N-MNIST (npz).

Events (x, y, t, p) of one sample are binned into T frames of equal duration, one channel
per polarity, counting events per pixel, then resized (bilinear, per frame) to the model's
input size. Batches are time-major ``[T, B, H, W, 2]``. Frames are converted once and kept
in memory as float32 counts (CIFAR10-DVS at T=10, 48x48: about 1.8 GB).

Splits are fixed and documented: CIFAR10-DVS has no official split, so we take, per class
and in the dataset's own order, the first 90% for training and the last 10% for testing
(9,000 / 1,000, the convention of TET and SLTT). N-MNIST has its official train/test files.

Training augmentation follows the reference: a horizontal flip with probability 1/2 and a
circular shift (``np.roll``) of up to 5 pixels in each direction.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from ratebp_jax.data.pipeline import ArraySource, Dataset


def events_to_frames(x, y, t, p, *, sensor_hw, T: int) -> np.ndarray:
    """Bin one sample's events into ``[T, H, W, 2]`` float32 counts, T equal time bins.

    Hand-written rather than ``tonic.transforms.ToFrame(n_time_bins=T)``, which drops the
    events at the final timestamp; here every event is counted (the last bin is closed).
    """
    h, w = sensor_hw
    frames = np.zeros((T, h, w, 2), np.float32)
    if len(t) == 0:
        return frames
    t = np.asarray(t, np.float64)
    span = t.max() - t.min()
    bins = np.zeros(len(t), np.int64) if span == 0 else \
        np.minimum(((t - t.min()) * T / span).astype(np.int64), T - 1)
    np.add.at(frames, (bins, np.asarray(y, np.int64), np.asarray(x, np.int64),
                       np.asarray(p, np.int64)), 1.0)
    return frames


def resize_frames(frames_THWC, size: int) -> np.ndarray:
    """Bilinear resize of every frame to ``size`` x ``size`` (PIL, float mode)."""
    from PIL import Image

    if frames_THWC.shape[1:3] == (size, size):
        return frames_THWC
    T, _, _, C = frames_THWC.shape
    out = np.empty((T, size, size, C), np.float32)
    for i in range(T):
        for c in range(C):
            img = Image.fromarray(frames_THWC[i, :, :, c], mode="F")
            out[i, :, :, c] = np.asarray(img.resize((size, size), Image.BILINEAR))
    return out


def flip_and_roll(max_shift: int = 5):
    """Reference DVS augmentation on ``[B, T, H, W, C]``: flip width with p=1/2, then roll
    each sample circularly by (dy, dx) drawn from [-max_shift, max_shift]."""
    def apply(frames, rng):
        out = frames.copy()
        flip = rng.random(len(out)) < 0.5
        out[flip] = out[flip][:, :, :, ::-1]
        shifts = rng.integers(-max_shift, max_shift + 1, (len(out), 2))
        for i, (dy, dx) in enumerate(shifts):
            out[i] = np.roll(out[i], (dy, dx), axis=(1, 2))
        return out
    return apply


def _time_major(frames_BxT, rng):
    del rng
    return np.ascontiguousarray(np.swapaxes(frames_BxT, 0, 1), dtype=np.float32)


def from_frames(name, x_train, y_train, x_test, y_test, *, num_classes, augment=True):
    """A Dataset over ``[N, T, H, W, C]`` frames, batches time-major ``[T, B, H, W, C]``."""
    roll = flip_and_roll()
    train_tf = (lambda f, rng: _time_major(roll(f, rng), rng)) if augment else _time_major
    return Dataset(name, ArraySource(x_train, y_train), ArraySource(x_test, y_test),
                   num_classes, tuple(x_train.shape[2:]), train_tf, _time_major,
                   time_steps=x_train.shape[1])


def split_per_class(labels, train_fraction=0.9):
    """Indices of the fixed split: per class, the first ``train_fraction`` in order."""
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = int(round(len(idx) * train_fraction))
        train.append(idx[:n])
        test.append(idx[n:])
    return np.concatenate(train), np.concatenate(test)


# --------------------------------------------------------------------------- N-MNIST
def read_nmnist_npz(path, *, T: int, size: int):
    """Frames ``[N, T, size, size, 2]`` and labels from an npz of concatenated events
    (keys x, y, p, t_us, offsets, label, sensor_size; sample i is offsets[i]:offsets[i+1])."""
    with np.load(path) as f:
        w, h = int(f["sensor_size"][0]), int(f["sensor_size"][1])
        offsets = f["offsets"]
        frames = np.stack([
            resize_frames(events_to_frames(
                f["x"][a:b], f["y"][a:b], f["t_us"][a:b], f["p"][a:b], sensor_hw=(h, w), T=T),
                size)
            for a, b in zip(offsets[:-1], offsets[1:])])
        return frames, f["label"].astype(np.int64)


def load_nmnist(config) -> Dataset:
    """N-MNIST from ``config.data_path``: a folder with ``*train*.npz`` and ``*test*.npz``."""
    folder = config.data_path
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data_path={folder!r}: no such directory; dataset 'nmnist' "
                                f"needs a folder with *train*.npz and *test*.npz event files")
    found = {}
    for split in ("train", "test"):
        files = sorted(glob.glob(os.path.join(folder, f"*{split}*.npz")))
        if len(files) != 1:
            raise FileNotFoundError(f"data_path={folder!r}: expected one *{split}*.npz, "
                                    f"found {len(files)}")
        found[split] = read_nmnist_npz(files[0], T=config.T, size=config.image_size or 34)
    return from_frames("nmnist", *found["train"], *found["test"], num_classes=10,
                       augment=config.augment)


# --------------------------------------------------------------------------- CIFAR10-DVS
def load_cifar10_dvs(config) -> Dataset:
    """CIFAR10-DVS through ``tonic.datasets.CIFAR10DVS(save_to=config.data_dir)``.

    Put the dataset there first (tonic downloads it when it can reach the network). The
    T-frame conversion is cached as ``frames_T{T}_{size}.npz`` in the same folder.
    """
    folder = config.data_dir
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data_dir={folder!r}: no such directory; dataset "
                                f"'cifar10_dvs' needs tonic's CIFAR10DVS under it")
    size = config.image_size or 48
    cache = os.path.join(folder, f"frames_T{config.T}_{size}.npz")
    if os.path.exists(cache):
        with np.load(cache) as f:
            frames, labels = f["frames"], f["labels"]
    else:
        import tonic

        dataset = tonic.datasets.CIFAR10DVS(save_to=folder)
        w, h, _ = dataset.sensor_size
        frames, labels = [], []
        for events, label in dataset:
            frames.append(resize_frames(events_to_frames(
                events["x"], events["y"], events["t"], events["p"], sensor_hw=(h, w),
                T=config.T), size))
            labels.append(label)
        frames, labels = np.stack(frames), np.asarray(labels, np.int64)
        tmp = cache + ".tmp.npz"
        np.savez(tmp, frames=frames, labels=labels)
        os.replace(tmp, cache)
    train, test = split_per_class(labels)
    return from_frames("cifar10_dvs", frames[train], labels[train], frames[test],
                       labels[test], num_classes=10, augment=config.augment)
