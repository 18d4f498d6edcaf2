"""A real two-process run: two `main.py --distributed` processes on this machine (a localhost
coordinator, gloo collectives, 2 CPU devices each) train what one process with 4 devices
trains, write records and checkpoints once, and both resume from them."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import xla_flags_with_host_devices
from test_train import ROOT

pytestmark = pytest.mark.slow

FLAGS = ["--config.model=vgg_tiny", "--config.T=2", "--config.batch_size=32",
         "--config.eval_batch_size=120", "--config.progress_bar=false",
         "--config.plots=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_py(workdir, steps, devices, extra=()):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags_with_host_devices(devices))
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "experiments", "main.py"), "--workdir", workdir,
         *FLAGS, f"--config.num_train_steps={steps}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def two_processes(workdir, steps):
    port = free_port()
    procs = [main_py(workdir, steps, 2, ["--distributed", f"--coordinator_address=127.0.0.1:"
                                         f"{port}", "--num_processes=2", f"--process_id={i}"])
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    return outs


def final_state(workdir):
    """The latest checkpoint's params and BN statistics, flat, restored onto this process's
    one device (it was written by 4 devices)."""
    import jax
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        step = manager.latest_step()
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                               sharding=device),
                                manager.item_metadata(step).tree)
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa
    return step, flat(restored["params"]), flat(restored["batch_stats"])


def test_two_processes_train_what_one_process_with_four_devices_trains(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    single = main_py(one, 5, 4)
    # 3 steps, then a rerun to 5: both processes restore the checkpoint written once.
    first = two_processes(two, 3)
    assert all("final test accuracy" in out for out in first)
    assert "records in" in first[0] and "records in" not in first[1]  # only process 0 writes
    assert "process 0 writes the records" in first[1]
    resumed = two_processes(two, 5)
    assert all("resumed from step 3" in out for out in resumed), resumed
    out, _ = single.communicate(timeout=600)
    assert single.returncode == 0, out[-3000:]

    step_one, params_one, stats_one = final_state(one)
    step_two, params_two, stats_two = final_state(two)
    assert step_one == step_two == 5
    np.testing.assert_allclose(params_two, params_one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats_two, stats_one, rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [3, 5]  # written once, by process 0
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["processes"] == 2 and summary["devices"] == 4 and summary["steps"] == 5
    reference = json.load(open(os.path.join(one, "summary.json")))
    np.testing.assert_allclose(summary["final_test_accuracy"],
                               reference["final_test_accuracy"], atol=1e-6)
