"""Event datasets on small files in their real formats, written here: event npz folders from
any camera, tonic's DVSGesture folder layout, and SHD's HDF5 files. Nothing is downloaded:
tonic's download is made to fail, and the files tonic checks for are in place."""
import os
import tarfile
import zipfile

import jax
import numpy as np
import pytest

from ratebp_jax import analysis, data, methods, models, train
from ratebp_jax.data import events, fingerprint
from conftest import grads_of_each
from test_data import config_with


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    import tonic

    def refuse(self):
        raise AssertionError(f"tonic tried to download {self.url}")
    monkeypatch.setattr(tonic.dataset.Dataset, "download", refuse)


def _events(rng, n, width, height, duration_us=10_000):
    k = rng.integers(20, 60, n)
    return [(rng.integers(0, width, m), rng.integers(0, height, m),
             np.sort(rng.integers(0, duration_us, m)), rng.integers(0, 2, m)) for m in k]


def write_event_npz(path, samples, labels, sensor):
    offsets = np.cumsum([0] + [len(s[0]) for s in samples])
    np.savez(path, x=np.concatenate([s[0] for s in samples]).astype(np.uint16),
             y=np.concatenate([s[1] for s in samples]).astype(np.uint16),
             t_us=np.concatenate([s[2] for s in samples]).astype(np.uint32),
             p=np.concatenate([s[3] for s in samples]).astype(np.uint8),
             offsets=offsets, label=np.asarray(labels, np.int16),
             sensor_size=np.array([*sensor, 2]))


def event_folder(folder, sensor, n_train=16, n_test=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        write_event_npz(os.path.join(folder, f"cam_{split}.npz"),
                        _events(rng, n, *sensor), np.arange(n) % classes, sensor)
    return str(folder)


# --------------------------------------------------------------------------- events_npz
def test_events_npz_trains_on_a_128x128_sensor(tmp_path):
    folder = event_folder(tmp_path / "events", (128, 128))
    config = config_with(dataset="events_npz", data_path=folder, model="mlp_tiny", T=2,
                         batch_size=8, eval_batch_size=4, num_train_steps=2,
                         progress_bar=False, plots=False)
    ds = data.load_dataset(config)
    # Classes from the labels, frames at the sensor's size, every event counted.
    assert (ds.num_classes, ds.image_shape, ds.time_steps) == (3, (128, 128, 2), 2)
    frames, _ = ds.test[np.arange(4)]
    with np.load(os.path.join(folder, "cam_test.npz")) as f:
        assert frames.sum() == f["offsets"][-1]
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *_: None)
    assert summary["steps"] == 2 and 0 <= summary["final_test_accuracy"] <= 1


def test_events_npz_frame_size_and_classes(tmp_path):
    folder = event_folder(tmp_path / "wide", (40, 30), classes=5)
    with pytest.raises(ValueError, match="the sensor is 40x30, not square; set image_size"):
        data.load_dataset(config_with(dataset="events_npz", data_path=folder))
    ds = data.load_dataset(config_with(dataset="events_npz", data_path=folder, T=3,
                                       image_size=12))
    assert ds.image_shape == (12, 12, 2) and ds.num_classes == 5
    assert data.load_dataset(config_with(dataset="events_npz", data_path=folder,
                                         image_size=12, num_classes=7)).num_classes == 7
    with pytest.raises(ValueError, match=r"labels in \[0, 4\]; allowed is \[0, 3\)"):
        data.load_dataset(config_with(dataset="events_npz", data_path=folder, image_size=12,
                                      num_classes=3))
    np.savez(os.path.join(folder, "cam_test.npz"), x=np.arange(3))
    with pytest.raises(ValueError, match="missing arrays y, p, t_us, offsets, label"):
        data.load_dataset(config_with(dataset="events_npz", data_path=folder, image_size=12))


def test_nmnist_is_an_event_npz_folder(tmp_path):
    folder = event_folder(tmp_path / "nmnist", (34, 34), classes=10, n_train=12)
    ds = data.load_dataset(config_with(dataset="nmnist", data_path=folder, T=4))
    assert (ds.name, ds.num_classes, ds.image_shape) == ("nmnist", 10, (34, 34, 2))
    assert fingerprint.fingerprint(config_with(dataset="events_npz", data_path=folder)) == {
        **fingerprint.fingerprint(config_with(dataset="nmnist", data_path=folder)),
        "dataset": "events_npz"}


