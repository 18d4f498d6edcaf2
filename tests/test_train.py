"""Training pipeline: records, resume, sharding equivalence, and one-line config errors."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

from conftest import xla_flags_with_host_devices
from ratebp_jax import methods, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
from configs import default  # noqa: E402


def tiny_config(**overrides):
    c = default.get_config()
    c.model, c.T, c.batch_size, c.eval_batch_size = "vgg_tiny", 2, 32, 120
    c.num_train_steps, c.progress_bar, c.plots = 6, False, False
    for k, v in overrides.items():
        c[k] = v
    return c


def test_the_step_on_leaves_is_the_step_on_the_state():
    """The trainer calls its step on the state's leaves (``train.on_leaves``): the same
    numbers, bit for bit, as the step on the structured state; a step that changes the
    state's structure is refused when traced."""
    from ratebp_jax import data, methods
    c = tiny_config()
    ds = data.load_dataset(c)
    tx = train.create_optimizer(c, lambda step: c.learning_rate)
    net, state = train.create_state(c, ds.image_shape, ds.num_classes, tx)
    step_fn = train.make_train_step(methods.make_grad_fn("rate", net, T=2), tx, "stop")
    treedef = jax.tree.structure(state)
    direct, flat = jax.jit(step_fn), jax.jit(train.on_leaves(step_fn, treedef))
    on_state, on_leaves = state, jax.tree.leaves(state)
    for _, batch in zip(range(2), ds.train_batches(epoch=0, batch_size=32, seed=0)):
        on_state, metrics = direct(on_state, batch)
        on_leaves, flat_metrics = flat(on_leaves, batch)
    chex.assert_trees_all_equal(jax.tree.unflatten(treedef, on_leaves), on_state)
    chex.assert_trees_all_equal(flat_metrics, metrics)
    grows = train.on_leaves(lambda s, b: ({**s, "extra": s["step"]}, {}), treedef)
    with pytest.raises(ValueError, match="another structure"):
        jax.jit(grows)(jax.tree.leaves(state), batch)


@pytest.mark.slow
def test_training_writes_records_and_learns(tmp_path):
    config = tiny_config(num_train_steps=0, num_epochs=2, plots=True)
    summary = train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("step", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "learning_rate", "seconds", "images_per_s", "firing_rates"):
        assert key in records[0]
    assert json.load(open(tmp_path / "summary.json")) == summary
    assert summary["steps"] == 2 * (1437 // 32) and summary["method"] == "rate"
    assert summary["final_test_accuracy"] > 0.3  # chance is 0.1
    rates = records[-1]["firing_rates"]
    assert rates and all(0 <= r <= 1 for r in rates.values())  # not an empty record
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "firing_rates.png").stat().st_size > 0


def test_relative_workdir_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(num_train_steps=2)
    train.train_and_evaluate(config, os.path.join("runs", "rel"), log=lambda *_: None)
    assert (tmp_path / "runs" / "rel" / "summary.json").exists()
    logs = []
    config.num_train_steps = 3
    train.train_and_evaluate(config, os.path.join("runs", "rel"), log=logs.append)
    assert any("resumed from step 2" in line for line in logs)


def test_load_trained_restores_the_latest_and_best_states(tmp_path):
    config = tiny_config(num_train_steps=2)
    train.train_and_evaluate(config, str(tmp_path / "run"), log=lambda *_: None)
    params, step = _final_params(str(tmp_path / "run"))
    dataset, net, state = train.load_trained(config, str(tmp_path / "run"))
    assert int(state["step"]) == step == 2
    chex.assert_trees_all_equal(jax.tree.leaves(state["params"]), jax.tree.leaves(params))
    assert dataset.num_classes == 10
    # The net takes the restored state: one logit per class (abstractly, nothing computed).
    images = jax.ShapeDtypeStruct((2, *dataset.image_shape), np.float32)
    logits, _ = jax.eval_shape(lambda p, s, x: methods.spike_inference(
        net, p, s, x, T=config.T, step_mode=config.step_mode), state["params"],
        state["batch_stats"], images)
    assert logits.shape == (2, 10)
    _, _, best = train.load_trained(config, str(tmp_path / "run"), best=True)
    assert int(best["step"]) == 2  # the only evaluation was at the end
    with pytest.raises(FileNotFoundError, match="workdir="):
        train.load_trained(config, str(tmp_path / "empty"))


def _final_params(workdir):
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    return restored["params"], int(restored["step"])


