"""Index-based input pipeline: deterministic, resumable batches from random-access sources.

A source has ``len()`` and fancy indexing returning ``(images, labels)``. Epoch ``e``'s
order is drawn from ``(seed, e)`` and its step ``i``'s augmentation from ``(seed, e, i)``,
so batch ``s`` is a pure function of ``s`` (:func:`train_batch`): a resumed run sees the
batches an uninterrupted one would, whatever the number of workers or hosts.
"""
from __future__ import annotations

import dataclasses
import functools
import signal
from typing import Callable, Iterator

import grain
import numpy as np
from absl import flags
from grain._src.python.dataset.transformations import process_prefetch

from ratebp_jax import checks


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
    """A train/test pair of sources with their transforms. ``image_shape`` is one example's
    model input; ``time_steps`` the frames of an event dataset (``[T, B, ...]``), or None."""

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
        """Batches of ``epoch`` from step ``start_step`` on; with ``process_count > 1``
        this process's slice of each, augmented from a stream seeded by its index too."""
        steps = self.steps_per_epoch(batch_size)
        order = _epoch_order(len(self.train), seed, epoch)
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


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``, a permutation drawn from ``(seed, epoch)``; cached
    (read-only), as :func:`train_batch` asks for it every step and drawing it is O(n)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.setflags(write=False)
    return order


def _local(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous part of a global batch's indices."""
    per = len(indices) // process_count
    return indices[process_index * per:(process_index + 1) * per]


def train_batch(dataset: Dataset, step: int, *, batch_size: int, seed: int,
                process_index: int = 0, process_count: int = 1) -> dict:
    """The batch of global step ``step``, the first ``Dataset.train_batches`` yields from
    there (one definition of every batch); pure, so any process may compute any step."""
    epoch, i = divmod(step, dataset.steps_per_epoch(batch_size))
    return next(dataset.train_batches(epoch=epoch, batch_size=batch_size, seed=seed,
                                      start_step=i, process_index=process_index,
                                      process_count=process_count))


# Batches each worker holds ready: enough to hide one slow batch, few enough that W workers'
# ImageNet batches (about 3 W, with the ones in progress) fit in memory.
AHEAD = 2


class DataWorkerError(RuntimeError):
    """A data worker process died (killed, out of memory, or ``os._exit`` in a transform)."""


# grain 0.2.18's words for a dead worker; a test kills one, so a rewording is caught there.
_GRAIN_WORKER_DIED = "Worker process was terminated unexpectedly"


def train_iterator(dataset: Dataset, *, batch_size: int, seed: int, total_steps: int,
                   start_step: int = 0, process_index: int = 0, process_count: int = 1,
                   workers: int = 0) -> "TrainIterator":
    """The batches of global steps ``start_step .. total_steps - 1`` (:func:`train_batch`),
    built in this thread when asked for (``workers=0``) or ahead in that many grain worker
    processes. Close it (or use ``with``) to stop the workers."""
    for name, value, low in (("batch_size", batch_size, 1), ("total_steps", total_steps, 0),
                             ("start_step", start_step, 0), ("workers", workers, 0)):
        checks.check_int(name, value, low)
    if start_step > total_steps:
        raise ValueError(f"start_step={start_step}: must be <= total_steps ({total_steps})")
    if dataset.steps_per_epoch(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size}: must be <= the {len(dataset.train)} "
                         "training examples")
    batch_at = functools.partial(train_batch, dataset, batch_size=batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
    iterator = TrainIterator(batch_at, int(total_steps), int(workers))
    iterator.set_state({"step": int(start_step)})
    return iterator


class TrainIterator:
    """Training batches by global step (:func:`train_iterator`), around grain for two
    things it lacks: a state, ``{"step": next step}``, that holds for any number of workers
    (grain's describes its per-worker interleaving), and a :class:`DataWorkerError` that
    says what to do when a worker dies."""

    def __init__(self, batch_at: Callable[[int], dict], total_steps: int, workers: int):
        self._batch_at, self._total_steps, self._workers = batch_at, total_steps, workers
        self._step, self._batches = 0, None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict:
        if self._step >= self._total_steps:
            self.close()
            raise StopIteration
        if self._batches is None:
            self._batches = iter(_batches_from(self._batch_at, self._step, self._total_steps,
                                               self._workers))
        try:
            batch = next(self._batches)
        except Exception as e:
            self.close()  # a later next() starts again from the step that failed
            if isinstance(e, RuntimeError) and str(e).startswith(_GRAIN_WORKER_DIED):
                raise DataWorkerError(
                    f"a data worker process died while preparing the batches from step "
                    f"{self._step} on ({e}). Exit code -9 (SIGKILL) is often the "
                    "out-of-memory killer: use fewer workers or smaller batches. To see the "
                    "failing transform's own error, rerun with data_workers=0 (train_iterator("
                    "workers=0)), which prepares the batches in this process") from e
            raise
        self._step += 1
        return batch

    def get_state(self) -> dict:
        """``{"step": s}``: the next batch is step ``s``'s."""
        return {"step": self._step}

    def set_state(self, state: dict) -> None:
        """Continue from ``state["step"]`` (a ``get_state()`` of any such iterator)."""
        step = state["step"]
        checks.check_int("state step", step, 0, self._total_steps)
        self.close()
        self._step = int(step)

    def close(self) -> None:
        """Stop grain's worker processes, if any (a later ``next()`` starts them again)."""
        if self._batches is not None:
            batches, self._batches = self._batches, None
            batches.close()

    def __enter__(self) -> TrainIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batches_from(batch_at: Callable[[int], dict], start: int, stop: int,
                  workers: int) -> Iterator[dict]:
    """``batch_at(s)`` for ``s`` in ``[start, stop)``, in order: prepared in ``workers``
    grain processes (read round-robin), or a plain generator in this thread. Neither a
    prefetch thread nor grain's in-line iterator: JAX dispatches steps asynchronously, so
    the next batch is built while the device computes, and either would only add host work
    (docs/RESULTS.md, "The training loop against a bare loop")."""
    if workers == 0:
        return (batch_at(step) for step in range(start, stop))
    _prepare_grain_workers()
    in_line = grain.MapDataset.range(start, stop).map(batch_at).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    # A worker fills a queue of AHEAD - 1; grain's reader thread here holds one more.
    return in_line.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=AHEAD - 1),
        worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
    """In each worker, ignore Ctrl-C and SIGTERM, which reach the whole process group: the
    trainer answers them by checkpointing, which needs the workers alive, then stops them."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _prepare_grain_workers() -> None:
    """Work around two gaps of grain 0.2.18's workers: starting one reads an absl flag,
    which raises in a program that never parsed absl flags (marking them parsed gives their
    defaults), and one that exits with status 0 would hang the consumer
    (:func:`_worker_failed`)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    process_prefetch.ProcessPrefetchDatasetIterator._process_failed = _worker_failed


def _worker_failed(self) -> bool:
    """Whether the worker of grain's ``ProcessPrefetchDatasetIterator`` ``self`` died: grain
    counts only a non-zero exit, but a worker never exits on its own while it is read, so
    any exit with nothing left in its queue is a death."""
    process = self._prefetch_process
    if process is None or process.exitcode is None:
        return False
    return process.exitcode != 0 or self._buffer.empty()
