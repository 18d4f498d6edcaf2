"""NNX layers that know the three ways a spiking network is run.

Every model's ``__call__(x, ctx)`` threads a :class:`Ctx` down to its LIF and BatchNorm
layers; all other layers (conv, dense, pooling, residual adds) act the same in every phase,
which is what makes one model definition serve BPTT, rate-BP and evaluation.

* ``phase="spike"``: the real SNN. In ``multi`` step mode the time axis is folded into the
  batch (``[T*B, ...]``) and each LIF scans over T; in ``single`` step mode the model is
  one time step and the caller scans it, with the LIF membranes as :class:`Membrane`
  variables. With ``record=True`` LIFs record rate and eligibility and BatchNorms their
  batch statistics, as :class:`Record` variables, for the rate pass.
* ``phase="rate"``: one pass on time-averaged input using those records.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ratebp_jax import neurons, ratebp

PHASES = ("spike", "rate")
STEP_MODES = ("multi", "single")


class Record(nnx.Variable):
    """What the spike pass leaves for the rate pass (rates, eligibilities, BN statistics)."""


class Membrane(nnx.Variable):
    """Neuron state carried between time steps in single step mode."""


@dataclasses.dataclass(frozen=True)
class Ctx:
    """How to run the network this call. Static (hashable), never traced.

    phase: "spike" or "rate".
    step_mode: "multi" (input ``[T*B, ...]``) or "single" (input ``[B, ...]``, one step).
    T: number of time steps.
    train: BatchNorm uses batch statistics and updates its running statistics.
    record: the spike pass records what the rate pass needs.
    """

    phase: str = "spike"
    step_mode: str = "multi"
    T: int = 1
    train: bool = True
    record: bool = False

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase={self.phase!r}: allowed values are {', '.join(PHASES)}")
        if self.step_mode not in STEP_MODES:
            raise ValueError(
                f"step_mode={self.step_mode!r}: allowed values are {', '.join(STEP_MODES)}")
        if not (isinstance(self.T, int) and self.T >= 1):
            raise ValueError(f"T={self.T!r}: must be an integer >= 1")


def _placeholder():
    # Records and membranes take their real shape on first use; a scalar zero broadcasts.
    return jnp.zeros((), jnp.float32)


def _accumulate(var: nnx.Variable, value, ctx: Ctx):
    """Multi mode sets the record; single mode adds this step's share of the time mean."""
    if ctx.step_mode == "single":
        var.value = var.value + value / ctx.T
    else:
        var.value = value


class LIF(nnx.Module):
    """Leaky integrate-and-fire layer (see ``neurons.py``)."""

    def __init__(self, cfg: neurons.NeuronConfig):
        self.cfg = cfg
        self.rate = Record(_placeholder())
        self.elig = Record(_placeholder())
        self.u = Membrane(_placeholder())
        self.eps_d = Membrane(_placeholder())

    def __call__(self, x, ctx: Ctx):
        if ctx.phase == "rate":
            return ratebp.rate_lif(x, self.rate.value, self.elig.value)
        if ctx.step_mode == "multi":
            x_TxN = x.reshape((ctx.T, -1) + x.shape[1:])
            if ctx.record:
                spikes, self.rate.value, self.elig.value = neurons.lif_scan_with_eligibility(
                    x_TxN, self.cfg)
            else:
                spikes = neurons.lif_scan(x_TxN, self.cfg)
            return spikes.reshape(x.shape)
        if ctx.record:
            carry = neurons.EligibilityCarry(
                self.u.value, self.eps_d.value, self.rate.value, self.elig.value)
            carry, s = neurons.eligibility_step(
                carry, jax.lax.stop_gradient(x), self.cfg, ctx.T)
            self.u.value, self.eps_d.value, self.rate.value, self.elig.value = carry
            return s
        self.u.value, s, _ = neurons.lif_step(self.u.value, x, self.cfg)
        return s


class BatchNorm(nnx.Module):
    """BatchNorm over all axes but the last (channels), with the reference's conventions.

    eps 1e-5; running statistics follow PyTorch: momentum 0.1 and the unbiased batch
    variance, updated only by the spike pass (in single step mode once per time step).
    Written by hand because the rate pass needs values from one set of statistics and
    gradients through another, which ``nnx.BatchNorm`` cannot express.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1):
        self.eps = eps
        self.momentum = momentum
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.spike_mean = Record(_placeholder())
        self.spike_var = Record(_placeholder())

    def __call__(self, x, ctx: Ctx):
        axes = tuple(range(x.ndim - 1))
        if ctx.phase == "rate":
            rate_mean, rate_var = _moments(x, axes)
            mean = ratebp.straight_through(self.spike_mean.value, rate_mean)
            var = ratebp.straight_through(self.spike_var.value, rate_var)
        elif ctx.train:
            mean, var = _moments(x, axes)
            self._update_running(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var),
                                 math.prod(x.shape[:-1]))
            if ctx.record:
                _accumulate(self.spike_mean, jax.lax.stop_gradient(mean), ctx)
                _accumulate(self.spike_var, jax.lax.stop_gradient(var), ctx)
        else:
            mean, var = self.mean.value, self.var.value
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale.value + self.bias.value

    def _update_running(self, mean, var, n: int):
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        self.mean.value = (1 - m) * self.mean.value + m * mean
        self.var.value = (1 - m) * self.var.value + m * unbiased


def _moments(x, axes):
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return mean, var
