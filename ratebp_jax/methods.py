"""Gradient methods: pure, jittable functions built from one model definition.

Every method made by :func:`make_grad_fn` is ``grad_fn(params, batch_stats, batch) ->
((loss, aux), grads)`` (docs/DESIGN.md section 2.1). Only this module knows how gradients
are formed; models and layers know only the phase they run in.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ratebp_jax import checks
from ratebp_jax.layers import LIF, Ctx, Membrane, Record, STEP_MODES, at_least_float32

RATE_GRAD_SCALES = ("exact", "reference")


@dataclasses.dataclass(frozen=True)
class Network:
    """A model's graph and the scalar placeholders of its Record and Membrane variables
    (``transient``); every call starts from them, so no record outlives its step."""

    graphdef: Any
    transient: Any

    def merge(self, params, batch_stats, transient=None) -> nnx.Module:
        # copy=True: fresh Variables at the current trace level, so the layers may update
        # them inside jax.grad or lax.scan (a shared Variable raises TraceContextError).
        return nnx.merge(self.graphdef, params, batch_stats,
                         self.transient if transient is None else transient, copy=True)


def split_model(model: nnx.Module):
    """Split an NNX model into a :class:`Network` and its ``params`` and ``batch_stats``.
    Inside a method, the new Network's ``transient`` is what the layers recorded."""
    graphdef, params, batch_stats, transient = nnx.split(
        model, nnx.Param, nnx.BatchStat, (Record, Membrane))
    return Network(graphdef, transient), params, batch_stats


def is_sequence(images) -> bool:
    """Whether a batch is time-major: ``[T, B, H, W, C]`` frames or ``[T, B, F]`` feature
    vectors, rather than ``[B, H, W, C]`` images or ``[B, F]`` vectors fed at every step."""
    return images.ndim in (3, 5)


def check_images(images, T: int):
    """Validate a batch: ``[B, H, W, C]`` static images or a ``[T, B, H, W, C]`` sequence,
    or feature vectors, ``[B, F]`` static or a ``[T, B, F]`` sequence."""
    if images.ndim not in (2, 3, 4, 5):
        raise ValueError(
            f"image: expected [B, H, W, C] or [T, B, H, W, C] images, or [B, F] or "
            f"[T, B, F] feature vectors, got shape {images.shape}")
    if is_sequence(images) and images.shape[0] != T:
        raise ValueError(f"image: time axis has {images.shape[0]} steps but T={T}")
    return images


def check_batch(batch, T: int):
    """Shapes and dtypes of a ``{"image", "label"}`` batch, checked at trace time."""
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        raise TypeError("batch: expected a dict with 'image' and 'label'")
    images = check_images(batch["image"], T)
    labels = batch["label"]
    n = images.shape[1] if is_sequence(images) else images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"label: expected shape ({n},) to match the image batch, got "
                         f"{tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"label: expected an integer dtype, got {labels.dtype}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"image: expected a float dtype, got {images.dtype}")


def time_major(images, T: int):
    """``[B, ...]`` static images become ``[T, B, ...]``; a sequence (:func:`is_sequence`)
    is already time-major."""
    images = check_images(images, T)
    return images if is_sequence(images) else jnp.broadcast_to(images, (T,) + images.shape)


def time_mean(images, T: int):
    """The rate pass's input: the time mean of the input (a static image is its own mean)."""
    images = check_images(images, T)
    return images.mean(0) if is_sequence(images) else images


def logits_of(model, x, ctx: Ctx):
    """``model(x, ctx)`` in float32, so that a bfloat16 classifier's logits are not rounded
    at every term of their time average, nor in the softmax and the loss."""
    return at_least_float32(model(x, ctx))


def simulate(net: Network, params, batch_stats, images, ctx: Ctx):
    """Run the spiking network over T steps on ``images`` (see :func:`check_images`).
    Returns ``(logits_BxK, batch_stats, transient)``: the time-mean output, the BatchNorm
    statistics after the pass, and what the layers recorded."""
    T = ctx.T
    if ctx.step_mode == "multi":
        x_TxB = time_major(images, T)
        model = net.merge(params, batch_stats)
        B = x_TxB.shape[1]
        logits = logits_of(model, x_TxB.reshape((T * B,) + x_TxB.shape[2:]), ctx)
        after, _, batch_stats = split_model(model)
        return logits.reshape((T, B, -1)).mean(0), batch_stats, after.transient

    images = check_images(images, T)
    static = not is_sequence(images)  # fed at every step without materialising T copies

    def step(carry, x_B):
        batch_stats, transient, logits_sum = carry
        model = net.merge(params, batch_stats, transient)
        logits = logits_of(model, images if static else x_B, ctx)
        after, _, batch_stats = split_model(model)
        return (batch_stats, after.transient, logits_sum + logits / T), None

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
    checks.check_choice("step_mode", step_mode, STEP_MODES)
    checks.check_int("T", T, 1)
    checks.check_choice("rate_grad_scale", rate_grad_scale, RATE_GRAD_SCALES)


