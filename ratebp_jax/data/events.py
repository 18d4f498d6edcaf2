"""Event datasets as T-step sequences: CIFAR10-DVS and DVS128 Gesture (via tonic), event
npz files from any camera (N-MNIST among them), and the Spiking Heidelberg Digits (tonic).

Camera events (x, y, t, p) of one sample are binned into T frames of equal duration, one
channel per polarity, counting events per pixel, then resized (bilinear, per frame) to the
model's input size. Batches are time-major ``[T, B, H, W, 2]``. Frames are converted once
and kept in memory as float32 counts (CIFAR10-DVS at T=10, 48x48: about 1.8 GB). SHD's
spikes of 700 channels are counted in T bins instead, batches ``[T, B, 700]``.

Splits are fixed and documented: CIFAR10-DVS has no official split, so we take, per class
and in the dataset's own order, the first 90% for training and the last 10% for testing
(9,000 / 1,000, the convention of TET and SLTT). N-MNIST, an event npz folder, DVS128
Gesture and SHD have their official train/test files.

Training augmentation follows the reference: a horizontal flip with probability 1/2 and a
circular shift (``np.roll``) of up to 5 pixels in each direction (DVS128 Gesture: the
shift only).
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


def flip_and_roll(max_shift: int = 5, *, flip: bool = True):
    """Reference DVS augmentation on ``[B, T, H, W, C]``: flip width with p=1/2 (unless
    ``flip=False``), then roll each sample circularly by (dy, dx) drawn from [-max_shift,
    max_shift]. The draws do not depend on ``flip``."""
    def apply(frames, rng):
        out = frames.copy()
        flipped = rng.random(len(out)) < 0.5
        if flip:
            out[flipped] = out[flipped][:, :, :, ::-1]
        shifts = rng.integers(-max_shift, max_shift + 1, (len(out), 2))
        for i, (dy, dx) in enumerate(shifts):
            out[i] = np.roll(out[i], (dy, dx), axis=(1, 2))
        return out
    return apply


def _time_major(frames_BxT, rng):
    del rng
    return np.ascontiguousarray(np.swapaxes(frames_BxT, 0, 1), dtype=np.float32)


def from_frames(name, x_train, y_train, x_test, y_test, *, num_classes, augment=True,
                flip=True):
    """A Dataset over ``[N, T, H, W, C]`` frames, batches time-major ``[T, B, H, W, C]``.
    ``augment``: training frames get :func:`flip_and_roll` (no flip with ``flip=False``)."""
    roll = flip_and_roll(flip=flip)
    train_tf = (lambda f, rng: _time_major(roll(f, rng), rng)) if augment else _time_major
    return Dataset(name, ArraySource(x_train, y_train), ArraySource(x_test, y_test),
                   num_classes, tuple(x_train.shape[2:]), train_tf, _time_major,
                   time_steps=x_train.shape[1])


def from_features(name, x_train, y_train, x_test, y_test, *, num_classes):
    """A Dataset over ``[N, T, F]`` feature sequences (any dtype), batches time-major
    float32 ``[T, B, F]``; ``image_shape`` is ``(F,)``."""
    return Dataset(name, ArraySource(x_train, y_train), ArraySource(x_test, y_test),
                   num_classes, tuple(x_train.shape[2:]), _time_major, _time_major,
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


# --------------------------------------------------------------------------- event npz files
EVENT_NPZ_KEYS = ("x", "y", "p", "t_us", "offsets", "label", "sensor_size")


def read_events_npz(path, *, T: int, size: int | None):
    """``(frames, labels)`` from an npz of concatenated events, any camera: keys
    :data:`EVENT_NPZ_KEYS`, sample i is ``offsets[i]:offsets[i+1]`` of x, y, p (0 or 1)
    and t_us, and ``sensor_size`` is (width, height, polarities). Frames are ``[N, T, S,
    S, 2]`` resized to ``size``, or at the sensor's own size with ``size=None`` (the
    sensor must then be square, as the models' inputs are)."""
    with np.load(path) as f:
        missing = [k for k in EVENT_NPZ_KEYS if k not in f]
        if missing:
            raise ValueError(f"{path!r}: missing arrays {', '.join(missing)}; an event npz "
                             f"needs {', '.join(EVENT_NPZ_KEYS)}")
        w, h = int(f["sensor_size"][0]), int(f["sensor_size"][1])
        if size is None and w != h:
            raise ValueError(f"{path!r}: the sensor is {w}x{h}, not square; set image_size "
                             f"to resize its frames to image_size x image_size")
        offsets, labels = f["offsets"], f["label"].astype(np.int64)
        if len(offsets) != len(labels) + 1:
            raise ValueError(f"{path!r}: {len(labels)} labels need {len(labels) + 1} "
                             f"offsets, found {len(offsets)}")
        x, y, t, p = f["x"], f["y"], f["t_us"], f["p"]
        frames = np.stack([
            resize_frames(events_to_frames(x[a:b], y[a:b], t[a:b], p[a:b], sensor_hw=(h, w),
                                           T=T), size or w)
            for a, b in zip(offsets[:-1], offsets[1:])])
    return frames, labels