@pytest.mark.slow
@pytest.mark.parametrize("method,workers", [("rate", 0), ("bptt", 0), ("rate", 2)])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, method, workers):
    """With or without data worker processes (grain), and compared with a run that used
    none: the batches are a function of the step only."""
    config = tiny_config(method=method, num_train_steps=7, checkpoint_every_steps=0)
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    train.train_and_evaluate(config, full, log=lambda *_: None)
    config.data_workers = workers
    first = train.train_and_evaluate(config, resumed, log=lambda *_: None, interrupt_at_step=3)
    assert first["interrupted"] and not os.path.exists(os.path.join(resumed, "summary.json"))
    logs = []
    train.train_and_evaluate(config, resumed, log=logs.append)
    assert any("resumed from step 3" in line for line in logs)
    params_full, step_full = _final_params(full)
    params_resumed, step_resumed = _final_params(resumed)
    assert step_full == step_resumed == 7
    chex.assert_trees_all_equal(params_resumed, params_full)
    # The epoch's train sums travel in the checkpoint: the record covers all 7 steps.
    record_full, record_resumed = (json.loads(open(os.path.join(d, "metrics.jsonl")).read())
                                   for d in (full, resumed))
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert record_resumed[key] == record_full[key], key


SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "experiments")
    from configs import default
    from ratebp_jax import data, methods, train
    assert jax.device_count() == 4, jax.devices()
    c = default.get_config()
    c.model, c.T, c.batch_size = "vgg_tiny", 2, 32
    out = {}
    ds = data.load_dataset(c)
    batch = next(ds.train_batches(epoch=0, batch_size=32, seed=0))
    for method in ("rate", "bptt"):
        c.method = method
        for n in (1, 4):
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                                 axis_types=(jax.sharding.AxisType.Auto,))
            replicated, shard = train.data_parallel(mesh)
            tx = train.create_optimizer(c, lambda step: c.learning_rate)
            net, state = train.create_state(c, ds.image_shape, ds.num_classes, tx)
            grad_fn = methods.make_grad_fn(method, net, T=2, step_mode="multi")
            step = jax.jit(train.make_train_step(grad_fn, tx, "stop"),
                           out_shardings=(replicated, replicated))
            new, metrics = step(jax.device_put(state, replicated), shard(batch))
            leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(new["params"])]
            stats = [np.asarray(x).ravel() for x in jax.tree.leaves(new["batch_stats"])]
            out[f"{method}{n}"] = {"loss": float(metrics["loss"]),
                                   "params": np.concatenate(leaves).tolist(),
                                   "stats": np.concatenate(stats).tolist(),
                                   "sharded": len(shard(batch)["image"].sharding.device_set)}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_four_devices_give_the_same_step_as_one():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags_with_host_devices(4))
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for method in ("rate", "bptt"):
        one, four = out[f"{method}1"], out[f"{method}4"]
        assert four["sharded"] == 4 and one["sharded"] == 1
        np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
        np.testing.assert_allclose(four["params"], one["params"], rtol=1e-5, atol=1e-5)
        # Global BatchNorm statistics: running stats equal too.
        np.testing.assert_allclose(four["stats"], one["stats"], rtol=1e-5, atol=1e-6)


def run_main(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "main.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args,message", [
    (["--config.model=resnet50"], "model='resnet50': allowed values are"),
    (["--config.dataset=npz", "--config.data_path=/nonexistent/data.npz"],
     "data_path='/nonexistent/data.npz': no such file"),
])
def test_bad_config_is_one_line_error_without_traceback(tmp_path, args, message):
    """Two bad inputs through a real ``python main.py`` process: its exit code and stderr.
    Every field's bad value is in test_main_errors.py, where one process forks per case."""
    proc = run_main("--workdir", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_batch_not_divisible_by_device_count_is_one_line_error(tmp_path):
    # 4 CPU devices on any machine (an accelerator host would otherwise give its own count)
    proc = run_main("--workdir", str(tmp_path), "--config.batch_size=30",
                    env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags_with_host_devices(4)})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_size=30: must be divisible by the device count (4)" \
        in lines[0], lines


def test_the_stop_request_holds_sigint_sigterm_and_the_ctrl_c_hook_then_gives_them_back():
    """While the loop handles Ctrl-C it owns both handlers and the unraisable hook
    (cli.keep_ctrl_c); afterwards a notebook or a user's script has its own back."""
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
              sys.unraisablehook)
    stop = train._StopRequest(log=lambda message: None)
    try:
        held = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
                sys.unraisablehook)
        assert all(h is not b for h, b in zip(held, before)), held
        assert not stop.requested()
        signal.raise_signal(signal.SIGTERM)  # the preemption notice: a request, no exception
        assert stop.requested()
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM),
            sys.unraisablehook) == before
