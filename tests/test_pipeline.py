"""train_iterator (grain): the batches ``Dataset.train_batches`` defines, for any number of
worker processes, from any step, with a checkpointable state, per process; and a worker
that dies is a clear error, never a hang.

The datasets are tiny (200 random 8x8x3 images, real crop/flip/Cutout augmentations) so that
the cost is the workers' start (a few seconds each): tests with workers use few of them.
"""
import functools
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ratebp_jax.data import augment, pipeline

BATCH, SEED = 32, 3
STEPS_PER_EPOCH = 200 // BATCH  # 6: 8 examples are dropped each epoch
TRANSFORM = augment.compose(augment.random_crop(2), augment.random_flip, augment.cutout(4),
                            augment.standardize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)))


def tiny_dataset(transform=TRANSFORM):
    rng = np.random.default_rng(0)
    source = pipeline.ArraySource(rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8),
                                  rng.integers(0, 10, 200))
    return pipeline.Dataset("tiny", source, source, 10, (8, 8, 3), transform,
                            augment.standardize(0.5, 0.25))


def old_definition(ds, start, stop, **kwargs):
    """Steps ``start .. stop - 1`` straight from ``train_batches``, epoch by epoch."""
    out = []
    for epoch in range(start // STEPS_PER_EPOCH, (stop - 1) // STEPS_PER_EPOCH + 1):
        out += list(ds.train_batches(epoch=epoch, batch_size=BATCH, seed=SEED, **kwargs))
    first = start // STEPS_PER_EPOCH * STEPS_PER_EPOCH
    return out[start - first:stop - first]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == set(b) == {"image", "label"}
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            np.testing.assert_array_equal(a[key], b[key])


def grain_workers():
    """The live worker processes of grain's iterators (grain names them so)."""
    return [p for p in multiprocessing.active_children()
            if p.name.startswith("grain-process-prefetch")]


def test_without_workers_it_is_train_batches_across_epochs():
    ds = tiny_dataset()
    total = 2 * STEPS_PER_EPOCH + 2
    with pipeline.train_iterator(ds, batch_size=BATCH, seed=SEED, total_steps=total) as it:
        got = list(it)
    assert_same(got, old_definition(ds, 0, total))
    assert got[0]["image"].dtype == np.float32 and got[0]["label"].dtype == np.int32
    assert it.get_state() == {"step": total}
    # ... which still draws what it drew before it cached each epoch's order
    for step, batch in enumerate(got):
        epoch, i = divmod(step, STEPS_PER_EPOCH)
        order = np.random.default_rng([SEED, epoch]).permutation(200)
        idx = np.sort(order[i * BATCH:(i + 1) * BATCH])
        np.testing.assert_array_equal(batch["label"], ds.train.labels[idx])
        np.testing.assert_array_equal(
            batch["image"], TRANSFORM(ds.train.images[idx],
                                      np.random.default_rng([SEED, epoch, i, 1])))


def test_start_step_and_set_state_resume_exactly():
    ds = tiny_dataset()
    run = functools.partial(pipeline.train_iterator, ds, batch_size=BATCH, seed=SEED,
                            total_steps=10)
    with run() as it:
        full = list(it)
    with run(start_step=7) as it:
        assert it.get_state() == {"step": 7}
        assert_same(list(it), full[7:])
    with run() as it:
        assert_same(take(it, 3), full[:3])
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        assert state == {"step": 3}
        assert_same(take(it, 2), full[3:5])
        it.set_state(state)  # rewind the same iterator
        assert_same(list(it), full[3:])
    with run() as it:
        it.set_state(state)  # a fresh one
        assert_same(list(it), full[3:])
        with pytest.raises(ValueError, match="step=11"):
            it.set_state({"step": 11})


def test_two_workers_give_the_same_batches_and_state_across_an_epoch_boundary():
    ds = tiny_dataset()
    run = functools.partial(pipeline.train_iterator, ds, batch_size=BATCH, seed=SEED,
                            start_step=STEPS_PER_EPOCH - 2, total_steps=STEPS_PER_EPOCH + 3)
    with run() as it:
        expected = list(it)
    with run(workers=2) as it:
        got = take(it, 2)
        state = it.get_state()
        got += list(it)
    assert_same(got, expected)
    assert state == {"step": STEPS_PER_EPOCH}
    with run() as it:  # a state from 2 workers restores without any
        it.set_state(state)
        assert_same(list(it), expected[2:])
    assert not grain_workers()


@pytest.mark.slow
def test_workers_read_only_their_process_slice():
    ds = tiny_dataset()
    run = functools.partial(pipeline.train_iterator, ds, batch_size=BATCH, seed=SEED,
                            total_steps=STEPS_PER_EPOCH + 2, process_count=2)
    with run(process_index=1, workers=2) as it:
        second = list(it)
    assert_same(second, old_definition(ds, 0, STEPS_PER_EPOCH + 2, process_index=1,
                                       process_count=2))
    with run(process_index=0) as it:
        first = list(it)
    assert [len(b["label"]) for b in first + second] == [BATCH // 2] * 2 * len(first)
    with pipeline.train_iterator(ds, batch_size=BATCH, seed=SEED,
                                 total_steps=STEPS_PER_EPOCH + 2) as it:
        whole = list(it)
    for a, b, w in zip(first, second, whole):
        np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), w["label"])