def load_events_npz(config, name: str = "events_npz") -> Dataset:
    """Event files from ``config.data_path``: a folder with one ``*train*.npz`` and one
    ``*test*.npz`` (:func:`read_events_npz`), from any camera. The classes are the
    labels' (``num_classes`` 0: their largest plus one), the frame size the sensor's
    unless ``image_size`` is set. Training frames get the flip and roll of the reference
    DVS recipe (``augment``)."""
    folder = config.data_path
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data_path={folder!r}: no such directory; dataset {name!r} "
                                f"needs a folder with *train*.npz and *test*.npz event files")
    found = {}
    for split in ("train", "test"):
        files = sorted(glob.glob(os.path.join(folder, f"*{split}*.npz")))
        if len(files) != 1:
            raise FileNotFoundError(f"data_path={folder!r}: expected one *{split}*.npz, "
                                    f"found {len(files)}")
        found[split] = read_events_npz(files[0], T=config.T, size=config.image_size or None)
    (x_train, y_train), (x_test, y_test) = found["train"], found["test"]
    if x_train.shape[2:] != x_test.shape[2:]:
        raise ValueError(f"data_path={folder!r}: the train frames are {list(x_train.shape[2:])} "
                         f"but the test frames {list(x_test.shape[2:])}; set image_size")
    return from_frames(name, x_train, y_train, x_test, y_test,
                       num_classes=_num_classes(name, config, y_train, y_test),
                       augment=config.augment)


def load_nmnist(config) -> Dataset:
    """N-MNIST (a 34x34 sensor, 10 classes) in the event npz files of
    :func:`load_events_npz`."""
    return load_events_npz(config, name="nmnist")


def _num_classes(name, config, *labels) -> int:
    """``config.num_classes``, or with 0 the labels' largest plus one; labels must lie in
    [0, that)."""
    low = min(int(y.min()) for y in labels)
    high = max(int(y.max()) for y in labels)
    num_classes = config.num_classes or high + 1
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name}: labels in [{low}, {high}]; allowed is [0, {num_classes})")
    return num_classes


def _cached(path: str, build) -> dict:
    """The arrays of the npz at ``path``, or ``build()``'s (a dict of arrays), written there
    first (through a temporary file, so that an interrupted write leaves no cache)."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = build()
    tmp = path[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays


def _tonic_frames(samples, *, sensor_hw, T: int, size: int) -> np.ndarray:
    """``[N, T, size, size, 2]`` frames of tonic's ``(events, label)`` samples."""
    return np.stack([resize_frames(events_to_frames(
        events["x"], events["y"], events["t"], events["p"], sensor_hw=sensor_hw, T=T), size)
        for events, _ in samples])


def _check_folder(config, name: str, what: str) -> str:
    folder = config.data_dir
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data_dir={folder!r}: no such directory; dataset {name!r} "
                                f"needs {what} under it")
    return folder


# --------------------------------------------------------------------------- CIFAR10-DVS
def load_cifar10_dvs(config) -> Dataset:
    """CIFAR10-DVS through ``tonic.datasets.CIFAR10DVS(save_to=config.data_dir)``.

    Put the dataset there first (tonic downloads it when it can reach the network). The
    T-frame conversion is cached as ``frames_T{T}_{size}.npz`` in the same folder.
    """
    folder = _check_folder(config, "cifar10_dvs", "tonic's CIFAR10DVS")
    size = config.image_size or 48

    def convert():
        import tonic

        dataset = tonic.datasets.CIFAR10DVS(save_to=folder)
        w, h, _ = dataset.sensor_size
        return {"frames": _tonic_frames(dataset, sensor_hw=(h, w), T=config.T, size=size),
                "labels": np.asarray(dataset.targets, np.int64)}

    cached = _cached(os.path.join(folder, f"frames_T{config.T}_{size}.npz"), convert)
    frames, labels = cached["frames"], cached["labels"]
    train, test = split_per_class(labels)
    return from_frames("cifar10_dvs", frames[train], labels[train], frames[test],
                       labels[test], num_classes=10, augment=config.augment)