# --------------------------------------------------------------------------- DVS128 Gesture
def dvsgesture_folder(root, per_split=100, seed=0):
    """tonic's DVSGesture layout: ``DVSGesture/ibmGesture{Train,Test}.tar.gz`` and the
    extracted ``ibmGesture{Train,Test}/user{NN}_{lighting}/{label}.npy`` files, each an
    ``[N, 4]`` array of x, y, p, t (ms). tonic needs the archive and >= 100 files per split.
    Folders are made in reverse order, so that file-system order is not sorted order."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "DVSGesture")
    for split, users in (("Train", range(1, 24)), ("Test", range(24, 30))):
        folder = os.path.join(base, f"ibmGesture{split}")
        made = 0
        for user in reversed(users):
            for lighting in ("led", "fluorescent", "natural"):
                if made >= per_split:
                    break
                sub = os.path.join(folder, f"user{user:02d}_{lighting}")
                os.makedirs(sub)
                for label in reversed(range(11)):
                    if made >= per_split:
                        break
                    x, y, t, p = _events(rng, 1, 128, 128, duration_us=6000)[0]
                    np.save(os.path.join(sub, f"{label}.npy"),
                            np.stack([x, y, p, t], 1).astype(np.int64))
                    made += 1
        with tarfile.open(os.path.join(base, f"ibmGesture{split}.tar.gz"), "w:gz") as tar:
            tar.add(folder, arcname=f"ibmGesture{split}")
    return str(root)


def test_dvsgesture_loader_reads_tonic_layout_in_sorted_order(tmp_path):
    import tonic

    root = dvsgesture_folder(tmp_path)
    config = config_with(dataset="dvsgesture", data_dir=root, T=3, image_size=16)
    before = fingerprint.fingerprint(config)
    ds = data.load_dataset(config)
    assert (ds.num_classes, ds.image_shape, ds.time_steps) == (11, (16, 16, 2), 3)
    assert len(ds.train) == len(ds.test) == 100
    # The samples in the order of their sorted paths, whatever order tonic lists them in.
    tonic_test = tonic.datasets.DVSGesture(save_to=root, train=False)
    order = np.argsort(tonic_test.data)
    assert list(order) != list(range(100))
    np.testing.assert_array_equal(ds.test.labels, np.asarray(tonic_test.targets)[order])
    first, label = tonic_test[order[0]]
    expected = events.resize_frames(events.events_to_frames(
        first["x"], first["y"], first["t"], first["p"], sensor_hw=(128, 128), T=3), 16)
    np.testing.assert_allclose(ds.test.images[0], expected, rtol=1e-6)
    # Cached in tonic's folder, read back the same, and left out of the fingerprint.
    cache = tmp_path / "DVSGesture" / "frames_T3_16.npz"
    assert cache.exists() and fingerprint.fingerprint(config) == before
    again = data.load_dataset(config)
    np.testing.assert_array_equal(again.train.images, ds.train.images)
    batch = next(ds.train_batches(epoch=0, batch_size=4, seed=0))
    assert batch["image"].shape == (3, 4, 16, 16, 2)


def test_dvsgesture_augmentation_never_flips():
    frames = np.zeros((64, 1, 6, 6, 2), np.float32)
    frames[:, :, 0, 0, 0] = 1.0  # one pixel; a roll moves it, a flip mirrors its column
    out = events.flip_and_roll(max_shift=0, flip=False)(frames, np.random.default_rng(0))
    np.testing.assert_array_equal(out, frames)
    flipped = events.flip_and_roll(max_shift=0)(frames, np.random.default_rng(0))
    assert flipped[:, 0, 0, 5, 0].sum() > 0


# --------------------------------------------------------------------------- SHD
def shd_folder(root, n_train=24, n_test=8, seed=0):
    """tonic's SHD layout: ``SHD/shd_{train,test}.h5`` (spikes/times in seconds and
    spikes/units as variable-length arrays, labels, extra/keys and extra/speaker) and the
    ``.h5.zip`` archives tonic checks for."""
    import h5py

    rng = np.random.default_rng(seed)
    base = os.path.join(root, "SHD")
    os.makedirs(base)
    for split, n in (("train", n_train), ("test", n_test)):
        path = os.path.join(base, f"shd_{split}.h5")
        with h5py.File(path, "w") as f:
            times = f.create_dataset("spikes/times", (n,), h5py.vlen_dtype(np.float16))
            units = f.create_dataset("spikes/units", (n,), h5py.vlen_dtype(np.uint16))
            for i in range(n):
                k = int(rng.integers(30, 80))
                times[i] = np.sort(rng.uniform(0.0, 1.3, k)).astype(np.float16)
                units[i] = rng.integers(0, 700, k).astype(np.uint16)
            f["labels"] = (np.arange(n) % 20).astype(np.uint16)
            f["extra/keys"] = np.array([f"digit-{i}".encode() for i in range(20)])
            f["extra/speaker"] = rng.integers(0, 12, n).astype(np.uint16)
        with zipfile.ZipFile(path + ".zip", "w") as z:
            z.write(path, os.path.basename(path))
    return str(root)


def test_shd_loader_reads_hdf5_into_time_bins(tmp_path):
    import h5py

    root = shd_folder(tmp_path)
    ds = data.load_dataset(config_with(dataset="shd", data_dir=root, T=7))
    assert (ds.num_classes, ds.image_shape, ds.time_steps) == (20, (700,), 7)
    assert len(ds.train) == 24 and len(ds.test) == 8
    with h5py.File(tmp_path / "SHD" / "shd_test.h5") as f:
        t, u = f["spikes/times"][3], f["spikes/units"][3]
        np.testing.assert_array_equal(ds.test.labels, f["labels"][:])
    counts = ds.test.images[3]
    assert counts.shape == (7, 700) and counts.sum() == len(t)
    k = int(np.argmin(t))  # the earliest spike is in bin 0 at its unit
    assert counts[int(float(t[k]) * 7 / 1.4), u[k]] >= 1
    batch = next(ds.train_batches(epoch=0, batch_size=4, seed=0))
    assert batch["image"].shape == (7, 4, 700) and batch["image"].dtype == np.float32
    evaluated = next(ds.eval_batches(8))
    assert evaluated["image"].shape == (7, 8, 700)


def test_spike_counts_bin_by_time_and_saturate():
    counts = events.spikes_to_counts(np.array([0.0, 0.69, 0.71, 1.39, 2.0]),
                                     np.array([1, 1, 2, 3, 3]), T=2, channels=4,
                                     duration_s=1.4)
    np.testing.assert_array_equal(counts, [[0, 2, 0, 0], [0, 0, 1, 2]])
    many = events.spikes_to_counts(np.zeros(300), np.zeros(300, int), T=1, channels=1,
                                   duration_s=1.0)
    assert many[0, 0] == 255


def test_training_runs_on_shd_with_the_mlp(tmp_path):
    root = shd_folder(tmp_path)
    config = config_with(dataset="shd", data_dir=root, model="mlp_tiny", T=4, batch_size=8,
                         eval_batch_size=8, num_train_steps=2, progress_bar=False,
                         plots=False)
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *_: None)
    assert summary["steps"] == 2 and 0 <= summary["final_test_accuracy"] <= 1


# --------------------------------------------------------------------------- feature vectors
@pytest.mark.parametrize("step_mode", ["multi", "single"])
@pytest.mark.parametrize("sequence", [False, True])
def test_feature_batches_every_method_equals_bptt_at_T1(step_mode, sequence):
    """[B, F] and [T, B, F] batches through every method, each of which is BPTT at T=1
    (the mlp stands for the image models' tiny variants of conftest.tiny_setup here)."""
    model = models.create_model("mlp_tiny", num_classes=5, in_channels=12, image_size=1)
    net, params, stats = methods.split_model(model)
    x = 2.0 * jax.random.normal(jax.random.key(0), (1, 6, 12) if sequence else (6, 12))
    batch = {"image": x, "label": jax.numpy.arange(6) % 5}
    names = ("bptt", "rate", "bptt_remat", "sltt", "ottt")
    (_, bptt), *others = grads_of_each(net, params, stats, batch,
                                       *[(m, {"T": 1, "step_mode": step_mode}) for m in names])
    assert analysis.global_norm(bptt["dense"]) > 1e-3
    for name, (_, grads) in zip(names[1:], others, strict=True):
        comparison = analysis.compare_gradients(grads, bptt)
        assert comparison["max_rel_err"] <= 1e-5, (name, comparison["per_param"])


def test_feature_batch_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[B, F\] or \[T, B, F\] feature vectors"):
        methods.check_images(jax.numpy.zeros((3,)), T=2)
    with pytest.raises(ValueError, match="time axis has 3 steps but T=2"):
        methods.check_images(jax.numpy.zeros((3, 4, 5)), T=2)
    assert methods.is_sequence(jax.numpy.zeros((2, 4, 5)))
    assert not methods.is_sequence(jax.numpy.zeros((4, 5)))


def test_feature_sequences_are_sharded_on_their_batch_axis():
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    _, shard = train.data_parallel(mesh)
    n = jax.device_count()
    out = shard({"image": np.zeros((3, 2 * n, 5), np.float32),
                 "label": np.zeros((2 * n,), np.int32)})
    assert out["image"].sharding.spec == jax.sharding.PartitionSpec(None, "data", None)
