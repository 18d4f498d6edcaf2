"""The package's XLA:CPU defaults (ratebp_jax/__init__.py): what they set, and that they leave
results unchanged."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ratebp_jax

from conftest import TEST_XLA_FLAGS, with_test_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints the tiny model's rate-BP and BPTT gradients, logits and spike inference at T=2.
PROGRAM = """
import json, os, sys
import jax
import ratebp_jax
from ratebp_jax import analysis, methods, models
jax.config.update("jax_threefry_partitionable", False)
out = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
net, params, stats = methods.split_model(models.create_model("resnet18_tiny", image_size=8))
batch = analysis.random_batch(jax.random.key(1), 4, 8, 3, 10, scale=2.0)
for method in ("rate", "bptt"):
    (loss, aux), grads = jax.jit(methods.make_grad_fn(method, net, T=2))(params, stats, batch)
    out[method] = [float(loss)] + [x.tolist() for x in jax.tree.leaves((aux["logits"], grads))]
logits, _ = jax.jit(lambda p, s, x: methods.spike_inference(net, p, s, x, T=2,
                                                            step_mode="multi"))(
    params, stats, batch["image"])
out["inference"] = logits.tolist()
print(json.dumps(out))
"""


def run_program(**env):
    env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
    proc = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_defaults_are_appended_unless_given_or_turned_off():
    name, value = next(iter(ratebp_jax.XLA_DEFAULTS.items()))
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    ratebp_jax._set_xla_defaults(env)
    assert env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false --{name}={value}"
    env = {"XLA_FLAGS": f"--{name}=individual_convolution"}
    ratebp_jax._set_xla_defaults(env)
    assert env["XLA_FLAGS"] == f"--{name}=individual_convolution"
    env = {"RATEBP_JAX_NO_XLA_DEFAULTS": "1"}
    ratebp_jax._set_xla_defaults(env)
    assert "XLA_FLAGS" not in env


def assert_same_results(a, b):
    """The rate-BP and BPTT losses, logits and gradients and the spike inference of two
    ``run_program`` outputs agree to 1e-4 of each array's largest entry."""
    for key in ("rate", "bptt", "inference"):
        arrays_a = a[key] if key != "inference" else [a[key]]
        arrays_b = b[key] if key != "inference" else [b[key]]
        assert len(arrays_a) == len(arrays_b)
        for x, y in zip(arrays_a, arrays_b):
            x, y = np.asarray(x), np.asarray(y)
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * max(np.abs(y).max(), 1e-12))


@pytest.mark.slow
def test_defaults_leave_gradients_logits_and_inference_unchanged():
    """The defaults move convolutions from YNNPACK to XLA's Eigen convolution, whose sums run
    in another order: results agree to float32 rounding, not bit for bit. The check is
    loose enough for that (1e-4 relative to each array's largest entry) and far tighter than
    a flipped spike, which moves a tiny model's gradients by percents."""
    with_defaults = run_program(XLA_FLAGS=None, RATEBP_JAX_NO_XLA_DEFAULTS=None)
    without = run_program(XLA_FLAGS=None, RATEBP_JAX_NO_XLA_DEFAULTS="1")
    assert with_defaults["xla_flags"] and not without["xla_flags"]
    assert_same_results(with_defaults, without)


@pytest.mark.slow
def test_the_suites_xla_flags_give_what_users_get():
    """The suite compiles with conftest.TEST_XLA_FLAGS (the older fusion emitters, for
    compile time); users run the package's defaults alone. Both agree to float32 rounding,
    so what the suite checks holds for what users run. (Not bit for bit: most arrays differ
    in their last bits, as two compilers' roundings do.)"""
    users = run_program(XLA_FLAGS=None, RATEBP_JAX_NO_XLA_DEFAULTS=None)
    suites = run_program(XLA_FLAGS=with_test_xla_flags(""), RATEBP_JAX_NO_XLA_DEFAULTS=None)
    for name, value in TEST_XLA_FLAGS.items():
        assert f"--{name}={value}" in suites["xla_flags"]
        assert name not in users["xla_flags"]
    assert_same_results(suites, users)
