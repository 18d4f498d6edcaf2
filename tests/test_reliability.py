"""A run loses nothing: SIGKILL, SIGTERM and Ctrl-C (once, twice, during the saves or while
modules load) resume exactly, NaN stops or skips, a corrupt checkpoint falls back, a run
refuses data that changed, every message says what is on disk, and the same seed gives the
same parameters bit for bit. Crashes at each write: test_crash.py."""
import glob
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ratebp_jax import data, train
from ratebp_jax import workdir as wd
from ratebp_jax.data.pipeline import ArraySource, Dataset

from test_train import ROOT, tiny_config

pytestmark = pytest.mark.slow

STEPS = 32  # 8 checkpoints at every 4 steps: enough to kill one mid-write
CLI_FLAGS = ["--config.model=vgg_tiny", "--config.T=2", "--config.batch_size=16",
             "--config.eval_batch_size=120", f"--config.num_train_steps={STEPS}",
             "--config.checkpoint_every_steps=4", "--config.progress_bar=false",
             "--config.plots=false"]


def params_at(workdir, step=None):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        step = manager.latest_step() if step is None else step
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    return restored["params"], int(restored["step"]["value"] if isinstance(
        restored["step"], dict) else restored["step"])


def start(workdir):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "main.py"),
                             "--workdir", workdir, *CLI_FLAGS], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def steps_done(workdir):
    return [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()] \
        if os.path.isdir(os.path.join(workdir, "checkpoints")) else []


