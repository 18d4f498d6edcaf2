"""Rate-pass primitives of rate-based backpropagation (docs/DESIGN.md section 2.3).

In the rate pass the network runs once on time-averaged inputs. A LIF layer's value is the
firing rate recorded by the spike pass and its local Jacobian is the recorded eligibility;
a BatchNorm normalises with the spike-pass statistics but lets the gradient flow through
the rate batch's own statistics.
"""
from __future__ import annotations

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