# --------------------------------------------------------------------------- DVS128 Gesture
def load_dvsgesture(config) -> Dataset:
    """DVS128 Gesture through ``tonic.datasets.DVSGesture(save_to=config.data_dir)``: 11
    classes, 128x128 sensor, the official split (users 1-23 train, 24-29 test: 1,077 and
    264 samples in tonic's cut of the recordings).

    Samples are sorted by their file path: tonic lists its folders in file-system order,
    which differs between machines, and an exact resume needs one order. Frames are binned
    and resized as for CIFAR10-DVS and cached as ``DVSGesture/frames_T{T}_{size}.npz``
    (default size 48). Training frames are shifted circularly but never flipped: a flip
    turns a right-hand gesture into a left-hand one, which is another class.
    """
    folder = _check_folder(config, "dvsgesture", "tonic's DVSGesture")
    size = config.image_size or 48

    def convert():
        import tonic

        arrays = {}
        for split in ("train", "test"):
            dataset = tonic.datasets.DVSGesture(save_to=folder, train=split == "train")
            order = sorted(range(len(dataset)), key=lambda i: dataset.data[i])
            w, h, _ = dataset.sensor_size
            arrays[f"{split}_frames"] = _tonic_frames(
                (dataset[i] for i in order), sensor_hw=(h, w), T=config.T, size=size)
            arrays[f"{split}_labels"] = np.asarray([dataset.targets[i] for i in order],
                                                   np.int64)
        return arrays

    os.makedirs(os.path.join(folder, "DVSGesture"), exist_ok=True)
    a = _cached(os.path.join(folder, "DVSGesture", f"frames_T{config.T}_{size}.npz"), convert)
    return from_frames("dvsgesture", a["train_frames"], a["train_labels"], a["test_frames"],
                       a["test_labels"], num_classes=11, augment=config.augment, flip=False)


# --------------------------------------------------------------------------- SHD
SHD_CHANNELS = 700
SHD_DURATION_S = 1.4  # every SHD sample ends before 1.4 s; a later spike joins the last bin


def spikes_to_counts(times_s, units, *, T: int, channels: int,
                     duration_s: float) -> np.ndarray:
    """One sample's spikes as ``[T, channels]`` uint8 counts in T bins of ``duration_s / T``
    seconds from 0 (a later spike counts in the last bin; a count saturates at 255)."""
    bins = np.minimum((np.asarray(times_s, np.float64) * (T / duration_s)).astype(np.int64),
                      T - 1)
    counts = np.bincount(bins * channels + np.asarray(units, np.int64),
                         minlength=T * channels)
    return np.minimum(counts, 255).astype(np.uint8).reshape(T, channels)


def load_shd(config) -> Dataset:
    """Spiking Heidelberg Digits through ``tonic.datasets.SHD(save_to=config.data_dir)``:
    700 input channels, 20 classes (the digits 0-9 in English and German), the official
    split (8,156 train, 2,264 test samples, in the files' order).

    A sample's spikes are counted in T bins of ``1.4 s / T`` (:func:`spikes_to_counts`),
    giving feature sequences: batches are ``[T, B, 700]`` float32, unaugmented. The counts
    are kept in memory as uint8 (T=100: 0.6 GB for the training set).
    """
    folder = _check_folder(config, "shd", "tonic's SHD")
    import h5py
    import tonic

    found = {}
    for split in ("train", "test"):
        dataset = tonic.datasets.SHD(save_to=folder, train=split == "train")
        with h5py.File(os.path.join(dataset.location_on_system, dataset.data_filename),
                       "r") as f:
            times, units = f["spikes/times"][:], f["spikes/units"][:]
            labels = f["labels"][:].astype(np.int64)
        counts = np.stack([spikes_to_counts(t, u, T=config.T, channels=SHD_CHANNELS,
                                            duration_s=SHD_DURATION_S)
                           for t, u in zip(times, units)])
        found[split] = counts, labels
    return from_features("shd", *found["train"], *found["test"], num_classes=20)
