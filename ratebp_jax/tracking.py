"""Live tracking: TensorBoard event files in ``workdir/tensorboard/``, and a reader for them.

Written with tensorboardX, which needs no TensorFlow: clu's ``metric_writers`` write
TensorBoard through TensorFlow's summary API, a dependency of several hundred MB that
nothing else here needs. Watch a run with ``pip install tensorboard`` in any environment,
then ``tensorboard --logdir runs/``.

A resumed run must not show an event twice. TensorBoard's own rule for that (a
``purge_step`` marker, after which it drops older events at or past that step) lives in
its reader, so other readers would see duplicates. Instead, a resumed run rewrites the
event files to the events that precede its checkpoint, and appends from there: the files
are clean for any reader. The writer is flushed before every checkpoint, so the events
that precede a checkpoint are on disk when it commits.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import time

import jax

FOLDER = "tensorboard"
EPOCH_TAGS = ("test/loss", "test/accuracy", "learning_rate")  # plus firing_rate/<layer>


class Tracker:
    """The run's TensorBoard writer (process 0 only; see :func:`open_tracker`).

    Events are written synchronously, through tensorboardX's ``EventsWriter`` rather than
    its ``SummaryWriter``: the latter queues events for a background thread, and its
    ``flush`` does not wait for that queue, so an event could still be missing from disk
    when the checkpoint after it commits."""

    def __init__(self, folder: str, config, restored_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter

        keep_events_before(folder, restored_step)
        os.makedirs(folder, exist_ok=True)
        self.writer = EventsWriter(os.path.join(folder, "events"), f".{time.time_ns()}")
        if restored_step is None:
            from tensorboardX import summary
            self._write(0, summary.text("config", "```\n" + json.dumps(
                config.to_dict(), indent=1, default=str) + "\n```"))

    def _write(self, step: int, summary_proto) -> None:
        from tensorboardX.proto import event_pb2
        self.writer.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                summary=summary_proto))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX import summary
        self._write(step, summary.scalar(tag, value))

    def train(self, step: int, loss: float, accuracy: float) -> None:
        self.add_scalar("train/loss", loss, step)
        self.add_scalar("train/accuracy", accuracy, step)

    def epoch(self, record: dict) -> None:
        step = record["step"]
        self.add_scalar("test/loss", record["test_loss"], step)
        self.add_scalar("test/accuracy", record["test_accuracy"], step)
        self.add_scalar("learning_rate", record["learning_rate"], step)
        if record["images_per_s"] is not None:
            self.add_scalar("images_per_s", record["images_per_s"], step)
        if record["compile_s"]:
            self.add_scalar("compile_s", record["compile_s"], step)
        for layer, rate in record["firing_rates"].items():
            self.add_scalar(f"firing_rate/{layer}", rate, step)

    def agreement(self, records: list[dict]) -> None:
        """``agreement.AgreementLogger`` records: one per method, at the step they describe."""
        for r in records:
            tag, step = f"agreement/{r['method']}", r["step"]
            for name, value in (("cosine", r["cosine"]), ("norm_ratio", r["norm_ratio"])):
                if value is not None:
                    self.add_scalar(f"{tag}/{name}", value, step)
            for layer, value in r["layers"].items():
                if value["cosine"] is not None:
                    self.add_scalar(f"{tag}/{layer}/cosine", value["cosine"], step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(workdir: str, config, restored_step: int | None) -> Tracker | None:
    """The run's tracker, or None when ``config.tensorboard`` is off or this process does
    not write records. A run that starts afresh removes the files of an earlier start."""
    folder = os.path.join(workdir, FOLDER)
    if jax.process_index() != 0:
        return None
    if not config.tensorboard:
        keep_events_before(folder, restored_step)  # what is kept stays true to the run
        return None
    return Tracker(folder, config, restored_step)


def _kept(event, restored_step: int | None) -> bool:
    """Whether an event precedes the checkpoint at ``restored_step``. Agreement records at
    a step are made after that step's checkpoint, so at the restored step they go."""
    if restored_step is None:
        return False
    tags = [v.tag for v in event.summary.value]
    before = any(t.startswith("agreement/") for t in tags)
    return event.step < restored_step if before else event.step <= restored_step


def keep_events_before(folder: str, restored_step: int | None) -> None:
    """Rewrite the event files in ``folder`` to the events that precede the restored
    checkpoint (none for a fresh start), in one new file, written then renamed."""
    files = event_files(folder)
    if not files:
        return
    from tensorboardX.event_file_writer import EventsWriter

    kept = [e for path in files for e in read_events(path)
            if e.HasField("summary") and _kept(e, restored_step)]
    if kept:
        tmp = os.path.join(folder, "rewrite")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash inside a rewrite
        os.makedirs(tmp)
        writer = EventsWriter(os.path.join(tmp, "events"), f".{time.time_ns()}")
        for event in kept:
            writer.write_event(event)
        writer.close()
        (written,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        os.replace(written, os.path.join(folder, os.path.basename(written)))
        os.rmdir(tmp)
    for path in files:
        os.remove(path)


def event_files(folder: str) -> list[str]:
    """The event files in ``folder``, oldest first (by the time of their first event)."""
    paths = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    def first_time(path):
        events = read_events(path)
        return (events[0].wall_time if events else float("inf"), path)
    return sorted(paths, key=first_time)


def read_events(path: str) -> list:
    """The ``Event`` protos of one file, in order. Written by hand because TensorBoard's
    reader needs tensorboard itself. A last record that a crash cut short is left out."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        data = f.read()
    events, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        end = at + 12 + length + 4  # length, its CRC, the record, the record's CRC
        if end > len(data):
            break
        event = event_pb2.Event()
        event.ParseFromString(data[at + 12:at + 12 + length])
        events.append(event)
        at = end
    return events


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` in the order written, over every event file."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(folder):
        for event in read_events(path):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def read_texts(folder: str) -> dict[str, str]:
    """``{tag: text}`` of the text summaries (the run's config)."""
    texts = {}
    for path in event_files(folder):
        for event in read_events(path):
            for value in event.summary.value:
                if value.HasField("tensor") and value.tensor.string_val:
                    texts[value.tag] = value.tensor.string_val[0].decode()
    return texts
