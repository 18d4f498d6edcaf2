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


def check_images(images, T: int):
    """Validate a batch: ``[B, H, W, C]`` static images, or a ``[T, B, H, W, C]`` sequence."""
    if images.ndim == 5 and images.shape[0] != T:
        raise ValueError(f"image: time axis has {images.shape[0]} steps but T={T}")
    if images.ndim not in (4, 5):
        raise ValueError(
            f"image: expected [B, H, W, C] or [T, B, H, W, C], got shape {images.shape}")
    return images


def check_batch(batch, T: int):
    """Shapes and dtypes of a ``{"image", "label"}`` batch, checked at trace time."""
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        raise TypeError("batch: expected a dict with 'image' and 'label'")
    images = check_images(batch["image"], T)
    labels = batch["label"]
    n = images.shape[1] if images.ndim == 5 else images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"label: expected shape ({n},) to match the image batch, got "
                         f"{tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"label: expected an integer dtype, got {labels.dtype}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"image: expected a float dtype, got {images.dtype}")


def time_major(images, T: int):
    """``[B, ...]`` static images become ``[T, B, ...]``; a 5-D input is taken as time-major."""
    images = check_images(images, T)
    return images if images.ndim == 5 else jnp.broadcast_to(images, (T,) + images.shape)


def time_mean(images, T: int):
    """The rate pass's input: the time mean of the input (a static image is its own mean)."""
    images = check_images(images, T)
    return images.mean(0) if images.ndim == 5 else images


def simulate(net: Network, params, batch_stats, images, ctx: Ctx):
    """Run the spiking network over T steps on ``images`` (see :func:`check_images`).

    Returns ``(logits_BxK, batch_stats, transient)``: the output averaged over time, the
    BatchNorm running statistics after the pass, and what the layers recorded.
    """
    T = ctx.T
    if ctx.step_mode == "multi":
        x_TxB = time_major(images, T)
        model = net.merge(params, batch_stats)
        B = x_TxB.shape[1]
        logits = model(x_TxB.reshape((T * B,) + x_TxB.shape[2:]), ctx)
        _, batch_stats, transient = _split(model)
        return logits.reshape((T, B, -1)).mean(0), batch_stats, transient

    images = check_images(images, T)
    static = images.ndim == 4  # fed at every step without materialising T copies

    def step(carry, x_B):
        batch_stats, transient, logits_sum = carry
        model = net.merge(params, batch_stats, transient)
        logits = model(images if static else x_B, ctx)
        _, batch_stats, transient = _split(model)
        return (batch_stats, transient, logits_sum + logits / T), None

    if ctx.remat:  # keep only the carry per step; recompute the step in the backward pass
        step = jax.checkpoint(step)
    x_first = images if static else images[0]
    # The scan carry needs fixed shapes: take them from one abstract step, start from zeros.
    shapes = jax.eval_shape(lambda: step((batch_stats, net.transient, 0.0), x_first)[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1:])
    (batch_stats, transient, logits), _ = jax.lax.scan(
        step, (batch_stats,) + zeros, None if static else images, length=T)
    return logits, batch_stats, transient


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

    ``remat=True`` rematerialises: in single step mode each time step is a
    ``jax.checkpoint`` (only the neuron and BN state is stored per step); in multi step mode
    each LIF's scan is (its membrane trace is recomputed from its input).
    """
    _check(step_mode, T)
    del unused
    ctx = Ctx("spike", step_mode, T, train=True, record=False, remat=remat)

    def grad_fn(params, batch_stats, batch):
        check_batch(batch, T)

        def loss_fn(params):
            logits, new_stats, _ = simulate(net, params, batch_stats, batch["image"], ctx)
            return cross_entropy(logits, batch["label"]), (logits, new_stats)

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (loss, {"logits": logits, "batch_stats": new_stats}), grads

    return grad_fn


def spike_pass(net: Network, params, batch_stats, images, *, T: int, step_mode: str):
    """Rate-BP step 1: the real T-step SNN without gradient, recording rates, eligibilities
    and BatchNorm statistics. Returns ``(logits, batch_stats, records)``."""
    ctx = Ctx("spike", step_mode, T, train=True, record=True)
    return simulate(net, jax.lax.stop_gradient(params), batch_stats, images, ctx)


def rate_pass(net: Network, params, batch_stats, records, x_B, *, T: int, step_mode: str):
    """Rate-BP step 2: one differentiable pass on the time-mean input. Returns logits."""
    model = net.merge(params, batch_stats, records)
    return model(x_B, Ctx("rate", step_mode, T))


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
        check_batch(batch, T)
        _, new_stats, records = spike_pass(net, params, batch_stats, batch["image"],
                                           T=T, step_mode=step_mode)
        x_B = time_mean(batch["image"], T)

        def loss_fn(params):
            logits = rate_pass(net, params, new_stats, records, x_B, T=T, step_mode=step_mode)
            return cross_entropy(logits, batch["label"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = jax.tree.map(lambda g: g * scale, grads)
        return (loss, {"logits": logits, "batch_stats": new_stats}), grads

    return grad_fn


def bptt_remat(net: Network, **kwargs) -> Callable:
    """BPTT with rematerialisation (see :func:`bptt`): less memory for more compute."""
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
    logits, _, transient = simulate(net, params, batch_stats, images, ctx)
    return logits, firing_rates(transient)


def firing_rates(records) -> dict[str, jax.Array]:
    """Mean firing rate of every LIF layer, keyed by its dotted path, from spike records."""
    flat = nnx.to_flat_state(records) if hasattr(nnx, "to_flat_state") else records.flat_state()
    return {".".join(map(str, path[:-1])): jnp.mean(v.get_value())
            for path, v in flat if path[-1] == "rate"}
