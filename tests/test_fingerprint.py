"""The data fingerprint a workdir records: content, not place; source data, not caches."""
import os

import ml_collections
import numpy as np
import pytest

from ratebp_jax import workdir as wd
from ratebp_jax.data import fingerprint as fp

from test_train import tiny_config


def config(**fields):
    return ml_collections.ConfigDict({"dataset": "npz", "data_path": "", "data_dir": "",
                                      **fields})


def test_an_npz_fingerprint_follows_its_bytes_not_its_path(tmp_path):
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    np.savez(a, x=np.arange(100))
    np.savez(b, x=np.arange(100))
    first = fp.fingerprint(config(data_path=a))
    assert first == fp.fingerprint(config(data_path=b))
    assert first["bytes"] == os.path.getsize(a) and len(first["sha256"]) == 64
    np.savez(a, x=np.arange(100) + 1)  # same size, other bytes, changed in place
    assert fp.fingerprint(config(data_path=a))["sha256"] != first["sha256"]


def test_a_tonic_folder_is_described_by_its_source_files_not_the_frame_cache(tmp_path):
    folder = tmp_path / "CIFAR10DVS" / "airplane"
    folder.mkdir(parents=True)
    (folder / "0.aedat4").write_bytes(b"\x00" * 10)
    before = fp.fingerprint(config(dataset="cifar10_dvs", data_dir=str(tmp_path)))
    assert before["files"] == 1 and before["bytes"] == 10
    (tmp_path / "frames_T4_48.npz").write_bytes(b"cache")  # written by the loader itself
    assert fp.fingerprint(config(dataset="cifar10_dvs", data_dir=str(tmp_path))) == before
    (folder / "0.aedat4").write_bytes(b"\x00" * 11)
    assert fp.fingerprint(config(dataset="cifar10_dvs", data_dir=str(tmp_path))) != before
    (folder / "0.aedat4").write_bytes(b"\x00" * 10)
    (tmp_path / "DVSGesture").mkdir()  # another tonic dataset in the same data_dir
    (tmp_path / "DVSGesture" / "user01.aedat").write_bytes(b"\x01")
    assert fp.fingerprint(config(dataset="cifar10_dvs", data_dir=str(tmp_path))) == before


def test_digits_is_a_constant_and_an_unknown_loader_has_none():
    digits = fp.fingerprint(config(dataset="digits"))
    assert digits["dataset"] == "digits" and "load_digits" in digits["source"]
    # the package's own file: no path of the config changes it
    assert fp.fingerprint(config(dataset="digits", data_path="/elsewhere/d.npz",
                                 data_dir="/elsewhere")) == digits
    assert fp.fingerprint(config(dataset="registered_at_run_time")) is None


def test_nmnist_files_are_hashed_by_name(tmp_path):
    np.savez(tmp_path / "nmnist_train.npz", x=np.arange(3))
    np.savez(tmp_path / "nmnist_test.npz", x=np.arange(4))
    got = fp.fingerprint(config(dataset="nmnist", data_path=str(tmp_path)))
    assert sorted(got) == ["dataset", "nmnist_test.npz", "nmnist_train.npz"]


@pytest.mark.slow
def test_a_tfds_fingerprint_names_builder_version_and_splits_offline(tmp_path):
    got = fp.fingerprint(config(dataset="cifar10", data_dir=str(tmp_path)))
    assert got["builder"] == "cifar10" and got["version"].count(".") == 2
    assert isinstance(got["splits"], dict)


def test_a_rerun_on_other_data_is_refused_and_the_same_data_moved_is_not(tmp_path):
    data_path = str(tmp_path / "data.npz")
    np.savez(data_path, x=np.arange(10))
    run = tiny_config(dataset="npz", data_path=data_path)
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    wd.write_config(workdir, run, fp.fingerprint(run))
    moved = str(tmp_path / "moved.npz")
    os.replace(data_path, moved)
    wd.check_same_run(workdir, tiny_config(dataset="npz", data_path=moved))
    np.savez(moved, x=np.arange(10) * 2)
    with pytest.raises(wd.RunMismatch, match=r"the data: \{dataset: npz, bytes: \d+, sha256: "):
        wd.check_same_run(workdir, tiny_config(dataset="npz", data_path=moved))
