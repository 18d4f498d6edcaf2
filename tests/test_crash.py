"""A crash at any write of a run resumes to the uninterrupted run's result.

One run is recorded with every write it makes intercepted: the metrics and agreement lines,
``config.json`` and ``summary.json``, the figures, and each orbax save (latest and best, at
mid-epoch saves and at epoch ends; the TensorBoard events are flushed before each
checkpoint). Before each write the workdir is copied: that is what a
crash just before it leaves. Each write also gets the states a crash inside it leaves: a torn
last JSONL line, a temporary file or checkpoint directory never renamed, an old checkpoint
half deleted, and, for the two saves at an epoch's end, the order that asynchronous saves
may commit in (the best checkpoint committed, the latest not). Rerunning the same config on
every such state must give the uninterrupted run's parameters and BatchNorm statistics bit
for bit, the same ``best/`` checkpoint, and the same records and TensorBoard scalars apart
from timings.
"""
import glob
import json
import os
import shutil
import threading

import chex
import orbax.checkpoint as ocp
import pytest

from ratebp_jax import tracking, train
from ratebp_jax import workdir as wd

from test_train import tiny_config

pytestmark = pytest.mark.slow

TIMINGS = {"seconds", "images_per_s", "compile_s", "wall_s", "wall_time_s"}


def crash_config(**overrides):
    """Two epochs of 5 steps, a mid-epoch save every 3 steps, agreement records every 4
    steps, figures on: every kind of write, each more than once. Adam learns fast enough
    that the second epoch is the better one, so the best checkpoint is replaced."""
    return tiny_config(T=1, batch_size=256, eval_batch_size=180, num_train_steps=10,
                       checkpoint_every_steps=3, keep_checkpoints=2, optimizer="adam",
                       learning_rate=0.01, grad_agreement_every_steps=4, plots=True,
                       **overrides)


class Recorder:
    """Copies the workdir before every write of a run, and builds the states that a crash
    inside each write leaves. ``states`` is a list of (name, folder)."""

    def __init__(self, workdir, scratch):
        self.workdir, self.scratch, self.states = workdir, scratch, []
        self.lock = threading.Lock()  # figures are drawn on another thread

    def locked(self, write):
        """``write`` with its copies, one at a time, whichever thread calls it."""
        def call(*args, **kwargs):
            with self.lock:
                return write(*args, **kwargs)
        return call

    def snapshot(self, name):
        folder = os.path.join(self.scratch, f"{len(self.states):03d}-{name}")
        if os.path.exists(self.workdir):
            shutil.copytree(self.workdir, folder)
        else:
            os.makedirs(folder)
        self.states.append((name, folder))
        return folder

    def around_append(self, original):
        def append(path, record):
            name = os.path.basename(path)
            self.snapshot(f"before-append-{name}-{record['step']}")
            torn = self.snapshot(f"torn-append-{name}-{record['step']}")
            with open(os.path.join(torn, name), "a") as f:
                f.write(json.dumps(record)[:25])
            original(path, record)
        return self.locked(append)

    def around_renamed(self, original, path_arg: int, partial: bytes):
        """A write to a temporary file renamed into place: a crash before it, and one that
        left the temporary file written in part, never renamed."""
        def write(*args):
            name = os.path.basename(args[path_arg])
            self.snapshot(f"before-{name}")
            half = self.snapshot(f"unrenamed-{name}")
            with open(os.path.join(half, name + ".tmp"), "wb") as f:
                f.write(partial)
            original(*args)
        return self.locked(write)

    def around_save(self, original):
        recorder = self

        def save(manager, step, *args, **kwargs):
            kind = os.path.basename(os.fspath(manager.directory))
            before = recorder.snapshot(f"before-save-{kind}-{step}")
            steps_before = set(manager.all_steps())
            result = original(manager, step, *args, **kwargs)
            manager.wait_until_finished()
            new = os.path.join(os.fspath(manager.directory), str(step))
            unrenamed = recorder.snapshot(f"unrenamed-save-{kind}-{step}")
            shutil.rmtree(os.path.join(unrenamed, kind))
            shutil.copytree(os.path.join(before, kind), os.path.join(unrenamed, kind))
            shutil.copytree(new, os.path.join(unrenamed, kind,
                                              f"{step}.orbax-checkpoint-tmp-1234"))
            for deleted in steps_before - set(manager.all_steps()):
                half = recorder.snapshot(f"half-deleted-{kind}-{deleted}")
                os.makedirs(os.path.join(half, kind, str(deleted)))
            if kind == "best" and step in _latest_steps(recorder.workdir):
                # Asynchronous saves may commit the best checkpoint before the latest one.
                reordered = recorder.snapshot(f"best-before-latest-{step}")
                shutil.rmtree(os.path.join(reordered, "checkpoints", str(step)))
            return result
        return self.locked(save)


