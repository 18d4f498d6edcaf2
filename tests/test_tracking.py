"""TensorBoard event files: the tags, increasing steps, the values of metrics.jsonl, and a
resumed run that shows each per-epoch scalar once, as an uninterrupted run does."""
import os

import pytest

from ratebp_jax import tracking, train
from ratebp_jax import workdir as wd

from test_train import tiny_config

PER_EPOCH = ("test/loss", "test/accuracy", "learning_rate")


def tracked_config(**overrides):
    return tiny_config(T=1, batch_size=256, eval_batch_size=180, num_train_steps=10,
                       log_every_steps=2, grad_agreement_every_steps=4, **overrides)


def per_epoch(scalars):
    return {tag: values for tag, values in scalars.items()
            if tag in PER_EPOCH or tag.startswith("firing_rate/")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tracked"))
    train.train_and_evaluate(tracked_config(), workdir, log=lambda *_: None)
    return workdir, tracking.read_scalars(os.path.join(workdir, tracking.FOLDER))


def test_event_files_hold_every_tag_with_increasing_steps(uninterrupted):
    workdir, scalars = uninterrupted
    records = wd.read_jsonl(os.path.join(workdir, wd.METRICS_FILE))
    layers = list(records[0]["firing_rates"])
    expected = {"train/loss", "train/accuracy", *PER_EPOCH, "images_per_s", "compile_s",
                *(f"firing_rate/{layer}" for layer in layers), "agreement/rate/cosine",
                "agreement/rate/norm_ratio"}
    assert expected <= set(scalars), sorted(expected - set(scalars))
    assert any(tag.startswith("agreement/rate/") and tag.endswith("/cosine")
               and tag != "agreement/rate/cosine" for tag in scalars)
    for tag, values in scalars.items():
        steps = [step for step, _ in values]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 5, 7, 9, 10]  # every read
    texts = tracking.read_texts(os.path.join(workdir, tracking.FOLDER))
    assert '"model": "vgg_tiny"' in texts["config/text_summary"], texts


def test_event_values_equal_the_metrics_records(uninterrupted):
    workdir, scalars = uninterrupted
    records = wd.read_jsonl(os.path.join(workdir, wd.METRICS_FILE))
    for tag, key in (("test/loss", "test_loss"), ("test/accuracy", "test_accuracy"),
                     ("learning_rate", "learning_rate"), ("images_per_s", "images_per_s")):
        assert scalars[tag] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records]
    for layer in records[0]["firing_rates"]:
        assert scalars[f"firing_rate/{layer}"] == [
            (r["step"], pytest.approx(r["firing_rates"][layer], rel=1e-6)) for r in records]
    agreement = [r for r in wd.read_jsonl(os.path.join(workdir, "grad_agreement.jsonl"))]
    assert scalars["agreement/rate/cosine"] == [
        (r["step"], pytest.approx(r["cosine"], rel=1e-6)) for r in agreement]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 5, 7])
def test_a_resumed_run_shows_each_per_epoch_scalar_once(uninterrupted, tmp_path, stop):
    workdir = str(tmp_path)
    train.train_and_evaluate(tracked_config(), workdir, log=lambda *_: None,
                             interrupt_at_step=stop)
    train.train_and_evaluate(tracked_config(), workdir, log=lambda *_: None)
    scalars = tracking.read_scalars(os.path.join(workdir, tracking.FOLDER))
    assert per_epoch(scalars) == per_epoch(uninterrupted[1])
    assert scalars["agreement/rate/cosine"] == uninterrupted[1]["agreement/rate/cosine"]
    assert len(tracking.event_files(os.path.join(workdir, tracking.FOLDER))) == 2


def test_tracking_off_writes_no_event_files(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=2, tensorboard=False), str(tmp_path),
                             log=lambda *_: None)
    assert not tracking.event_files(str(tmp_path / tracking.FOLDER))


def test_a_torn_last_record_is_left_out(uninterrupted, tmp_path):
    workdir, scalars = uninterrupted
    (path,) = tracking.event_files(os.path.join(workdir, tracking.FOLDER))
    data = open(path, "rb").read()
    torn = tmp_path / os.path.basename(path)
    torn.write_bytes(data[:-7])
    events = tracking.read_events(str(torn))
    assert len(events) == len(tracking.read_events(path)) - 1