# --------------------------------------------------------------------------- methods
def bptt(net: Network, *, T: int, step_mode: str = "multi", remat: bool = False) -> Callable:
    """Surrogate-gradient backpropagation through time. ``remat=True`` recomputes each time
    step (single step mode) or each ``layers.call_unit`` (multi) instead of storing it."""
    _check(step_mode, T)
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
    """Rate-BP step 1 (docs/DESIGN.md section 2.2): the T-step SNN without gradient,
    recording what the rate pass needs. Returns ``(logits, batch_stats, records)``."""
    ctx = Ctx("spike", step_mode, T, train=True, record=True)
    return simulate(net, jax.lax.stop_gradient(params), batch_stats, images, ctx)


def rate_pass(net: Network, params, batch_stats, records, x_B, *, T: int, step_mode: str):
    """Rate-BP step 2 (docs/DESIGN.md section 2.3): one differentiable pass on the
    time-mean input ``x_B``. Returns logits."""
    model = net.merge(params, batch_stats, records)
    return logits_of(model, x_B, Ctx("rate", step_mode, T))


def rate(net: Network, *, T: int, step_mode: str = "multi",
         rate_grad_scale: str = "exact") -> Callable:
    """Rate-based backpropagation (Yu et al. 2024): a spike pass, then one rate pass.
    ``rate_grad_scale``: docs/DESIGN.md section 5.4."""
    _check(step_mode, T, rate_grad_scale)
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


def bptt_remat(net: Network, *, T: int, step_mode: str = "multi") -> Callable:
    """BPTT with rematerialisation (see :func:`bptt`): less memory for more compute."""
    return bptt(net, T=T, step_mode=step_mode, remat=True)


# --------------------------------------------------------------------------- SLTT and OTTT
# The spatial path, the per-step loss, the step modes and the formulas: docs/DESIGN.md
# section 6.
def _check_K(K, T):
    if K is not None and not (isinstance(K, int) and not isinstance(K, bool) and 1 <= K <= T):
        raise ValueError(f"K={K!r}: must be an integer with 1 <= K <= T={T}")


def _step_key(batch, seed: int):
    """The key SLTT-K draws its time steps from, a pure function of ``(seed, batch)``:
    ``batch["rng"]`` (a typed key, ``uint32[2]`` key data, or an integer folded into
    ``key(seed)``), else a fingerprint of the batch (docs/DESIGN.md section 6.2)."""
    base = jax.random.key(seed)
    rng = batch.get("rng")
    if rng is not None:
        rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            return rng
        if rng.shape == (2,) and rng.dtype == jnp.uint32:
            return jax.random.wrap_key_data(rng)
        return jax.random.fold_in(base, rng.astype(jnp.uint32))
    bits = jax.lax.bitcast_convert_type(batch["image"].astype(jnp.float32), jnp.uint32)
    labels = batch["label"].astype(jnp.uint32)
    fingerprint = (jnp.sum(bits, dtype=jnp.uint32)
                   + jnp.uint32(2654435761) * jnp.sum(labels, dtype=jnp.uint32))
    return jax.random.fold_in(base, fingerprint)


def sltt_steps(batch, *, T: int, K: int, seed: int = 0):
    """Boolean mask ``[T]`` of the K distinct time steps SLTT-K backpropagates at, drawn
    uniformly without replacement from the key of :func:`_step_key`."""
    _check_K(K, T)
    perm = jax.random.permutation(_step_key(batch, seed), T)
    return jnp.zeros((T,), bool).at[perm[:K]].set(True)