@pytest.mark.slow
def test_workers_keep_working_through_ctrl_c_and_sigterm():
    """The trainer answers Ctrl-C (sent to the whole process group) and SIGTERM by
    checkpointing after its step, which needs the next batches."""
    ds = tiny_dataset()
    run = functools.partial(pipeline.train_iterator, ds, batch_size=BATCH, seed=SEED,
                            total_steps=6)
    with run() as it:
        expected = list(it)
    with run(workers=2) as it:
        got = take(it, 2)  # one from each worker: both have set up their signals
        workers = grain_workers()
        assert len(workers) == 2
        for p in workers:
            os.kill(p.pid, signal.SIGINT)
            os.kill(p.pid, signal.SIGTERM)
        got += list(it)
    assert_same(got, expected)
    assert all(p.exitcode is not None for p in workers)


def _exit_worker(how, images, rng):
    """A transform whose worker dies (run it in worker processes only)."""
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)  # status 0: grain alone would wait for this worker forever


# Run in a child process (its own session), which the test can kill with its workers: an
# alarm in this process could not end a hang in grain's cleanup, which joins threads.
DYING_WORKER = """
import functools, json, sys, time
sys.path.insert(0, sys.argv[1])
import test_pipeline as t
it = t.pipeline.train_iterator(t.tiny_dataset(functools.partial(t._exit_worker, sys.argv[2])),
                               batch_size=t.BATCH, seed=t.SEED, total_steps=4, start_step=1,
                               workers=2)
try:
    next(it)
    error = None
except t.pipeline.DataWorkerError as e:
    error = str(e)
print(json.dumps({"error": error, "state": it.get_state(), "workers": len(t.grain_workers())}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "os._exit(0)"])
def test_a_dying_worker_is_a_clear_error_not_a_hang(how):
    child = subprocess.Popen([sys.executable, "-c", DYING_WORKER, os.path.dirname(__file__),
                              how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail("hang: no error within 90 s of a data worker's death")
    assert child.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    message = result["error"]
    assert message and "data worker process died" in message and "from step 1" in message
    assert "data_workers=0" in message
    assert ("with exit code -9." if how == "SIGKILL" else "with exit code 0.") in message
    assert result["state"] == {"step": 1}
    assert result["workers"] == 0  # no worker is left running


def test_errors_of_a_transform_in_process_are_its_own():
    def broken(images, rng):
        raise ArithmeticError("bad augmentation")
    it = pipeline.train_iterator(tiny_dataset(broken), batch_size=BATCH, seed=SEED,
                                 total_steps=2)
    with pytest.raises(ArithmeticError, match="bad augmentation"):
        next(it)


@pytest.mark.parametrize("field, value, fragment", [
    ("workers", -1, "workers=-1: must be an integer >= 0"),
    ("batch_size", 201, "batch_size=201: must be <= the 200 training examples"),
    ("batch_size", 0, "batch_size=0"),
    ("start_step", 11, "start_step=11: must be <= total_steps (10)"),
    ("start_step", -1, "start_step=-1"),
    ("total_steps", 2.5, "total_steps=2.5"),
])
def test_bad_arguments_are_one_line_errors(field, value, fragment):
    kwargs = {"batch_size": BATCH, "seed": SEED, "total_steps": 10, field: value}
    with pytest.raises(ValueError) as error:
        pipeline.train_iterator(tiny_dataset(), **kwargs)
    assert fragment in str(error.value)
