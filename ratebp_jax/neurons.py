"""LIF neurons, surrogate spike functions and eligibility recurrences, as pure functions.

The neuron (docs/DESIGN.md section 1) integrates ``v_t = lam * u_{t-1} + x_t``, spikes
``s_t = H(v_t - thresh)`` on the pre-reset membrane ``v_t``, and resets to ``u_t``:
soft ``u_t = v_t - thresh * s_t`` or hard ``u_t = v_t * (1 - s_t) + v_reset * s_t``.
With ``detach_reset`` no gradient flows through the spike inside the reset term.

Everything here is a plain function of arrays so that it can be tested, scanned,
differentiated and vmapped on its own; the NNX layers in ``layers.py`` only wire it up.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

RESET_MODES = ("soft", "soft_nodetach", "hard", "hard_detach")


# --------------------------------------------------------------------------- surrogates
# Each entry maps (v - thresh, alpha) to the surrogate derivative dS/dv. The default is the
# reference code's sigmoid with alpha = 4.
def _sigmoid_grad(x, alpha):
    sig = jax.nn.sigmoid(alpha * x)
    return alpha * sig * (1.0 - sig)


def _atan_grad(x, alpha):
    return alpha / 2.0 / (1.0 + (jnp.pi / 2.0 * alpha * x) ** 2)


def _triangle_grad(x, alpha):
    # Peak 1/width at the threshold, zero beyond |x| >= 1/alpha; integrates to 1.
    return jnp.maximum(0.0, alpha - alpha * alpha * jnp.abs(x))


def _rectangle_grad(x, alpha):
    # Box of width 1/alpha and height alpha around the threshold; integrates to 1.
    return jnp.where(jnp.abs(x) < 0.5 / alpha, alpha, 0.0).astype(x.dtype)


SURROGATES: dict[str, Callable] = {
    "sigmoid": _sigmoid_grad,
    "atan": _atan_grad,
    "triangle": _triangle_grad,
    "rectangle": _rectangle_grad,
}


@dataclasses.dataclass(frozen=True)
class NeuronConfig:
    """Static LIF settings; hashable so it can live in an NNX module and in jit's static args.

    lam: membrane decay, ``1 - 1/tau``, in [0, 1).
    thresh: firing threshold, > 0.
    reset: one of RESET_MODES. ``soft``/``hard`` detach the reset; ``soft_nodetach``
      lets gradient through the soft reset; ``hard`` is the reference's hard reset, which
      does not detach; ``hard_detach`` detaches it.
    v_reset: the membrane value after a hard reset.
    surrogate, alpha: the surrogate derivative, from SURROGATES, and its sharpness.
    """

    lam: float = 0.2
    thresh: float = 1.0
    reset: str = "soft"
    v_reset: float = 0.0
    surrogate: str = "sigmoid"
    alpha: float = 4.0

    def __post_init__(self):
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam={self.lam!r}: must satisfy 0 <= lam < 1")
        if not self.thresh > 0.0:
            raise ValueError(f"thresh={self.thresh!r}: must be > 0")
        if self.reset not in RESET_MODES:
            raise ValueError(f"reset={self.reset!r}: allowed values are {', '.join(RESET_MODES)}")
        if self.surrogate not in SURROGATES:
            raise ValueError(
                f"surrogate={self.surrogate!r}: allowed values are {', '.join(SURROGATES)}")
        if not self.alpha > 0.0:
            raise ValueError(f"alpha={self.alpha!r}: must be > 0")

    @property
    def hard(self) -> bool:
        return self.reset.startswith("hard")

    @property
    def detach_reset(self) -> bool:
        # The reference's hard reset is not detached; its soft reset is.
        return self.reset in ("soft", "hard_detach")


def surrogate_grad(v, cfg: NeuronConfig):
    """dS/dv of the surrogate, evaluated at the pre-reset membrane ``v``."""
    return SURROGATES[cfg.surrogate](v - cfg.thresh, cfg.alpha)


# --------------------------------------------------------------------------- spike function
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def spike(v, cfg: NeuronConfig):
    """Heaviside ``v >= thresh`` whose VJP is the surrogate derivative (a custom_vjp).

    The reference fires on ``v - thresh >= 0``; we keep that tie rule for parity.
    """
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
    """``d_t = du_t/dv_t`` along the differentiated graph (docs/DESIGN.md section 2.2).

    soft+detach: 1; soft: 1 - thresh*sg; hard+detach: 1 - s; hard: (1 - s) + (v_reset - v)*sg.
    """
    if cfg.hard:
        d = 1.0 - s
        if not cfg.detach_reset:
            d = d + (cfg.v_reset - v) * surrogate_grad(v, cfg)
        return d
    if cfg.detach_reset:
        # A scalar: eps_t is then the same for every neuron and the carry stays scalar,
        # which saves one tensor read and write per neuron and step in the spike pass.
        return jnp.ones((), v.dtype)
    return 1.0 - cfg.thresh * surrogate_grad(v, cfg)


def lif_step(u_prev, x, cfg: NeuronConfig):
    """One LIF step. Returns ``(u, s, v)``: post-reset membrane, spike, pre-reset membrane."""
    v = cfg.lam * u_prev + x
    s = spike(v, cfg)
    return reset_membrane(v, s, cfg), s, v


def lif_scan(x_TxN, cfg: NeuronConfig, temporal_grad: bool = True):
    """Run the LIF over time from rest (``u_0 = 0``). Differentiable (BPTT).

    x_TxN: input current, time-major, any trailing shape. Returns spikes_TxN.
    temporal_grad=False stops the gradient through the membrane carry ``u_{t-1} -> v_t``
    (only the spatial path of each step is differentiated, as in SLTT and OTTT).
    """
    def body(u, x):
        if not temporal_grad:
            u = jax.lax.stop_gradient(u)
        u, s, _ = lif_step(u, x, cfg)
        return u, s

    _, spikes = jax.lax.scan(body, jnp.zeros_like(x_TxN[0]), x_TxN)
    return spikes


class EligibilityCarry(NamedTuple):
    """Per-neuron carry of the spike pass: membrane, eps*d product (a scalar when the reset
    derivative d is constant), running means of s and eps*sg."""

    u: jax.Array
    eps_d: jax.Array
    rate: jax.Array
    elig: jax.Array


def eligibility_init(shape, cfg: NeuronConfig, dtype=jnp.float32) -> EligibilityCarry:
    zeros = jnp.zeros(shape, dtype)
    eps_d = jnp.zeros(jnp.shape(reset_derivative(zeros, zeros, cfg)), dtype)
    return EligibilityCarry(zeros, eps_d, zeros, zeros)


def eligibility_step(carry: EligibilityCarry, x, cfg: NeuronConfig, T: int):
    """One spike-pass step that also advances the eligibility recurrence.

    ``eps_t = 1 + lam * eps_{t-1} * d_{t-1}`` (``eps_0 = 1``) is the forward-mode derivative
    ``dv_t/dx`` of the pre-reset membrane for a constant input ``x``; ``eps_t * sg(v_t)`` is
    then ``ds_t/dx``. ``rate`` and ``elig`` accumulate ``s_t / T`` and ``eps_t sg(v_t) / T``,
    so after T steps they are the time means. Returns ``(carry, s)``. Not differentiated.
    """
    u, s, v = lif_step(carry.u, x, cfg)
    eps = 1.0 + cfg.lam * carry.eps_d
    new = EligibilityCarry(
        u=u,
        eps_d=eps * reset_derivative(v, s, cfg),
        rate=carry.rate + s / T,
        elig=carry.elig + eps * surrogate_grad(v, cfg) / T,
    )
    return new, s


def lif_scan_with_eligibility(x_TxN, cfg: NeuronConfig):
    """Spike pass over T steps. Returns ``(spikes_TxN, rate_N, elig_N)``.

    ``rate = mean_t s_t`` and ``elig = (1/T) sum_t eps_t sg(v_t)``; no gradient flows.
    """
    x_TxN = jax.lax.stop_gradient(x_TxN)
    T = x_TxN.shape[0]
    carry, spikes = jax.lax.scan(
        lambda c, x: eligibility_step(c, x, cfg, T),
        eligibility_init(x_TxN.shape[1:], cfg, x_TxN.dtype), x_TxN)
    return spikes, carry.rate, carry.elig