def _weight_grad_at(op):
    """``op(x, w)``, whose VJP w.r.t. ``w`` is taken at a third argument ``a_hat`` (no
    gradient). ``op`` is bilinear, so the input gradient is unchanged (docs/DESIGN.md
    section 6.3)."""
    @jax.custom_vjp
    def apply(x, w, a_hat):
        del a_hat
        return op(x, w)

    def fwd(x, w, a_hat):
        return op(x, w), (w, a_hat)

    def bwd(res, g):
        w, a_hat = res
        _, vjp = jax.vjp(op, a_hat, w)
        g_x, g_w = vjp(g)
        return g_x, g_w, jnp.zeros_like(a_hat)

    apply.defvjp(fwd, bwd)
    return apply


LEARNABLE_LEAK_OTTT = ("OTTT's presynaptic traces decay by one fixed factor (trace_decay), "
                      "while a learnable leak changes each layer's decay as it trains, so the "
                      "traces would no longer follow the neurons; use bptt, bptt_remat, sltt "
                      "or rate")


def _trace_decay(model, trace_decay):
    if any(isinstance(m, LIF) and m.cfg.learnable_leak for _, m in nnx.iter_modules(model)):
        raise ValueError(f"method='ottt' with a learnable leak: {LEARNABLE_LEAK_OTTT}")
    if trace_decay is not None:
        if not 0.0 <= trace_decay < 1.0:
            raise ValueError(f"trace_decay={trace_decay!r}: must satisfy 0 <= trace_decay < 1")
        return trace_decay
    lams = {m.cfg.lam for _, m in nnx.iter_modules(model) if isinstance(m, LIF)}
    if len(lams) != 1:
        raise ValueError(f"trace_decay=None: the network's LIF layers have decays "
                         f"{sorted(lams)}, so there is no single neuron decay to use; "
                         f"pass trace_decay")
    return lams.pop()


def _install_trace_hooks(model, *, x_in, traces_in, ctx: Ctx, lam: float, input_trace: bool):
    """Make every ``nnx.Conv`` / ``nnx.Linear`` of the merged ``model`` take its weight
    gradient at the trace of its input (docs/DESIGN.md section 6.3), continuing
    ``traces_in`` (by layer path and call; None: zeros) in single step mode. Returns the
    dict of new traces (empty in multi step mode) and the list of layers fed ``x_in``."""
    traces_out, calls, input_layers = {}, {}, []
    fed_input = [x_in]  # x_in and its casts to the layers' compute dtypes: found by identity

    def remember_casts(promote):
        def promote_recording(arrays, **kwargs):
            promoted = promote(arrays, **kwargs)
            if promoted[0] is not arrays[0] and any(arrays[0] is x for x in fed_input):
                fed_input.append(promoted[0])
            return promoted
        return promote_recording

    def hook(op, path):
        def traced(x, w, *args, **kwargs):
            n = calls[path] = calls.get(path, -1) + 1
            key = f"{path}#{n}"
            a = at_least_float32(jax.lax.stop_gradient(x))  # a running sum, like a membrane
            if ctx.step_mode == "single":
                prev = None if traces_in is None else traces_in[key]
                a_hat = a if prev is None else lam * prev + a
                traces_out[key] = a_hat
            else:
                a_T = a.reshape((ctx.T, -1) + a.shape[1:])
                _, a_hat = jax.lax.scan(lambda c, a_t: (lam * c + a_t,) * 2,
                                        jnp.zeros_like(a_T[0]), a_T)
                a_hat = a_hat.reshape(a.shape)
            if any(x is x_fed for x_fed in fed_input):
                input_layers.append(path)
                if not input_trace:
                    a_hat = a
            return _weight_grad_at(lambda x_, w_: op(x_, w_, *args, **kwargs))(
                x, w, a_hat.astype(x.dtype))
        return traced

    for path, module in nnx.iter_modules(model):
        name = "/".join(map(str, path))
        if isinstance(module, (nnx.Conv, nnx.Linear)):
            module.promote_dtype = remember_casts(module.promote_dtype)
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = hook(module.conv_general_dilated, name)
        elif isinstance(module, nnx.Linear):
            module.dot_general = hook(module.dot_general, name)
    return traces_out, input_layers


