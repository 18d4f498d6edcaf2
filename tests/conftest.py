"""Shared fixtures: tiny models and batches, and a gradient comparison helper."""
import functools
import os
import shutil
import tempfile

# XLA:CPU's MLIR fusion emitters cost about 1.3 s of fixed work per compiled program: a tiny
# model's gradient compiles in 0.5 to 0.65 s with the older elemental emitters against
# 1.9 to 2.1 s with them, and the suite compiles hundreds of such programs (test_methods.py:
# 1001 s of test time -> 557 s). Set here, before JAX starts a backend, so the test workers
# and every script and notebook the tests start (they inherit the environment) use it. The
# package does not set it for users: on ResNet-18 it compiles no faster and runs 5 to 14%
# slower (docs/RESULTS.md, section 10). The emitters compute the same operations (XLA:CPU
# has no fast math) but not always with the same roundings, and test_xla_defaults.py checks
# that the package's own settings and these agree on gradients, logits and spike inference
# to float32 rounding (not bit for bit).
TEST_XLA_FLAGS = {"xla_cpu_use_fusion_emitters": "false"}

import ratebp_jax  # noqa: E402  (starts no backend; appends the package's own flags)


def with_test_xla_flags(flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) plus :data:`TEST_XLA_FLAGS` not already in it."""
    return ratebp_jax.with_xla_flags(flags, TEST_XLA_FLAGS)


os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


# LLVM optimisation level 0 (see jit_unoptimised): as jax.jit's compiler_options, or
# through xla_flags_plus for the scripts and notebooks the tests start. The level changes
# rounding, not the computation: at level 2 LLVM fuses a multiply and an add into one FMA
# (one rounding), at level 0 it rounds each (a*b+c alone differed by up to 9.5e-7; all 24
# tiny-model gradients checked, rate and BPTT at T=3 in both step modes, differed, by at
# most 2.4e-6). So a test compares results computed at one level, with a tolerance.
UNOPTIMISED = {"xla_backend_optimization_level": 0}


def xla_flags_plus(settings: dict) -> str:
    """This process's ``XLA_FLAGS`` (the suite's flags included) for a subprocess, with each
    of ``settings`` (name: value) appended last, so that it wins over one given earlier."""
    return " ".join([os.environ["XLA_FLAGS"], *(f"--{k}={v}" for k, v in settings.items())])


def xla_flags_with_host_devices(count: int) -> str:
    """:func:`xla_flags_plus` for a subprocess with ``count`` CPU devices."""
    return xla_flags_plus({"xla_force_host_platform_device_count": count})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from ratebp_jax import methods, models, neurons, profiling  # noqa: E402

IMAGE_SIZE = 8

# Test data is drawn with the non-partitionable threefry, which XLA:CPU compiles several
# times faster (models.create_model does the same for weights).
jax.config.update("jax_threefry_partitionable", False)

CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole session, shared by the test
    workers and the scripts and notebooks the tests start (they inherit the environment).
    Many tests compile the same program (BPTT of a tiny model at T=1 appears in five
    test files, the default digits run in a dozen subprocesses), and compilation is most
    of a tiny model's test. A cache hit returns the executable XLA built for the same
    program, flags and jaxlib, so no result changes. The cache lives in a temporary folder
    made here and removed at the end; a ``JAX_COMPILATION_CACHE_DIR`` already set is used
    as it is and kept."""
    full_float32_on_gpu()
    if CACHE_ENV in os.environ or hasattr(config, "workerinput"):
        return  # given by the user, or a worker that inherited the controller's
    path = tempfile.mkdtemp(prefix="ratebp_jax_test_xla_cache_")
    config._ratebp_cache_dir = path
    os.environ[CACHE_ENV] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", path)  # this process imported jax already
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def full_float32_on_gpu():
    """On a GPU, convolutions and dots in full float32, here and in the scripts and notebooks
    the tests start. JAX's default there is TF32, whose rounding (about 1e-3) broke the T=1
    exactness tests on an H200 (2.5e-4 against their 1e-5 bound); at ``highest`` they passed
    (docs/RESULTS.md, GPU section). CPUs compute float32 in full anyway: nothing is set."""
    if jax.default_backend() != "gpu" or "JAX_DEFAULT_MATMUL_PRECISION" in os.environ:
        return
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    path = getattr(config, "_ratebp_cache_dir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def tiny_setup(name, *, reset="soft", batch=4, num_classes=5, seed=0, image_size=IMAGE_SIZE,
               **model_options):
    """A tiny model, split, and a random batch with inputs large enough to make spikes.
    ``model_options`` (e.g. ``pool_ties``) go to ``models.create_model``.

    Built once per worker for each set of arguments (:func:`_tiny_setup_once`): dozens of
    tests ask for the same model, and each construction traces and dispatches the model's
    initialisers again (0.2 to 0.7 s warm, 1 to 4 s cold). Every caller gets its own
    ``params``, ``batch_stats`` and batch containers around the same (immutable) arrays."""
    net, params, batch_stats, batch_data = _tiny_setup_once(
        name, reset, batch, num_classes, seed, image_size, tuple(sorted(model_options.items())))
    fresh = lambda tree: jax.tree.map(lambda x: x, tree)  # noqa: E731
    return net, fresh(params), fresh(batch_stats), dict(batch_data)


