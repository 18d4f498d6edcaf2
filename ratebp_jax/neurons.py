"""LIF neurons (docs/DESIGN.md section 1), surrogates and the eligibility recurrence
(section 2.2) as plain functions of arrays, each testable on its own; ``layers.py`` wires
them into NNX layers."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ratebp_jax import checks

RESET_MODES = ("soft", "soft_nodetach", "hard", "hard_detach")


# --------------------------------------------------------------------------- surrogates
# (v - thresh, alpha) -> dS/dv, each integrating to 1; the reference uses the sigmoid.
def _sigmoid_grad(x, alpha):
    sig = jax.nn.sigmoid(alpha * x)
    return alpha * sig * (1.0 - sig)


def _atan_grad(x, alpha):
    return alpha / 2.0 / (1.0 + (jnp.pi / 2.0 * alpha * x) ** 2)


def _triangle_grad(x, alpha):
    return jnp.maximum(0.0, alpha - alpha * alpha * jnp.abs(x))


def _rectangle_grad(x, alpha):
    return jnp.where(jnp.abs(x) < 0.5 / alpha, alpha, 0.0).astype(x.dtype)


SURROGATES: dict[str, Callable] = {
    "sigmoid": _sigmoid_grad,
    "atan": _atan_grad,
    "triangle": _triangle_grad,
    "rectangle": _rectangle_grad,
}


@dataclasses.dataclass(frozen=True)
class NeuronConfig:
    """Static LIF settings (docs/DESIGN.md section 1), hashable for NNX modules and jit:
    decay ``lam = 1 - 1/tau``, threshold, reset mode (RESET_MODES) and hard-reset value,
    and the surrogate (SURROGATES) with its sharpness ``alpha``.

    ``learnable_leak``: each LIF layer learns its decay, ``lam = sigmoid(w)`` with ``w`` a
    parameter of the layer starting at ``logit(lam)``, so ``lam`` must lie in (0, 1); the
    functions below then take the layer's decay as their ``lam`` argument (DESIGN
    section 8)."""

    lam: float = 0.2
    thresh: float = 1.0
    reset: str = "soft"
    v_reset: float = 0.0
    surrogate: str = "sigmoid"
    alpha: float = 4.0
    learnable_leak: bool = False

    def __post_init__(self):
        checks.check_bool("learnable_leak", self.learnable_leak)
        checks.check_number("lam", self.lam, 0.0, 1.0, low_open=self.learnable_leak,
                            high_open=True)
        checks.check_number("thresh", self.thresh, 0.0, low_open=True)
        checks.check_choice("reset", self.reset, RESET_MODES)
        checks.check_choice("surrogate", self.surrogate, SURROGATES)
        checks.check_number("alpha", self.alpha, 0.0, low_open=True)

    @property
    def hard(self) -> bool:
        return self.reset.startswith("hard")

    @property
    def detach_reset(self) -> bool:
        # The reference's hard reset is not detached; its soft reset is.
        return self.reset in ("soft", "hard_detach")


def leak(cfg: NeuronConfig, lam=None):
    """The decay the functions below use: ``lam``, a learnable leak's value, when given,
    else the static ``cfg.lam``."""
    return cfg.lam if lam is None else lam


def surrogate_grad(v, cfg: NeuronConfig):
    """dS/dv of the surrogate, evaluated at the pre-reset membrane ``v``."""
    return SURROGATES[cfg.surrogate](v - cfg.thresh, cfg.alpha)


# --------------------------------------------------------------------------- spike function
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def spike(v, cfg: NeuronConfig):
    """Heaviside ``v >= thresh`` (the reference's tie rule); its VJP is the surrogate's."""
    return (v >= cfg.thresh).astype(v.dtype)


def _spike_fwd(v, cfg):
    return spike(v, cfg), v


def _spike_bwd(cfg, v, g):
    return (g * surrogate_grad(v, cfg),)


spike.defvjp(_spike_fwd, _spike_bwd)


# --------------------------------------------------------------------------- LIF dynamics
def reset_membrane(v, s, cfg: NeuronConfig):
    """Post-reset membrane ``u`` from the pre-reset ``v`` and the spike ``s``."""
    s_reset = jax.lax.stop_gradient(s) if cfg.detach_reset else s
    if cfg.hard:
        return v * (1.0 - s_reset) + cfg.v_reset * s_reset
    return v - cfg.thresh * s_reset


def reset_derivative(v, s, cfg: NeuronConfig):
    """``d_t = du_t/dv_t`` along the differentiated graph (docs/DESIGN.md section 2.2)."""
    if cfg.hard:
        d = 1.0 - s
        if not cfg.detach_reset:
            d = d + (cfg.v_reset - v) * surrogate_grad(v, cfg)
        return d
    if cfg.detach_reset:
        # A scalar keeps eps_t, the same for every neuron, a scalar carry.
        return jnp.ones((), v.dtype)
    return 1.0 - cfg.thresh * surrogate_grad(v, cfg)


def lif_step(u_prev, x, cfg: NeuronConfig, lam=None):
    """One LIF step, decay :func:`leak`. Returns ``(u, s, v)``: post-reset membrane, spike,
    pre-reset membrane."""
    v = leak(cfg, lam) * u_prev + x
    s = spike(v, cfg)
    return reset_membrane(v, s, cfg), s, v


def lif_scan(x_TxN, cfg: NeuronConfig, temporal_grad: bool = True, lam=None):
    """The LIF's spikes over time from rest (``u_0 = 0``), differentiable (BPTT) in the
    input and a learnable ``lam``; ``temporal_grad=False`` cuts the gradient through the
    membrane carry (SLTT, OTTT)."""
    def body(u, x):
        if not temporal_grad:
            u = jax.lax.stop_gradient(u)
        u, s, _ = lif_step(u, x, cfg, lam)
        return u, s

    _, spikes = jax.lax.scan(body, jnp.zeros_like(x_TxN[0]), x_TxN)
    return spikes


def _after_reset(v, cfg: NeuronConfig):
    """The membrane after the reset that follows ``v``: 0 at ``v = 0``, so a loop carrying
    the pre-reset membrane starts at rest."""
    return reset_membrane(v, spike(v, cfg), cfg)


def _scan_over_input(step, init, xs):
    """``lax.scan(step, init, xs)`` for a step whose output has its input's shape and dtype,
    writing each output over the input it came from. Returns ``(carry, ys)``.

    ``lax.scan`` would stack them in a new, zero-filled buffer. To stay in place the
    callers carry the membrane before its reset (docs/RESULTS.md, "The no-gradient LIF
    loops write their spikes over their input")."""
    def body(t, state):
        carry, xs = state
        carry, y = step(carry, xs[t])
        return carry, xs.at[t].set(y.astype(xs.dtype))
    # The first step is peeled so XLA folds the constant init into it; not at T = 2, where
    # XLA would inline the one step left and no longer write in place.
    start, state = (1, body(0, (init, xs))) if xs.shape[0] > 2 else (0, (init, xs))
    return jax.lax.fori_loop(start, xs.shape[0], body, state)


def lif_forward(x_TxN, cfg: NeuronConfig, lam=None):
    """The spikes of :func:`lif_scan`, bit for bit, for inference (see
    :func:`_scan_over_input`): faster and in less memory, written over ``x_TxN``."""
    def step(v_prev, x):
        _, s, v = lif_step(_after_reset(v_prev, cfg), x, cfg, lam)
        return v, s

    return _scan_over_input(step, jnp.zeros_like(x_TxN[0]), x_TxN)[1]


def time_mean(x_TxN):
    """``x_TxN.mean(0)`` as a product with ones, far faster on XLA:CPU (docs/RESULTS.md, "The
    no-gradient LIF loops write their spikes over their input"); at full precision, which
    GPUs would otherwise take as TF32."""
    T = x_TxN.shape[0]
    return jnp.tensordot(jnp.ones((T,), x_TxN.dtype), x_TxN, axes=1,
                         precision=jax.lax.Precision.HIGHEST) / T


class EligibilityCarry(NamedTuple):
    """The spike pass's carry: membrane, ``eps * d`` and the running mean of ``eps * sg``;
    with a learnable leak also ``D * d`` and the running mean of ``D * sg`` (DESIGN
    section 8), else None."""

    u: jax.Array
    eps_d: jax.Array
    elig: jax.Array
    lam_d: jax.Array | None = None
    elig_lam: jax.Array | None = None


def eligibility_init(shape, cfg: NeuronConfig, dtype=jnp.float32) -> EligibilityCarry:
    zeros = jnp.zeros(shape, dtype)
    eps_d = jnp.zeros(jnp.shape(reset_derivative(zeros, zeros, cfg)), dtype)
    if cfg.learnable_leak:
        return EligibilityCarry(zeros, eps_d, zeros, zeros, zeros)
    return EligibilityCarry(zeros, eps_d, zeros)


def eligibility_step(carry: EligibilityCarry, x, cfg: NeuronConfig, T: int, lam=None):
    """One spike-pass step that also advances the eligibility recurrence (docs/DESIGN.md
    section 2.2), adding ``eps_t sg(v_t) / T`` to ``elig``; with a learnable leak also
    ``D_t = u_{t-1} + lam d_{t-1} D_{t-1}`` (``u`` post-reset) and ``D_t sg(v_t) / T`` to
    ``elig_lam`` (section 8). Returns ``(carry, s, v)``."""
    lam = leak(cfg, lam)
    u, s, v = lif_step(carry.u, x, cfg, lam)
    eps = 1.0 + lam * carry.eps_d
    d, sg = reset_derivative(v, s, cfg), surrogate_grad(v, cfg)
    new = EligibilityCarry(u=u, eps_d=eps * d, elig=carry.elig + eps * sg / T)
    if carry.lam_d is not None:
        # Per neuron from the first step (a single step mode carry starts as a scalar 0).
        D = jnp.broadcast_to(carry.u + lam * carry.lam_d, v.shape)
        new = new._replace(lam_d=D * d, elig_lam=carry.elig_lam + D * sg / T)
    return new, s, v


def lif_scan_with_eligibility(x_TxN, cfg: NeuronConfig, lam=None):
    """Spike pass over T steps, without gradient: ``(spikes_TxN, rate_N, elig_N)``, and
    with ``cfg.learnable_leak`` the leak's eligibility ``elig_lam_N`` after them."""
    x_TxN = jax.lax.stop_gradient(x_TxN)
    lam = None if lam is None else jax.lax.stop_gradient(lam)
    T = x_TxN.shape[0]

    def step(carry, x):
        # The carry's ``u`` holds the pre-reset membrane between steps (see _scan_over_input).
        carry, s, v = eligibility_step(carry._replace(u=_after_reset(carry.u, cfg)), x, cfg, T,
                                       lam)
        return carry._replace(u=v), s

    carry, spikes = _scan_over_input(
        step, eligibility_init(x_TxN.shape[1:], cfg, x_TxN.dtype), x_TxN)
    if cfg.learnable_leak:
        return spikes, time_mean(spikes), carry.elig, carry.elig_lam
    return spikes, time_mean(spikes), carry.elig
