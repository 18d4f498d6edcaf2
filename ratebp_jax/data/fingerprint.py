"""What a run trains on, as a small JSON-able dict: ``fingerprint(config)``.

A workdir records the fingerprint of its source data in ``config.json``, so that a rerun on
data that changed in place (an npz overwritten with other arrays) is refused instead of
silently training on it, while the same data may move (``data_dir`` and ``data_path`` are
rerun fields). Only source data is fingerprinted, never a cache the project writes itself
(the event-frame cache in ``data_dir``): a cache is derived from the source, and writing it
must not change the run's identity.

Content is hashed with SHA-256, streamed: at about a second per GB it keeps a rerun on a
large file cheap (docs/RESULTS.md, "Data fingerprints"). A tonic folder of thousands of
event files is described by a digest of their names and sizes instead: hashing them would
cost a rerun as much as reading the dataset.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import re

# The event-frame caches that events.load_cifar10_dvs writes into data_dir and
# events.load_dvsgesture into data_dir/DVSGesture.
_DERIVED = re.compile(r"^frames_T\d+_\d+(\.tmp)?\.npz$")


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    del size, mtime_ns, inode  # the cache key: a file changed in place is hashed again
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_fingerprint(path: str) -> dict:
    """A file's size and the SHA-256 of its bytes (not its name or place)."""
    st = os.stat(path)
    return {"bytes": st.st_size, "sha256": _sha256(os.path.abspath(path), st.st_size,
                                                   st.st_mtime_ns, st.st_ino)}


def listing_fingerprint(folder: str) -> dict:
    """The number, total size and a digest of the names and sizes of the files under
    ``folder`` (relative names, sorted), leaving out the project's own derived caches."""
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if _DERIVED.match(name):
                continue
            path = os.path.join(root, name)
            entries.append(f"{os.path.relpath(path, folder)}\t{os.path.getsize(path)}")
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return {"files": len(entries), "bytes": sum(int(e.rsplit("\t", 1)[1]) for e in entries),
            "names_and_sizes_sha256": digest}


def _digits(config) -> dict:
    del config
    return {"source": "scikit-learn load_digits, fixed split"}


def _npz(config) -> dict:
    return file_fingerprint(config.data_path) if os.path.isfile(config.data_path) else {}


def _event_npz_folder(config) -> dict:
    folder = config.data_path
    if not os.path.isdir(folder):
        return {}
    files = sorted(glob.glob(os.path.join(folder, "*.npz")))
    return {os.path.basename(f): file_fingerprint(f) for f in files}


def _tonic_dataset(name: str):
    """The source files of tonic dataset ``name``, in ``data_dir/name`` (tonic's place)."""
    def fingerprint(config) -> dict:
        folder = os.path.join(config.data_dir, name)
        return listing_fingerprint(folder) if config.data_dir and os.path.isdir(folder) else {}
    return fingerprint


def _tfds(name: str):
    def fingerprint(config) -> dict:
        import tensorflow_datasets as tfds

        try:
            info = tfds.builder(name, data_dir=config.data_dir or None).info
        except Exception:  # noqa: BLE001 - not prepared: the loader says so, clearly
            return {}
        return {"builder": name, "version": str(info.version),
                "splits": {s: info.splits[s].num_examples for s in sorted(info.splits)}}
    return fingerprint


FINGERPRINTS = {
    "digits": _digits,
    "npz": _npz,
    "cifar10": _tfds("cifar10"),
    "cifar100": _tfds("cifar100"),
    "imagenet": _tfds("imagenet2012"),
    "cifar10_dvs": _tonic_dataset("CIFAR10DVS"),
    "dvsgesture": _tonic_dataset("DVSGesture"),
    "shd": _tonic_dataset("SHD"),
    "events_npz": _event_npz_folder,
    "nmnist": _event_npz_folder,
}


def fingerprint(config) -> dict | None:
    """``config.dataset``'s source data as ``{"dataset": name, ...}``; None for a dataset
    registered without a fingerprint (a loader added to ``data.LOADERS`` at run time), which
    is then not compared. Missing data gives an empty description: the loader reports it."""
    describe = FINGERPRINTS.get(config.dataset)
    if describe is None:
        return None
    return {"dataset": config.dataset, **describe(config)}


def short(fp: dict | None) -> str:
    """A fingerprint on one line, hashes cut to 12 hex digits."""
    if fp is None:
        return "none"
    def fmt(value):
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
            return value[:12]
        return str(value)
    return fmt(fp)
