"""Rate-pass primitives of rate-based backpropagation (docs/DESIGN.md section 2.3).

In the rate pass the network runs once on time-averaged inputs. A LIF layer's value is the
firing rate recorded by the spike pass and its local Jacobian is the recorded eligibility;
a BatchNorm normalises with the spike-pass statistics but lets the gradient flow through
the rate batch's own statistics.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def rate_lif(x_rate, rate, elig):
    """Value ``rate``; vector-Jacobian product ``g -> g * elig`` for ``x_rate`` only.

    ``x_rate`` carries the rate-pass graph (its value is only used for its shape); ``rate``
    and ``elig`` come from the spike pass and get no gradient. This is not the derivative of
    any function of ``x_rate``; its check is against this defining formula.
    """
    del x_rate, elig
    return rate


def _rate_lif_fwd(x_rate, rate, elig):
    del x_rate
    return rate, elig


def _rate_lif_bwd(elig, g):
    return g * elig, jnp.zeros_like(elig), jnp.zeros_like(elig)


rate_lif.defvjp(_rate_lif_fwd, _rate_lif_bwd)


def straight_through(value_stat, grad_stat):
    """``value_stat`` in the forward pass, ``d grad_stat`` in the backward pass."""
    return jax.lax.stop_gradient(value_stat) + grad_stat - jax.lax.stop_gradient(grad_stat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recorded_value(fn, value, *args):
    """``value`` in the forward pass, the vector-Jacobian product of ``fn(*args)`` in the
    backward pass. ``fn``'s own output is never used, so for a linear ``fn``, whose VJP does
    not need it, XLA removes its forward computation.

    For a linear layer (a convolution) in the rate pass: its value on the time-mean input
    is the time mean of its spike-pass outputs, which the spike pass records for the
    price of one read of them, so the rate pass skips one convolution per layer and keeps
    only the two of its backward pass. ``fn`` is a pure function of ``args`` (no captured
    tracers); ``value`` gets no gradient. ``value`` may be wider than ``fn``'s output (a
    float32 record of a bfloat16 convolution, which XLA may also have kept in float32 for
    the BatchNorm that reads it); the cotangent is cast to ``fn``'s output dtype.
    """
    del args
    return value


def _recorded_value_fwd(fn, value, *args):
    return value, args


def _recorded_value_bwd(fn, args, g):
    out, vjp = jax.vjp(fn, *args)
    return (None, *vjp(g.astype(out.dtype)))


recorded_value.defvjp(_recorded_value_fwd, _recorded_value_bwd)
