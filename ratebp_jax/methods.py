"""Gradient methods: pure, jittable functions built from one model definition.

Every method made by :func:`make_grad_fn` has the contract (DESIGN.md section 2)::

    grad_fn(params, batch_stats, batch) -> ((loss, aux), grads)

``batch = {"image": x, "label": y_B}`` with ``x`` either a static image batch
``[B, H, W, C]`` (fed at every step, the reference's direct encoding) or a time-major
sequence ``[T, B, H, W, C]``. ``aux`` holds ``logits`` ``[B, K]`` (the output averaged over
T) and the ``batch_stats`` after the spike pass. The method is the only place that knows
how gradients are formed; models and layers know only the phase they are run in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ratebp_jax.layers import Ctx, Membrane, Record, STEP_MODES

RATE_GRAD_SCALES = ("exact", "reference")


@dataclasses.dataclass(frozen=True)
class Network:
    """A model's graph and its transient placeholders, split off once outside jit.

    ``transient`` holds the scalar placeholders of the Record and Membrane variables; every
    call starts from them, so no record outlives the step that made it.
    """

    graphdef: Any
    transient: Any

    def merge(self, params, batch_stats, transient=None) -> nnx.Module:
        # copy=True: fresh Variables at the current trace level, so the layers may update
        # them inside jax.grad or lax.scan (a shared Variable raises TraceContextError).
        return nnx.merge(self.graphdef, params, batch_stats,
                         self.transient if transient is None else transient, copy=True)


def split_model(model: nnx.Module):
    """Split an NNX model into a :class:`Network` and its ``params`` and ``batch_stats``."""
    graphdef, params, batch_stats, transient = nnx.split(
        model, nnx.Param, nnx.BatchStat, (Record, Membrane))
    return Network(graphdef, transient), params, batch_stats


def _split(model):
    _, params, batch_stats, transient = nnx.split(
        model, nnx.Param, nnx.BatchStat, (Record, Membrane))
    return params, batch_stats, transient


def time_major(images, T: int):
    """``[B, ...]`` static images become ``[T, B, ...]``; a 5-D input is taken as time-major."""
    if images.ndim == 5:
        if images.shape[0] != T:
            raise ValueError(f"image: time axis has {images.shape[0]} steps but T={T}")
        return images
    if images.ndim != 4:
        raise ValueError(
            f"image: expected [B, H, W, C] or [T, B, H, W, C], got shape {images.shape}")
    return jnp.broadcast_to(images, (T,) + images.shape)


def simulate(net: Network, params, batch_stats, x_TxB, ctx: Ctx):
    """Run the spiking network over T steps.

    Returns ``(logits_BxK, batch_stats, transient)``: the output averaged over time, the
    BatchNorm running statistics after the pass, and what the layers recorded.
    """
    if ctx.step_mode == "multi":
        model = net.merge(params, batch_stats)
        T, B = x_TxB.shape[:2]
        logits = model(x_TxB.reshape((T * B,) + x_TxB.shape[2:]), ctx)
        _, batch_stats, transient = _split(model)
        return logits.reshape((T, B, -1)).mean(0), batch_stats, transient

    def step(carry, x_B):
        model = net.merge(params, *carry)
        logits = model(x_B, ctx)
        _, batch_stats, transient = _split(model)
        return (batch_stats, transient), logits

    # The scan carry needs fixed shapes: take them from one abstract step, start from zeros.
    shapes = jax.eval_shape(step, (batch_stats, net.transient), x_TxB[0])[0][1]
    transient = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (batch_stats, transient), logits_TxBxK = jax.lax.scan(
        step, (batch_stats, transient), x_TxB)
    return logits_TxBxK.mean(0), batch_stats, transient


def cross_entropy(logits_BxK, labels_B):
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B).mean()


def _check(step_mode, T, rate_grad_scale="exact"):
    if step_mode not in STEP_MODES:
        raise ValueError(f"step_mode={step_mode!r}: allowed values are {', '.join(STEP_MODES)}")
    if not (isinstance(T, int) and T >= 1):
        raise ValueError(f"T={T!r}: must be an integer >= 1")
    if rate_grad_scale not in RATE_GRAD_SCALES:
        raise ValueError(f"rate_grad_scale={rate_grad_scale!r}: allowed values are "
                         f"{', '.join(RATE_GRAD_SCALES)}")


# --------------------------------------------------------------------------- methods
def bptt(net: Network, *, T: int, step_mode: str = "multi", remat: bool = False,
         **unused) -> Callable:
    """Surrogate-gradient backpropagation through time: autodiff through the T-step scan.

    ``remat=True`` wraps the network in ``jax.checkpoint``, so the backward pass recomputes
    activations instead of storing them: BPTT at its most memory-frugal.
    """
    _check(step_mode, T)
    del unused
    ctx = Ctx("spike", step_mode, T, train=True, record=False)
    run = jax.checkpoint(simulate, static_argnums=(0, 4)) if remat else simulate

    def grad_fn(params, batch_stats, batch):
        x_TxB = time_major(batch["image"], T)

        def loss_fn(params):
            logits, new_stats, _ = run(net, params, batch_stats, x_TxB, ctx)
            return cross_entropy(logits, batch["label"]), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (loss, {"logits": logits, "batch_stats": new_stats}), grads

    return grad_fn


def spike_pass(net: Network, params, batch_stats, x_TxB, *, T: int, step_mode: str):
    """Rate-BP step 1: the real T-step SNN without gradient, recording rates, eligibilities
    and BatchNorm statistics. Returns ``(logits, batch_stats, records)``."""
    ctx = Ctx("spike", step_mode, T, train=True, record=True)
    return simulate(net, jax.lax.stop_gradient(params), batch_stats, x_TxB, ctx)


def rate_pass(net: Network, params, batch_stats, records, x_B):
    """Rate-BP step 2: one differentiable pass on the time-mean input. Returns logits."""
    model = net.merge(params, batch_stats, records)
    return model(x_B, Ctx("rate"))


def rate(net: Network, *, T: int, step_mode: str = "multi", rate_grad_scale: str = "exact",
         **unused) -> Callable:
    """Rate-based backpropagation (Yu et al. 2024): a spike pass, then one rate pass.

    ``rate_grad_scale="exact"`` returns the true gradient of the rate graph;
    ``"reference"`` multiplies it by ``1/T`` as the paper's code does (its loss value is
    unscaled). The backward pass goes through one non-temporal pass only, so in single step
    mode nothing per time step is kept.
    """
    _check(step_mode, T, rate_grad_scale)
    del unused
    scale = 1.0 if rate_grad_scale == "exact" else 1.0 / T

    def grad_fn(params, batch_stats, batch):
        x_TxB = time_major(batch["image"], T)
        _, new_stats, records = spike_pass(net, params, batch_stats, x_TxB,
                                           T=T, step_mode=step_mode)
        x_B = x_TxB.mean(0)

        def loss_fn(params):
            logits = rate_pass(net, params, new_stats, records, x_B)
            return cross_entropy(logits, batch["label"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.tree.map(lambda g: g * scale, grads)
        return (loss, {"logits": logits, "batch_stats": new_stats}), grads

    return grad_fn


def bptt_remat(net: Network, **kwargs) -> Callable:
    """BPTT with rematerialisation (see :func:`bptt`)."""
    return bptt(net, remat=True, **kwargs)


METHODS: dict[str, Callable] = {"bptt": bptt, "bptt_remat": bptt_remat, "rate": rate}


def make_grad_fn(name: str, net: Network, **kwargs) -> Callable:
    """The gradient function of method ``name`` (one of METHODS) for ``net``."""
    if name not in METHODS:
        raise ValueError(f"method={name!r}: allowed values are {', '.join(METHODS)}")
    return METHODS[name](net, **kwargs)


def spike_inference(net: Network, params, batch_stats, images, *, T: int, step_mode: str):
    """Evaluation: the T-step SNN with running BN statistics.

    Returns ``(logits_BxK, rates)`` where ``rates`` maps each LIF layer's path to its mean
    firing rate over time, batch and neurons.
    """
    ctx = Ctx("spike", step_mode, T, train=False, record=True)
    logits, _, transient = simulate(net, params, batch_stats, time_major(images, T), ctx)
    return logits, firing_rates(transient)


def firing_rates(records) -> dict[str, jax.Array]:
    """Mean firing rate of every LIF layer, keyed by its dotted path, from spike records."""
    flat = nnx.to_flat_state(records) if hasattr(nnx, "to_flat_state") else records.flat_state()
    return {".".join(map(str, path[:-1])): jnp.mean(v.value)
            for path, v in flat if path[-1] == "rate"}