def _latest_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return {int(d) for d in os.listdir(folder) if d.isdigit()} if os.path.isdir(folder) else set()


def _restore(folder):
    with ocp.CheckpointManager(folder) as manager:
        step = manager.latest_step()
        state = manager.restore(step, args=ocp.args.StandardRestore())
    return step, {"params": state["params"], "batch_stats": state["batch_stats"]}


def _records(path):
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in wd.read_jsonl(path)]


def outcome(workdir):
    """What a finished run leaves, timings aside."""
    summary = wd.read_json(os.path.join(workdir, wd.SUMMARY_FILE))
    return {"latest": _restore(os.path.join(workdir, "checkpoints")),
            "best": _restore(os.path.join(workdir, "best")),
            "best_steps": sorted(int(d) for d in os.listdir(os.path.join(workdir, "best"))
                                 if d.isdigit()),
            "metrics": _records(os.path.join(workdir, wd.METRICS_FILE)),
            "agreement": _records(os.path.join(workdir, "grad_agreement.jsonl")),
            "summary": {k: v for k, v in summary.items() if k not in TIMINGS},
            "figures": sorted(os.path.basename(p)
                              for p in glob.glob(os.path.join(workdir, "*.png"))),
            "events": {tag: values for tag, values in
                       tracking.read_scalars(os.path.join(workdir, tracking.FOLDER)).items()
                       if tag not in ("images_per_s", "compile_s")}}


def _first_difference(got, expected):
    if isinstance(got, dict) and isinstance(expected, dict):
        for key in sorted(set(got) | set(expected)):
            if got.get(key) != expected.get(key):
                return key, got.get(key), expected.get(key)
    return got, expected


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The uninterrupted run's outcome, and the crash states of every write it made."""
    root = tmp_path_factory.mktemp("recorded")
    workdir, scratch = str(root / "run"), str(root / "states")
    recorder = Recorder(workdir, scratch)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wd, "append_jsonl", recorder.around_append(wd.append_jsonl))
        mp.setattr(wd, "write_json_atomic",
                   recorder.around_renamed(wd.write_json_atomic, 0, b'{"name": "defa'))
        mp.setattr(wd, "save_figure_atomic",
                   recorder.around_renamed(wd.save_figure_atomic, 1, b"\x89PNG\r\n"))
        mp.setattr(ocp.CheckpointManager, "save",
                   recorder.around_save(ocp.CheckpointManager.save))
        train.train_and_evaluate(crash_config(), workdir, log=lambda *_: None)
    return outcome(workdir), recorder.states


def test_the_recording_covers_every_kind_of_write(recorded):
    expected, states = recorded
    names = [name for name, _ in states]
    for kind in ("append-metrics.jsonl", "append-grad_agreement.jsonl", "config.json",
                 "summary.json", "curves.png", "firing_rates.png", "grad_agreement.png",
                 "save-checkpoints-3", "save-checkpoints-5", "save-best-5",
                 "save-checkpoints-10", "save-best-10", "half-deleted-checkpoints",
                 "best-before-latest-5", "best-before-latest-10"):
        assert any(kind in name for name in names), (kind, names)
    assert len(states) >= 30
    assert expected["best_steps"] and expected["figures"]
    assert {"train/loss", "test/accuracy", "learning_rate", "agreement/rate/cosine"} <= set(
        expected["events"])


def test_a_crash_at_any_write_resumes_to_the_uninterrupted_result(recorded, tmp_path):
    expected, states = recorded
    failures = []
    for name, folder in states:
        workdir = str(tmp_path / name)
        shutil.copytree(folder, workdir)
        try:
            train.train_and_evaluate(crash_config(), workdir, log=lambda *_: None)
            got = outcome(workdir)
            chex.assert_trees_all_equal(got["latest"], expected["latest"])
            chex.assert_trees_all_equal(got["best"], expected["best"])
            for key in ("best_steps", "metrics", "agreement", "summary", "figures", "events"):
                assert got[key] == expected[key], (key, _first_difference(got[key],
                                                                         expected[key]))
        except Exception as e:  # noqa: BLE001 - every state is tried; all failures listed
            failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        shutil.rmtree(workdir, ignore_errors=True)
    assert not failures, "\n".join(failures)
    print(f"{len(states)} crash states resumed to the uninterrupted result")
