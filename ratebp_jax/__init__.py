"""ratebp_jax: rate-based backpropagation and BPTT for spiking networks in JAX/Flax NNX.

Importing the package sets XLA:CPU defaults measured to help (docs/RESULTS.md, "XLA:CPU
backend options"), by appending them to ``XLA_FLAGS``; a flag the user has set there
already is left as it is, and ``RATEBP_JAX_NO_XLA_DEFAULTS=1`` sets none. XLA reads the
flags when its backend starts, so they take effect if ``ratebp_jax`` is imported before
the first JAX computation of the process (importing ``jax`` alone starts no backend).
"""
import os as _os

# Convolutions go to XLA's own (Eigen) convolution instead of YNNPACK, which this jaxlib
# uses by default for convolutions and dots. YNNPACK runs the kernel gradient of
# convolution.py (a convolution with a 32x32 kernel and batch-16 features) at 5 to 15% of
# the machine's peak (experiments/backend/conv_throughput.py). Dots stay in YNNPACK.
XLA_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}


def with_xla_flags(flags: str, settings: dict) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with each of ``settings`` (name: value) appended
    that it does not name already: a flag given there is left as it is."""
    given = {f.split("=", 1)[0].lstrip("-") for f in flags.split()}
    extra = [f"--{name}={value}" for name, value in settings.items() if name not in given]
    return " ".join(([flags] if flags else []) + extra)


def _set_xla_defaults(environ=_os.environ) -> None:
    if environ.get("RATEBP_JAX_NO_XLA_DEFAULTS") == "1":
        return
    flags = with_xla_flags(environ.get("XLA_FLAGS", ""), XLA_DEFAULTS)
    if flags:
        environ["XLA_FLAGS"] = flags


_set_xla_defaults()
