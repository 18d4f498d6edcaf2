"""Rate-pass primitives of rate-based backpropagation: values recorded by the spike pass,
gradients of the rate pass (docs/DESIGN.md section 2.3)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def rate_lif(x_rate, rate, elig):
    """Value ``rate``; vector-Jacobian product ``g -> g * elig`` for ``x_rate`` only, whose
    value is unused. Not the derivative of any function of ``x_rate``, so its test checks
    this defining formula."""
    del x_rate, elig
    return rate


def _rate_lif_fwd(x_rate, rate, elig):
    del x_rate
    return rate, elig


def _rate_lif_bwd(elig, g):
    return g * elig, jnp.zeros_like(elig), jnp.zeros_like(elig)


rate_lif.defvjp(_rate_lif_fwd, _rate_lif_bwd)


def with_leak_gradient(rate, lam, elig_lam):
    """``rate`` in value; a learnable leak ``lam`` gets ``sum(g * elig_lam)`` from the
    rate's cotangent ``g``, ``elig_lam`` being the spike pass's record of ``dr/dlam``
    (docs/DESIGN.md section 8). The added term is exactly zero in value."""
    return rate + (lam - jax.lax.stop_gradient(lam)) * jax.lax.stop_gradient(elig_lam)


def straight_through(value_stat, grad_stat):
    """``value_stat`` in the forward pass, ``d grad_stat`` in the backward pass."""
    return jax.lax.stop_gradient(value_stat) + grad_stat - jax.lax.stop_gradient(grad_stat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recorded_value(fn, value, *args):
    """``value`` in the forward pass, the vector-Jacobian product of the pure ``fn(*args)``
    in the backward pass; for a linear ``fn`` XLA then drops its forward computation.
    ``value`` (no gradient) may be wider than ``fn``'s output, as a float32 record of a
    bfloat16 convolution is; the cotangent is cast to the output's dtype."""
    del args
    return value


def _recorded_value_fwd(fn, value, *args):
    return value, args


def _recorded_value_bwd(fn, args, g):
    out, vjp = jax.vjp(fn, *args)
    return (None, *vjp(g.astype(out.dtype)))


recorded_value.defvjp(_recorded_value_fwd, _recorded_value_bwd)