def writing(workdir):
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    proc = start(workdir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return params_at(workdir)


@pytest.mark.parametrize("when", ["after_a_checkpoint", "during_a_checkpoint_write"])
def test_sigkill_then_rerun_gives_the_uninterrupted_parameters(tmp_path, uninterrupted, when):
    workdir = str(tmp_path)
    proc = start(workdir)
    if when == "after_a_checkpoint":
        assert wait_for(lambda: any(s >= 8 for s in steps_done(workdir)))
    else:
        assert wait_for(lambda: steps_done(workdir) and writing(workdir))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(steps_done(workdir), default=0)
    assert killed_at < STEPS, "the run finished before it could be killed"
    rerun = start(workdir)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    params, step = params_at(workdir)
    assert step == STEPS
    chex.assert_trees_all_equal(params, uninterrupted[0])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_checkpoints_and_exits_cleanly_then_resumes(tmp_path, uninterrupted,
                                                                      signum):
    workdir = str(tmp_path)
    proc = start(workdir)
    assert wait_for(lambda: any(s >= 4 for s in steps_done(workdir)))
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "interrupted at step" in out and "Traceback" not in out
    assert "KeyboardInterrupt" not in out
    stopped = int(out.split("interrupted at step ")[1].split(":")[0])
    assert stopped < STEPS and stopped in steps_done(workdir)
    rerun = start(workdir)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and f"resumed from step {stopped}" in out
    chex.assert_trees_all_equal(params_at(workdir)[0], uninterrupted[0])


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    config = tiny_config(num_train_steps=8, checkpoint_every_steps=2, keep_checkpoints=3)
    full = str(tmp_path / "full")
    train.train_and_evaluate(config, full, log=lambda *_: None)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, log=lambda *_: None, interrupt_at_step=6)
    assert 6 in steps_done(workdir) and 4 in steps_done(workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "6", "**", "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, "r+b") as f:  # truncate every data and metadata file
                f.truncate(max(1, os.path.getsize(path) // 3))
    logs = []
    train.train_and_evaluate(config, workdir, log=logs.append)
    assert any("checkpoint 6 is unreadable" in line for line in logs), logs
    assert any("resumed from step 4" in line for line in logs), logs
    chex.assert_trees_all_equal(params_at(workdir)[0], params_at(full)[0])


def _nan_dataset(bad_step, batch_size=32, seed=0):
    """Digits as float images with NaN in one example of training step ``bad_step``."""
    digits = data.load_dataset(tiny_config())
    x_train = digits.train_transform(digits.train.images, np.random.default_rng(0))
    order = np.random.default_rng([seed, 0]).permutation(len(x_train))
    x_train[order[bad_step * batch_size]] = np.nan
    x_test = digits.test_transform(digits.test.images, None)
    passthrough = lambda images, rng: images.astype(np.float32)  # noqa: E731
    return Dataset("nan_digits", ArraySource(x_train, digits.train.labels),
                   ArraySource(x_test, digits.test.labels), 10, (8, 8, 1), passthrough,
                   passthrough)


@pytest.fixture
def nan_data():
    data.LOADERS["nan_digits"] = lambda config: _nan_dataset(bad_step=5)
    yield
    del data.LOADERS["nan_digits"]


def test_nan_batch_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, nan_data):
    config = tiny_config(dataset="nan_digits", num_train_steps=12, checkpoint_every_steps=2)
    with pytest.raises(train.NonFiniteError, match="at step 6.*last good checkpoint, step 4"):
        train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    assert max(steps_done(str(tmp_path))) == 4  # nothing written at or after the bad step
    params, step = params_at(str(tmp_path))
    assert step == 4 and all(np.isfinite(np.asarray(x)).all()
                             for x in jax_leaves(params))
    assert not os.path.exists(tmp_path / "summary.json")


def test_nan_batch_stops_the_run_between_metric_reads(tmp_path, nan_data):
    """Without mid-epoch saves the host reads metrics every log_every_steps steps, one step
    behind the newest: the bad step is still found, named, and never checkpointed."""
    config = tiny_config(dataset="nan_digits", num_train_steps=12, log_every_steps=2)
    with pytest.raises(train.NonFiniteError,
                       match="at step 6.*No checkpoint was written yet, so a rerun starts"):
        train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    assert not steps_done(str(tmp_path))


def test_nan_batch_is_skipped_with_skip_policy(tmp_path, nan_data):
    config = tiny_config(dataset="nan_digits", num_train_steps=12, nan_policy="skip",
                         progress_bar=True)
    summary = train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    assert summary["steps"] == 12
    params, _ = params_at(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(params))


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_same_seed_gives_bit_identical_parameters(tmp_path):
    config = tiny_config(num_train_steps=5)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.train_and_evaluate(config, a, log=lambda *_: None)
    train.train_and_evaluate(config, b, log=lambda *_: None)
    chex.assert_trees_all_equal(params_at(a)[0], params_at(b)[0])
    config.seed = 1
    c = str(tmp_path / "c")
    train.train_and_evaluate(config, c, log=lambda *_: None)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(params_at(a)[0], params_at(c)[0])


def test_nonfinite_loss_exits_with_a_one_line_message(tmp_path):
    """Through the CLI: exit code 3, the step named, no traceback."""
    script = (
        "import sys; sys.path.insert(0, 'experiments'); sys.path.insert(0, 'tests');"
        "sys.argv = ['main.py', '--workdir', sys.argv[1], '--config.dataset=nan_digits',"
        "'--config.model=vgg_tiny', '--config.T=2', '--config.batch_size=32',"
        "'--config.num_train_steps=12', '--config.progress_bar=false'];"
        "from ratebp_jax import data; import test_reliability as t;"
        "data.LOADERS['nan_digits'] = lambda c: t._nan_dataset(bad_step=5);"
        "import main; main.run()")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradient at step 6" in last
    assert "No checkpoint was written yet" in last and not steps_done(str(tmp_path))


def _run_main(workdir, *flags, prelude="", timeout=600):
    """experiments/main.py in a subprocess, after ``prelude`` (Python run first)."""
    script = (f"import sys; sys.path.insert(0, 'experiments'); {prelude}\n"
              f"sys.argv = ['main.py', *sys.argv[1:]]; import main; main.run()")
    return subprocess.run([sys.executable, "-c", script, "--workdir", workdir, *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


EPOCH_FLAGS = ["--config.model=vgg_tiny", "--config.T=1", "--config.batch_size=256",
               "--config.eval_batch_size=180", "--config.num_train_steps=10",
               "--config.checkpoint_every_steps=3", "--config.plots=false"]

SECOND_CTRL_C = """
import os, signal
import orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
    if (os.path.basename(os.fspath(self.directory)), step) == ({kind!r}, 5):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second stops at once, inside the saves
    return _save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
"""


def _best(workdir):
    with ocp.CheckpointManager(os.path.join(workdir, "best")) as manager:
        step = manager.latest_step()
        return step, manager.restore(step, args=ocp.args.StandardRestore())["params"]


@pytest.mark.parametrize("kind", ["checkpoints", "best"],
                         ids=["before_the_latest_save", "between_latest_and_best"])
def test_a_second_ctrl_c_in_the_epoch_end_saves_resumes_to_the_same_run(tmp_path, kind):
    full = _run_main(str(tmp_path / "full"), *EPOCH_FLAGS)
    assert full.returncode == 0, full.stderr[-2000:]
    workdir = str(tmp_path / "run")
    stopped = _run_main(workdir, *EPOCH_FLAGS, prelude=SECOND_CTRL_C.format(kind=kind))
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr + stopped.stdout
    last = stopped.stderr.strip().splitlines()[-1]
    kept = 5 if kind == "best" else 3  # the latest save at 5 came before the best one
    assert last == (f"error: stopped by Ctrl-C; rerun the same command to resume from the "
                    f"last checkpoint, step {kept}"), last
    rerun = _run_main(workdir, *EPOCH_FLAGS)
    assert rerun.returncode == 0 and f"resumed from step {kept}" in rerun.stdout, rerun.stderr
    chex.assert_trees_all_equal(params_at(workdir), params_at(str(tmp_path / "full")))
    best, expected = _best(workdir), _best(str(tmp_path / "full"))
    assert best[0] == expected[0]
    chex.assert_trees_all_equal(best[1], expected[1])


def test_ctrl_c_while_modules_load_ends_with_one_line(tmp_path):
    """At any moment before training, Ctrl-C ends the run with one line, no traceback."""
    codes = []
    for delay in (0.2, 0.6, 1.5, 3.0):
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "main.py"),
                                 "--workdir", str(tmp_path / f"run{delay}"), *CLI_FLAGS],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        codes.append(proc.returncode)
        assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err
        if "final test accuracy" in out:
            continue  # the short run ended before the signal came (a warm compilation cache)
        if proc.returncode == 130:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("error: stopped by Ctrl-C"), err
        else:  # it reached the training loop: a first Ctrl-C checkpoints and exits cleanly
            assert proc.returncode == 0 and "interrupted at step" in out, (out, err)
    assert 130 in codes


def _npz(path, seed):
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8),
             y_train=rng.integers(0, 10, 96), x_test=rng.integers(0, 256, (40, 8, 8, 1),
                                                                  dtype=np.uint8),
             y_test=rng.integers(0, 10, 40))