@functools.cache
def _tiny_setup_once(name, reset, batch, num_classes, seed, image_size, model_options):
    in_channels = 2 if name == "vggsnn_dvs" else 3
    model = models.create_model(name, num_classes=num_classes, in_channels=in_channels,
                                image_size=image_size, neuron=neurons.NeuronConfig(reset=reset),
                                seed=seed, **dict(model_options))
    net, params, batch_stats = methods.split_model(model)
    key_x, key_y = jax.random.split(jax.random.key(seed + 1))
    batch_data = {
        "image": 2.0 * jax.random.normal(key_x, (batch, image_size, image_size, in_channels)),
        "label": jax.random.randint(key_y, (batch,), 0, num_classes),
    }
    return net, params, batch_stats, batch_data


def jit_unoptimised(fn, **kwargs):
    """``jax.jit`` at LLVM optimisation level 0, which compiles a tiny model's gradient in
    1.3 s against 2.2 s. For tiny programs that run once, whose results are compared with
    tolerances, where compiling is most of the test: the level changes rounding (see
    UNOPTIMISED), not what is computed. Not for programs that run long (at -O0, a
    single-step ResNet-18 parity step took 7 times as long)."""
    return jax.jit(fn, compiler_options=UNOPTIMISED, **kwargs)


def compiled_temp_bytes(fn, *args):
    """XLA's compiled temporary memory of ``fn`` on ``args``, compiled at LLVM level 0.
    Buffer assignment is decided on the HLO, before LLVM runs: on resnet18_tiny's rate,
    BPTT and rematerialised BPTT steps in both step modes at T=2 and 16, the figures were
    equal to the byte at levels 0 and 2, and compiling took 0.6-1.1 s against 2.5-3.7 s."""
    return profiling.compile_with_stats(fn, *args, compiler_options=UNOPTIMISED)[1][
        "temp_bytes"]


def grads_of(method, net, params, batch_stats, batch, **kwargs):
    return jit_unoptimised(methods.make_grad_fn(method, net, **kwargs))(
        params, batch_stats, batch)


def grads_of_each(net, params, batch_stats, batch, *specs):
    """``grads_of`` for each ``(method, kwargs)`` of ``specs``, in one compiled program: a
    tiny model's program costs more to compile than to run, and at T=1 three gradients
    compile in 1.45 s together against 2.3 s apart. Each gradient is its own function of
    the inputs; XLA may share their common subexpressions, which computes the same
    values."""
    fns = [methods.make_grad_fn(method, net, **kwargs) for method, kwargs in specs]
    return jit_unoptimised(lambda *args: tuple(fn(*args) for fn in fns))(
        params, batch_stats, batch)


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def rel_err(a, b):
    return float(jnp.linalg.norm(flat(a) - flat(b)) / jnp.linalg.norm(flat(b)))


# The tiny model that tests over every tiny model run in the fast tier (-m "not slow"); the
# others are marked slow.
FAST_TINY = "resnet18_tiny"


@pytest.fixture(params=[pytest.param(name, marks=() if name == FAST_TINY else pytest.mark.slow)
                        for name in sorted(set(models.TINY.values()))])
def tiny_name(request):
    return request.param