def _spatial_forward(net: Network, ctx: Ctx, *, traces: bool, trace_decay,
                     input_trace: bool) -> Callable:
    """``run(params, batch_stats, transient, x, traces_in) -> (logits, batch_stats,
    transient, traces_out)``: one differentiable call of the model, one step (single step
    mode) or all T (multi), with OTTT's trace hooks when ``traces``."""
    def run(params, batch_stats, transient, x, traces_in):
        model = net.merge(params, batch_stats, transient)
        traces_out = None
        if traces:
            traces_out, input_layers = _install_trace_hooks(
                model, x_in=x, traces_in=traces_in, ctx=ctx,
                lam=_trace_decay(model, trace_decay), input_trace=input_trace)
        logits = logits_of(model, x, ctx)
        if traces and not input_trace and not input_layers:
            # A model that reshapes or pools its input first would silently get the trace.
            raise ValueError("input_trace=False: no convolution or dense layer is applied "
                             "to the network input itself, so the layers fed by the input "
                             "cannot be told apart; pass input_trace=True")
        after, _, new_stats = split_model(model)
        return logits, new_stats, after.transient, traces_out

    return run


def _spatial_grads_multi(run, net: Network, T: int, params, batch_stats, images, labels,
                         mask):
    """The per-step loss on the folded ``[T*B, ...]`` layout, with one backward pass.
    Returns ``(loss, logits_BxK, batch_stats, grads)``."""
    x_TxB = time_major(images, T)
    B = x_TxB.shape[1]
    x_in = x_TxB.reshape((T * B,) + x_TxB.shape[2:])

    def loss_fn(params):
        logits, new_stats, _, _ = run(params, batch_stats, net.transient, x_in, None)
        logits = logits.reshape((T, B, -1))
        per_step = jax.vmap(cross_entropy, (0, None))(logits, labels)
        loss = per_step.mean()
        loss_for_grad = loss if mask is None else jnp.sum(per_step * mask) / T
        return loss_for_grad, (loss, logits.mean(0), new_stats)

    (_, (loss, logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, new_stats, grads


def _spatial_grads_single(run, net: Network, T: int, params, batch_stats, images, labels,
                          mask):
    """A scan over t whose body adds step t's gradient to a carry, so nothing per step is
    kept; steps off the SLTT-K ``mask`` run forward only. Returns as
    :func:`_spatial_grads_multi`."""
    static = not is_sequence(images)  # fed at every step without materialising T copies
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def step(carry, xs):
        stats, transient, traces_in, grads, loss_sum, logits_sum = carry
        x_B, m = xs

        def loss_t(params):
            logits, new_stats, new_transient, traces_out = run(
                params, stats, transient, images if static else x_B, traces_in)
            return (cross_entropy(logits, labels) / T,
                    (logits, new_stats, new_transient, traces_out))

        def with_grad(_):
            (loss, aux), g = jax.value_and_grad(loss_t, has_aux=True)(params)
            return loss, aux, g

        def forward_only(_):
            loss, aux = loss_t(jax.lax.stop_gradient(params))
            return loss, aux, zero_grads

        if m is None:
            loss, aux, g = with_grad(None)
        else:
            loss, aux, g = jax.lax.cond(m, with_grad, forward_only, None)
        logits, stats, transient, traces_out = aux
        grads = jax.tree.map(jnp.add, grads, g)
        return (stats, transient, traces_out, grads, loss_sum + loss,
                logits_sum + logits / T), None

    x_first = images if static else images[0]
    # The carry needs fixed shapes: take them from one abstract step, start from zeros.
    logits, _, transient, traces_out = jax.eval_shape(
        lambda: run(params, batch_stats, net.transient, x_first, None))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         (transient, traces_out, zero_grads, jnp.zeros(()), logits))
    (new_stats, _, _, grads, loss, logits), _ = jax.lax.scan(
        step, (batch_stats,) + zeros, (None if static else images, mask), length=T)
    return loss, logits, new_stats, grads


def _spatial_method(net: Network, *, T: int, step_mode: str, K, seed: int, traces: bool,
                    trace_decay, input_trace: bool) -> Callable:
    """The shared engine of SLTT, SLTT-K and OTTT (docs/DESIGN.md section 6)."""
    _check(step_mode, T)
    _check_K(K, T)
    ctx = Ctx("spike", step_mode, T, train=True, record=False, temporal_grad=False)
    run = _spatial_forward(net, ctx, traces=traces, trace_decay=trace_decay,
                           input_trace=input_trace)
    grads_of = functools.partial(
        _spatial_grads_single if step_mode == "single" else _spatial_grads_multi, run, net, T)

    def grad_fn(params, batch_stats, batch):
        check_batch(batch, T)
        mask = None if K is None else sltt_steps(batch, T=T, K=K, seed=seed)
        loss, logits, new_stats, grads = grads_of(params, batch_stats, batch["image"],
                                                  batch["label"], mask)
        return (loss, {"logits": logits, "batch_stats": new_stats}), grads

    return grad_fn


def sltt(net: Network, *, T: int, step_mode: str = "single", K: int | None = None,
         seed: int = 0) -> Callable:
    """Spatial learning through time (Meng et al., ICCV 2023): BPTT without the gradient
    through the membrane between steps; with ``K``, only at K random time steps drawn from
    ``seed`` and the batch (SLTT-K). docs/DESIGN.md section 6.2."""
    return _spatial_method(net, T=T, step_mode=step_mode, K=K, seed=seed, traces=False,
                           trace_decay=None, input_trace=False)


def sltt_k(net: Network, *, T: int, step_mode: str = "single", K: int = 1,
           seed: int = 0) -> Callable:
    """SLTT-K (see :func:`sltt`): SLTT with gradients at K random time steps (default 1)."""
    return sltt(net, T=T, step_mode=step_mode, K=K, seed=seed)


def ottt(net: Network, *, T: int, step_mode: str = "single", trace_decay: float | None = None,
         input_trace: bool = False) -> Callable:
    """Online training through time (Xiao et al., NeurIPS 2022), OTTT_A: SLTT's gradient
    with each weight gradient taken at the presynaptic trace of its layer's input, decaying
    by ``trace_decay`` (None: the neurons' decay). docs/DESIGN.md section 6.3."""
    return _spatial_method(net, T=T, step_mode=step_mode, K=None, seed=0, traces=True,
                           trace_decay=trace_decay, input_trace=input_trace)


METHODS: dict[str, Callable] = {"bptt": bptt, "bptt_remat": bptt_remat, "rate": rate,
                                "sltt": sltt, "sltt_k": sltt_k, "ottt": ottt}


def method_keywords(name: str) -> frozenset[str]:
    """The keyword arguments method ``name``'s builder takes, read off its signature."""
    return frozenset(list(inspect.signature(METHODS[name]).parameters)[1:])


def make_grad_fn(name: str, net: Network, **kwargs) -> Callable:
    """The gradient function of method ``name`` (one of METHODS) for ``net``.

    The method gets the keyword arguments it takes. One that another method takes is
    ignored, so that one call can serve every method (the trainer passes
    ``rate_grad_scale`` to all); one that no method takes raises TypeError.

    T: the number of time steps; required by every method.
    step_mode: "multi" (time folded into the batch) or "single" (one network step per scan
      iteration); docs/DESIGN.md section 3. Default "multi" for bptt, bptt_remat and rate,
      "single" (the papers' online form) for sltt, sltt_k and ottt.
    remat: bptt only, default False: recompute instead of storing (bptt_remat sets it).
    rate_grad_scale: rate only, default "exact"; "reference" scales the gradient by 1/T
      (docs/DESIGN.md section 5.4).
    K: sltt (default None, every step) and sltt_k (default 1): gradients at K random steps.
    seed: sltt and sltt_k, default 0: the seed of those steps' draw.
    trace_decay: ottt only, default None (the neurons' decay): the traces' decay.
    input_trace: ottt only, default False: also trace the layers fed the network input.
    """
    checks.check_choice("method", name, METHODS)
    known = frozenset().union(*map(method_keywords, METHODS))
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"make_grad_fn: no method takes the keyword argument "
                        f"{', '.join(map(repr, unknown))}{checks.closest(unknown[0], known)} "
                        f"(the methods take {', '.join(sorted(known))})")
    taken = method_keywords(name)
    return METHODS[name](net, **{k: v for k, v in kwargs.items() if k in taken})


def spike_inference(net: Network, params, batch_stats, images, *, T: int, step_mode: str):
    """Evaluation: the T-step SNN with running BN statistics. Returns ``(logits_BxK,
    rates)``, ``rates`` each LIF layer's mean firing rate (:func:`firing_rates`)."""
    ctx = Ctx("spike", step_mode, T, train=False, record=True)
    logits, _, transient = simulate(net, params, batch_stats, images, ctx)
    return logits, firing_rates(transient)


def firing_rates(records) -> dict[str, jax.Array]:
    """Mean firing rate of every LIF layer, keyed by its dotted path, from spike records."""
    flat = nnx.to_flat_state(records) if hasattr(nnx, "to_flat_state") else records.flat_state()
    return {".".join(map(str, path[:-1])): jnp.mean(v.get_value())
            for path, v in flat if path[-1] == "rate"}
