"""Index-based input pipeline: deterministic, resumable batches from random-access sources.

A source is anything with ``len()`` and fancy indexing that returns ``(images, labels)``:
in-memory NumPy arrays (digits, npz, CIFAR) or a ``tfds.data_source`` (ImageNet). The
training order of epoch ``e`` is a permutation drawn from ``(seed, e)``, and the
augmentation of step ``s`` from ``(seed, s)``, so a resumed run sees exactly the batches an
uninterrupted run would. On several hosts each process reads only its own slice of every
global batch. Batches are prepared on a background thread so that the host overlaps the
next batch with the device's current step.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """In-memory examples: ``images`` ``[N, ...]`` (uint8 NHWC or float frames), ``labels``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return self.images[idx], self.labels[idx]


# transform(images uint8/float [B, ...], rng) -> float32 [B, ...] (or [T, B, ...] for events)
Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test pair of sources with their transforms.

    ``image_shape`` is one example's model input ``(H, W, C)``; ``time_steps`` is the
    number of frames of an event dataset (its batches are ``[T, B, H, W, C]``), else None.
    """

    name: str
    train: object
    test: object
    num_classes: int
    image_shape: tuple
    train_transform: Transform
    test_transform: Transform
    time_steps: int | None = None

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.train) // batch_size  # the last partial batch is dropped

    def train_batches(self, *, epoch: int, batch_size: int, seed: int, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
        """Batches of ``epoch`` from step ``start_step`` of that epoch on.

        With ``process_count > 1`` this process reads and augments only its own slice
        (``batch_size // process_count`` examples) of every global batch; its augmentation
        stream is seeded by its index as well.
        """
        steps = self.steps_per_epoch(batch_size)
        order = np.random.default_rng([seed, epoch]).permutation(len(self.train))
        for i in range(start_step, steps):
            idx = _local(np.sort(order[i * batch_size:(i + 1) * batch_size]),
                         process_index, process_count)
            images, labels = self.train[idx]
            key = [seed, epoch, i, 1] + ([process_index] if process_count > 1 else [])
            yield {"image": self.train_transform(images, np.random.default_rng(key)),
                   "label": np.asarray(labels, np.int32)}

    def eval_batches(self, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict]:
        """The whole test set; the last batch is padded (repeating an example), with
        ``mask`` 0 on the padding. Each process reads only its slice of every batch."""
        n = len(self.test)
        for start in range(0, n, batch_size):
            positions = _local(np.arange(start, start + batch_size), process_index,
                               process_count)
            images, labels = self.test[np.minimum(positions, n - 1)]
            yield {"image": self.test_transform(images, np.random.default_rng(0)),
                   "label": np.asarray(labels, np.int32),
                   "mask": (positions < n).astype(np.float32)}


def _local(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous part of a global batch's indices."""
    per = len(indices) // process_count
    return indices[process_index * per:(process_index + 1) * per]


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Run ``iterator`` on a background thread, ``size`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def worker():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
