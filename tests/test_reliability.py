"""A run loses nothing: SIGKILL and SIGTERM resume exactly, NaN stops or skips, a corrupt
checkpoint falls back, and the same seed gives the same parameters bit for bit."""
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
from ratebp_jax.data.pipeline import ArraySource, Dataset

from test_train import ROOT, tiny_config

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
    with pytest.raises(train.NonFiniteError, match="at step 6"):
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
    with pytest.raises(train.NonFiniteError, match="at step 6"):
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
    assert "non-finite loss or gradient at step 6" in proc.stderr.strip().splitlines()[-1]
