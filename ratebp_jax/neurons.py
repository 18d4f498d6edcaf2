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

from ratebp_jax import checks

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
        checks.check_number("lam", self.lam, 0.0, 1.0, high_open=True)
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


def _after_reset(v, cfg: NeuronConfig):
    """The membrane ``u`` after the reset that follows pre-reset ``v``; 0 for ``v = 0``,
    as ``thresh > 0``, so a loop carrying ``v`` starts from rest with ``v = 0``."""
    return reset_membrane(v, spike(v, cfg), cfg)


def _scan_over_input(step, init, xs):
    """``lax.scan(step, init, xs)`` for a step whose output has its input's shape and dtype,
    writing each output over the input it came from. Returns ``(carry, ys)``.

    Why not ``lax.scan``: it stacks the outputs in a new buffer, which XLA fills with zeros
    before the loop, while each input step is dead once read. Writing over the input saves
    that buffer and its fill. XLA then does it in place only when no two fusions of the
    loop body read and write the same array in the wrong order, so the callers carry the
    membrane before its reset: the body is one fusion for the new membrane and one that
    writes its spikes (plus one per record), with no copy of the carry. A ResNet-18 LIF
    layer's forward (conv output ``[8, 16, 32, 32, 64]``, BatchNorm applied): 44 -> 28 ms,
    temporary memory 40 -> 4 MiB (docs/RESULTS.md, section 10). Differentiable, as
    ``fori_loop`` with static bounds is a scan, but the BPTT scan (``lif_scan``) is kept
    for training: its memory and speed are what the benchmarks measured.
    """
    def body(t, state):
        carry, xs = state
        carry, y = step(carry, xs[t])
        return carry, xs.at[t].set(y.astype(xs.dtype))
    # From T = 3 the first step runs before the loop, on the constant ``init``, which XLA
    # then folds into it instead of filling every carry's buffer with it and copying that
    # in. At T = 2 the loop left would have one step, which XLA inlines, and the straight
    # code no longer wrote over the input (the ResNet-18 rate step took 319 MiB, not 207).
    start, state = (1, body(0, (init, xs))) if xs.shape[0] > 2 else (0, (init, xs))
    return jax.lax.fori_loop(start, xs.shape[0], body, state)


def lif_forward(x_TxN, cfg: NeuronConfig):
    """The spikes of :func:`lif_scan`, bit for bit, for inference (see
    :func:`_scan_over_input`): faster and in less memory, written over ``x_TxN``."""
    def step(v_prev, x):
        _, s, v = lif_step(_after_reset(v_prev, cfg), x, cfg)
        return v, s

    return _scan_over_input(step, jnp.zeros_like(x_TxN[0]), x_TxN)[1]


def time_mean(x_TxN):
    """``x_TxN.mean(0)``, computed as a product with a vector of ones.

    Why: XLA:CPU reduces over a leading axis about 50 times slower than it computes the
    same sum as a matrix-vector product: the spikes of a ResNet-18 layer, ``[8, 16, 32, 32,
    64]``, take 69 ms against 1.7 ms (docs/RESULTS.md, section 10). A sum of the T slices
    is as fast alone, but XLA fuses it into the rate pass's consumers of the record, and
    the ResNet-18 rate step took 2.02 s with it against 1.65 s with the product. For spikes
    (0 or 1) all three are exact integer sums divided by T, equal bit for bit. The product
    asks for full precision, so that GPUs do not round other inputs to TF32.
    """
    T = x_TxN.shape[0]
    return jnp.tensordot(jnp.ones((T,), x_TxN.dtype), x_TxN, axes=1,
                         precision=jax.lax.Precision.HIGHEST) / T


class EligibilityCarry(NamedTuple):
    """Per-neuron carry of the spike pass: membrane, eps*d product (a scalar when the reset
    derivative d is constant), running mean of eps*sg. The firing rate is the time mean of
    the spikes, which the callers take (multi step mode: :func:`time_mean` of all of them)."""

    u: jax.Array
    eps_d: jax.Array
    elig: jax.Array


def eligibility_init(shape, cfg: NeuronConfig, dtype=jnp.float32) -> EligibilityCarry:
    zeros = jnp.zeros(shape, dtype)
    eps_d = jnp.zeros(jnp.shape(reset_derivative(zeros, zeros, cfg)), dtype)
    return EligibilityCarry(zeros, eps_d, zeros)


def eligibility_step(carry: EligibilityCarry, x, cfg: NeuronConfig, T: int):
    """One spike-pass step that also advances the eligibility recurrence.

    ``eps_t = 1 + lam * eps_{t-1} * d_{t-1}`` (``eps_0 = 1``) is the forward-mode derivative
    ``dv_t/dx`` of the pre-reset membrane for a constant input ``x``; ``eps_t * sg(v_t)`` is
    then ``ds_t/dx``. ``elig`` accumulates ``eps_t sg(v_t) / T``, so after T steps it is
    the time mean. Returns ``(carry, s, v)``, ``v`` the pre-reset membrane. Not
    differentiated.
    """
    u, s, v = lif_step(carry.u, x, cfg)
    eps = 1.0 + cfg.lam * carry.eps_d
    new = EligibilityCarry(
        u=u,
        eps_d=eps * reset_derivative(v, s, cfg),
        elig=carry.elig + eps * surrogate_grad(v, cfg) / T,
    )
    return new, s, v


def lif_scan_with_eligibility(x_TxN, cfg: NeuronConfig):
    """Spike pass over T steps. Returns ``(spikes_TxN, rate_N, elig_N)``.

    ``rate = mean_t s_t`` and ``elig = (1/T) sum_t eps_t sg(v_t)``; no gradient flows.
    """
    x_TxN = jax.lax.stop_gradient(x_TxN)
    T = x_TxN.shape[0]

    def step(carry, x):
        # The carry's ``u`` holds the pre-reset membrane between steps (see _scan_over_input).
        carry, s, v = eligibility_step(carry._replace(u=_after_reset(carry.u, cfg)), x, cfg, T)
        return carry._replace(u=v), s

    carry, spikes = _scan_over_input(
        step, eligibility_init(x_TxN.shape[1:], cfg, x_TxN.dtype), x_TxN)
    return spikes, time_mean(spikes), carry.elig
