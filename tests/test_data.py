"""Loaders on data the tests make: tfds mock data, synthetic events, npz files; configs."""
import importlib
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ratebp_jax import data, methods, models, train
from ratebp_jax.data import arrays, augment, events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from configs import default  # noqa: E402

CONFIGS = ["default", "cifar10_resnet18", "cifar100_resnet18", "cifar10_resnet19",
           "cifar10_vgg11", "cifar10dvs_vggsnn", "imagenet_sew_resnet34",
           "imagenet_preact_resnet34", "nmnist_vgg", "dvsgesture_vggsnn", "shd_mlp"]


def config_with(**fields):
    c = default.get_config()
    for k, v in fields.items():
        c[k] = v
    return c


def test_digits_split_is_fixed_and_standardised():
    ds = data.load_dataset(config_with())
    assert (len(ds.train), len(ds.test), ds.num_classes, ds.image_shape) == (1437, 360, 10,
                                                                             (8, 8, 1))
    batches = list(ds.train_batches(epoch=0, batch_size=64, seed=0))
    assert len(batches) == 1437 // 64
    x = np.concatenate([b["image"] for b in batches])
    assert x.dtype == np.float32 and abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1


def test_digits_are_scikit_learns_images_and_split():
    """The loader reads scikit-learn's digits file and its stored split without importing
    scikit-learn; both equal what scikit-learn's own load_digits and stratified
    train_test_split (random_state=0) give, array for array and in the same order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = arrays.digits_images_and_labels()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0,
                                   stratify=labels)
    order = np.load(arrays.DIGITS_SPLIT)
    np.testing.assert_array_equal(order[:arrays.DIGITS_TRAIN], train)
    np.testing.assert_array_equal(order[arrays.DIGITS_TRAIN:], test)
    ds = data.load_dataset(config_with())
    pixels = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
    for source, part in ((ds.train, train), (ds.test, test)):
        np.testing.assert_array_equal(source.images, pixels[part])
        np.testing.assert_array_equal(source.labels, digits.target[part])
        assert source.images.dtype == np.uint8 and source.labels.dtype == digits.target.dtype


def test_digits_fall_back_to_scikit_learns_loader_without_its_file(monkeypatch):
    """A scikit-learn that keeps its digits elsewhere is read through its own load_digits."""
    from sklearn.datasets import load_digits

    monkeypatch.setattr(arrays.importlib.util, "find_spec", lambda name: None)
    images, labels = arrays.digits_images_and_labels()
    digits = load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)


@pytest.mark.slow
def test_loading_digits_does_not_import_scikit_learn():
    """The point of reading the file: a fresh process loads the default dataset without
    importing scikit-learn (about 2 s)."""
    program = ("import sys; from ratebp_jax.data import arrays; arrays.load_digits(None); "
               "print(sorted(m for m in sys.modules if m.split('.')[0] in "
               "('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.strip() == "[]", out


def test_train_order_is_a_seeded_permutation_and_resumable():
    ds = data.load_dataset(config_with())
    full = list(ds.train_batches(epoch=3, batch_size=100, seed=7))
    resumed = list(ds.train_batches(epoch=3, batch_size=100, seed=7, start_step=5))
    np.testing.assert_array_equal(full[5]["image"], resumed[0]["image"])
    other = next(ds.train_batches(epoch=4, batch_size=100, seed=7))
    assert not np.array_equal(full[0]["label"], other["label"])


def test_eval_batches_cover_the_test_set_once_with_a_mask():
    ds = data.load_dataset(config_with())
    batches = list(ds.eval_batches(256))
    assert [len(b["label"]) for b in batches] == [256, 256]
    assert sum(b["mask"].sum() for b in batches) == 360


class RecordingSource:
    """An in-memory source that records which indices were read."""

    def __init__(self, n):
        self.images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
            (1, 2, 2, 1), np.uint8)
        self.labels, self.read = np.arange(n) % 10, []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        self.read.append(np.asarray(idx).copy())
        return self.images[idx], self.labels[idx]


def test_each_process_reads_only_its_slice_of_every_global_batch():
    from ratebp_jax.data.pipeline import Dataset
    as_float = lambda x, rng: x.astype(np.float32)  # noqa: E731
    whole = Dataset("rec", RecordingSource(50), RecordingSource(21), 10, (2, 2, 1),
                    as_float, as_float)
    full_train = list(whole.train_batches(epoch=1, batch_size=8, seed=3))
    full_eval = list(whole.eval_batches(8))
    parts = []
    for p in range(2):
        train_src, test_src = RecordingSource(50), RecordingSource(21)
        ds = Dataset("rec", train_src, test_src, 10, (2, 2, 1), as_float, as_float)
        parts.append((list(ds.train_batches(epoch=1, batch_size=8, seed=3, process_index=p,
                                            process_count=2)),
                      list(ds.eval_batches(8, process_index=p, process_count=2))))
        assert all(len(idx) == 4 for idx in train_src.read + test_src.read)
    for key in ("image", "label"):
        for step, batch in enumerate(full_train):  # the two halves make the global batch
            np.testing.assert_array_equal(
                np.concatenate([parts[0][0][step][key], parts[1][0][step][key]]), batch[key])
    for step, batch in enumerate(full_eval):
        for key in ("label", "mask"):
            np.testing.assert_array_equal(
                np.concatenate([parts[0][1][step][key], parts[1][1][step][key]]), batch[key])
    assert sum(b["mask"].sum() for b in full_eval) == 21


def _write_npz(path, n_train=40, n_test=10, shape=(6, 6, 3), classes=4, **overrides):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
              "y_train": rng.integers(0, classes, n_train),
              "x_test": rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
              "y_test": rng.integers(0, classes, n_test)}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return arrays


def test_npz_loader_reads_users_arrays(tmp_path):
    arrays = _write_npz(tmp_path / "mine.npz")
    ds = data.load_dataset(config_with(dataset="npz", data_path=str(tmp_path / "mine.npz")))
    assert ds.image_shape == (6, 6, 3) and len(ds.train) == 40
    images, labels = ds.test[np.arange(10)]
    np.testing.assert_array_equal(images, arrays["x_test"])


@pytest.mark.parametrize("override,message", [
    ({"x_train": np.zeros((40, 6, 6, 3), np.float32)}, "x_train must be uint8"),
    ({"y_test": np.full(10, -1)}, "y_test has labels in"),
    ({"x_test": np.zeros((10, 5, 5, 3), np.uint8)}, "x_train images are"),
])
def test_npz_loader_rejects_bad_arrays_by_name(tmp_path, override, message):
    _write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(ValueError, match=message):
        data.load_dataset(config_with(dataset="npz", data_path=str(tmp_path / "bad.npz")))


def test_npz_labels_beyond_num_classes_are_rejected(tmp_path):
    _write_npz(tmp_path / "d.npz", classes=4)
    with pytest.raises(ValueError, match=r"y_train has labels in \[0, 3\]; allowed is \[0, 2\)"):
        data.load_dataset(config_with(dataset="npz", data_path=str(tmp_path / "d.npz"),
                                      num_classes=2))


def test_cifar_loader_on_tfds_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(config_with(dataset="cifar10"))
    assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3) and len(ds.train) == 24
    batch = next(ds.train_batches(epoch=0, batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    again = next(ds.train_batches(epoch=0, batch_size=8, seed=0))
    np.testing.assert_array_equal(batch["image"], again["image"])  # augmentation is seeded


def test_imagenet_loader_on_tfds_mock_data():
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(config_with(dataset="imagenet", image_size=32))
        batch = next(ds.train_batches(epoch=0, batch_size=3, seed=0))
        test = next(ds.eval_batches(4))
    assert batch["image"].shape == (3, 32, 32, 3) and test["image"].shape == (4, 32, 32, 3)
    assert ds.num_classes == 1000


def test_missing_tfds_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds dataset 'cifar10'.*tfds build cifar10"):
        data.load_dataset(config_with(dataset="cifar10", data_dir=str(tmp_path)))


def test_cutout_zeroes_one_square_and_crop_keeps_pixels():
    rng = np.random.default_rng(0)
    images = np.full((50, 32, 32, 3), 200, np.uint8)
    cut = augment.cutout(16)(images, rng)
    zeros = (cut == 0).all(-1).sum(axis=(1, 2))
    assert zeros.max() == 256 and zeros.min() >= 64  # 16x16 inside, >= 8x8 at a corner
    cropped = augment.random_crop(4)(images, rng)
    assert cropped.shape == images.shape and set(np.unique(cropped)) <= {0, 200}


def _synthetic_events(n, sensor=(10, 12), seed=0):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        k = rng.integers(20, 60)
        samples.append((rng.integers(0, sensor[1], k), rng.integers(0, sensor[0], k),
                        np.sort(rng.integers(0, 10_000, k)), rng.integers(0, 2, k)))
    return samples


def test_events_to_frames_counts_every_event_in_its_time_bin():
    x, y, t, p = (np.array([0, 1, 2, 11]), np.array([0, 0, 5, 9]),
                  np.array([0, 10, 20, 40]), np.array([0, 1, 1, 1]))
    frames = events.events_to_frames(x, y, t, p, sensor_hw=(10, 12), T=2)
    assert frames.shape == (2, 10, 12, 2) and frames.sum() == 4
    assert frames[0, 0, 0, 0] == 1 and frames[0, 0, 1, 1] == 1  # t=0, t=10 in bin 0
    assert frames[1, 5, 2, 1] == 1 and frames[1, 9, 11, 1] == 1  # t=20 and the last event


def test_nmnist_loader_reads_concatenated_event_npz(tmp_path):
    for split, n in (("train", 12), ("test", 4)):
        samples = _synthetic_events(n, sensor=(34, 34), seed=len(split))
        offsets = np.cumsum([0] + [len(s[0]) for s in samples])
        np.savez(tmp_path / f"nmnist_{split}.npz",
                 x=np.concatenate([s[0] for s in samples]).astype(np.uint8),
                 y=np.concatenate([s[1] for s in samples]).astype(np.uint8),
                 t_us=np.concatenate([s[2] for s in samples]).astype(np.uint32),
                 p=np.concatenate([s[3] for s in samples]).astype(np.uint8),
                 offsets=offsets, label=np.arange(n, dtype=np.int16) % 10,
                 sensor_size=np.array([34, 34, 2]))
    ds = data.load_dataset(config_with(dataset="nmnist", data_path=str(tmp_path), T=5,
                                       image_size=34))
    assert ds.time_steps == 5 and ds.image_shape == (34, 34, 2)
    frames, labels = ds.train[np.arange(12)]
    assert frames.sum() == sum(len(s[0]) for s in _synthetic_events(12, (34, 34), seed=5))
    batch = next(ds.train_batches(epoch=0, batch_size=4, seed=0))
    assert batch["image"].shape == (5, 4, 34, 34, 2)  # time-major
    test = next(ds.eval_batches(3))
    assert test["image"].shape == (5, 3, 34, 34, 2)


def test_dvs_frames_split_and_augmentation():
    labels = np.repeat(np.arange(10), 10)
    train_idx, test_idx = events.split_per_class(labels)
    assert len(train_idx) == 90 and len(test_idx) == 10
    assert set(labels[test_idx]) == set(range(10))
    frames = np.random.default_rng(0).random((8, 3, 6, 6, 2)).astype(np.float32)
    out = events.flip_and_roll()(frames, np.random.default_rng(1))
    # Flips and circular shifts only move pixels: every sample keeps its values.
    np.testing.assert_allclose(np.sort(out.reshape(8, -1)), np.sort(frames.reshape(8, -1)))
    assert events.resize_frames(frames[0], 4).shape == (3, 4, 4, 2)


@pytest.mark.slow
def test_training_runs_on_event_frames(tmp_path):
    samples = _synthetic_events(20, sensor=(8, 8))
    frames = np.stack([events.events_to_frames(*s, sensor_hw=(8, 8), T=3) for s in samples])
    labels = np.arange(20) % 4
    ds = events.from_frames("synthetic", frames[:16], labels[:16], frames[16:], labels[16:],
                            num_classes=4)
    data.LOADERS["synthetic_events"] = lambda config: ds
    try:
        c = config_with(dataset="synthetic_events", model="vgg_tiny", T=3, batch_size=8,
                        eval_batch_size=4, num_train_steps=2, progress_bar=False, plots=False)
        summary = train.train_and_evaluate(c, str(tmp_path), log=lambda *_: None)
    finally:
        del data.LOADERS["synthetic_events"]
    assert summary["steps"] == 2 and 0 <= summary["final_test_accuracy"] <= 1


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_is_valid_and_builds_its_model(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert isinstance(config, ml_collections.ConfigDict) and config.name == name
    train.validate_config(config)
    in_channels = 2 if config.dataset in ("cifar10_dvs", "nmnist", "dvsgesture") else \
        (1 if config.dataset == "digits" else 3)
    num_classes = {"cifar100": 100, "imagenet": 1000, "dvsgesture": 11,
                   "shd": 20}.get(config.dataset, 10)
    size = config.image_size or {"digits": 8}.get(config.dataset, 32)
    shape = (700,) if config.dataset == "shd" else (size, size, in_channels)
    model = nnx.eval_shape(lambda: train.create_model(config, shape, num_classes))
    # The model takes the dataset's images and gives one logit per class (abstractly).
    net, params, stats = methods.split_model(model)
    images = jax.ShapeDtypeStruct((1, *shape), np.float32)
    logits, _ = jax.eval_shape(lambda p, s, x: methods.spike_inference(
        net, p, s, x, T=1, step_mode=config.step_mode), params, stats, images)
    assert logits.shape == (1, num_classes)