def _files(workdir):
    """Every file under ``workdir`` with its size, mtime and bytes."""
    found = {}
    for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                found[path] = (os.path.getsize(path), os.stat(path).st_mtime_ns, f.read())
    return found


def test_a_run_refuses_data_changed_in_place_and_accepts_data_moved(tmp_path):
    data_path, workdir = str(tmp_path / "mine.npz"), str(tmp_path / "run")
    _npz(data_path, seed=0)
    flags = ["--config.dataset=npz", f"--config.data_path={data_path}",
             "--config.model=vgg_tiny", "--config.T=1", "--config.batch_size=32",
             "--config.eval_batch_size=40", "--config.num_epochs=1"]
    first = _run_main(workdir, *flags)  # the progress bar is on, and stderr is a pipe
    assert first.returncode == 0, first.stderr[-2000:]
    assert "\r" not in first.stdout + first.stderr  # no bar redraws in a log
    epoch_lines = [line for line in first.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 1 and "compile" in epoch_lines[0], first.stdout
    record = wd.read_jsonl(os.path.join(workdir, wd.METRICS_FILE))[0]
    assert record["compile_s"] > 0
    fingerprint = wd.read_json(os.path.join(workdir, wd.CONFIG_FILE))[wd.FINGERPRINT_KEY]
    assert fingerprint["dataset"] == "npz" and fingerprint["bytes"] == os.path.getsize(data_path)

    moved = str(tmp_path / "moved.npz")
    os.replace(data_path, moved)
    _npz(data_path, seed=1)  # other data at the old path
    before = _files(workdir)
    refused = _run_main(workdir, *flags, "--config.num_epochs=2")
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "the data: {dataset: npz" in lines[0], lines
    assert fingerprint["sha256"][:12] in lines[0] and "nothing was changed" in lines[0]
    assert _files(workdir) == before  # not a byte, not a timestamp

    rerun = _run_main(workdir, *flags, f"--config.data_path={moved}", "--config.num_epochs=2")
    assert rerun.returncode == 0 and "resumed from step 3" in rerun.stdout, rerun.stderr[-2000:]
    assert [r["epoch"] for r in wd.read_jsonl(os.path.join(workdir, wd.METRICS_FILE))] == [1, 2]
    second = wd.read_jsonl(os.path.join(workdir, wd.METRICS_FILE))[1]
    assert second["compile_s"] > 0  # a resumed process compiles again, in its first epoch


def test_asynchronous_saves_interrupted_and_resumed_give_the_same_run(tmp_path, monkeypatch):
    """Orbax's background saves (the default on accelerators), forced on for the CPU."""
    config = tiny_config(T=1, batch_size=256, eval_batch_size=180, num_train_steps=10,
                         checkpoint_every_steps=3)
    full = str(tmp_path / "full")
    train.train_and_evaluate(config, full, log=lambda *_: None)
    monkeypatch.setattr(wd, "async_checkpoints", lambda: True)
    workdir = str(tmp_path / "run")
    for stop in (5, 7, None):
        train.train_and_evaluate(config, workdir, log=lambda *_: None, interrupt_at_step=stop)
    chex.assert_trees_all_equal(params_at(workdir), params_at(full))
    assert _best(workdir)[0] == _best(full)[0]
    chex.assert_trees_all_equal(_best(workdir)[1], _best(full)[1])
