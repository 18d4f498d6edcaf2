"""Gradient methods: pure, jittable functions built from one model definition.

Every method made by :func:`make_grad_fn` has the contract (docs/DESIGN.md section 2.1)::

    grad_fn(params, batch_stats, batch) -> ((loss, aux), grads)

``batch = {"image": x, "label": y_B}`` with ``x`` either a static image batch
``[B, H, W, C]`` (fed at every step, the reference's direct encoding) or a time-major
sequence ``[T, B, H, W, C]``. ``aux`` holds ``logits`` ``[B, K]`` (the output averaged over
T) and the ``batch_stats`` after the spike pass. The method is the only place that knows
how gradients are formed; models and layers know only the phase they are run in.

Whatever dtype a model's layers compute in (``models.set_compute_dtype``), the logits are
taken in float32 (:func:`logits_of`), so their time average, the loss and ``aux`` are
float32, and the gradients have the parameters' dtype.
"""
from __future__ import annotations

import dataclasses
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


def logits_of(model, x, ctx: Ctx):
    """``model(x, ctx)`` in float32: a bfloat16 classifier's logits are cast up before they
    are averaged over time (a sum of T bfloat16 terms would round at every step) and before
    the softmax and the loss."""
    return at_least_float32(model(x, ctx))


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
        logits = logits_of(model, x_TxB.reshape((T * B,) + x_TxB.shape[2:]), ctx)
        _, batch_stats, transient = _split(model)
        return logits.reshape((T, B, -1)).mean(0), batch_stats, transient

    images = check_images(images, T)
    static = images.ndim == 4  # fed at every step without materialising T copies

    def step(carry, x_B):
        batch_stats, transient, logits_sum = carry
        model = net.merge(params, batch_stats, transient)
        logits = logits_of(model, images if static else x_B, ctx)
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
    checks.check_choice("step_mode", step_mode, STEP_MODES)
    checks.check_int("T", T, 1)
    checks.check_choice("rate_grad_scale", rate_grad_scale, RATE_GRAD_SCALES)


# --------------------------------------------------------------------------- methods
def bptt(net: Network, *, T: int, step_mode: str = "multi", remat: bool = False,
         **unused) -> Callable:
    """Surrogate-gradient backpropagation through time: autodiff through the T-step scan.

    ``remat=True`` rematerialises: in single step mode each time step is a
    ``jax.checkpoint`` (only the neuron and BN state is stored per step); in multi step mode
    each unit (a residual block, a conv-BN-LIF layer; ``layers.call_unit``) keeps only its
    input and recomputes the rest in its backward pass.
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
    return logits_of(model, x_B, Ctx("rate", step_mode, T))


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


# --------------------------------------------------------------------------- SLTT and OTTT
# Both baselines differentiate only the spatial path of each time step: the membrane carry
# u_{t-1} -> v_t is cut (Ctx.temporal_grad=False), and the loss is the per-step
#     L = (1/T) sum_t CE(o_t, y),
# o_t the logits of step t, as in both official implementations (SLTT's train_SLTT.py and
# OTTT's train_cifar.py divide each step's loss by T and backpropagate it at that step; we
# leave out their optional MSE term). At T=1 this equals BPTT's CE(mean_t o_t, y), and both
# methods' gradients equal BPTT's. The reported ``loss`` is L over all T steps and
# ``aux["logits"]`` the time mean of o_t, as for the other methods.
#
# step_mode="single" is the papers' online form: a lax.scan over t whose body takes the
# gradient of step t's loss and adds it to a gradient carry, so nothing per step is kept and
# compiled memory does not grow with T. BatchNorm uses each step's batch statistics, and
# its gradient flows through them within the step. step_mode="multi" computes the same
# formula on the folded [T*B, ...] layout with one backward pass over all steps (memory
# grows with T, as for BPTT). There BatchNorm pools its statistics over T*B, which couples
# the steps through the statistics, so multi and single gradients agree only without BN.
def _check_K(K, T):
    if K is not None and not (isinstance(K, int) and not isinstance(K, bool) and 1 <= K <= T):
        raise ValueError(f"K={K!r}: must be an integer with 1 <= K <= T={T}")


def _step_key(batch, seed: int):
    """The key SLTT-K draws its time steps from, a pure function of ``(seed, batch)``.

    ``batch["rng"]``, if present, is a PRNG key (typed, or legacy ``uint32[2]`` key data),
    used as is, or an integer such as the training step, folded into
    ``jax.random.key(seed)``. Without it, a fingerprint of
    the batch is folded in: the wrapping uint32 sum of the image and label bits, which does
    not depend on the reduction order. Different batches then draw different steps.
    """
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
    uniformly without replacement (``torch.randperm(T)[:K]`` in the official
    train_SLTTK.py) from the key of :func:`_step_key`."""
    _check_K(K, T)
    perm = jax.random.permutation(_step_key(batch, seed), T)
    return jnp.zeros((T,), bool).at[perm[:K]].set(True)


def _weight_grad_at(op):
    """``op(x, w)``, whose VJP w.r.t. ``w`` is taken at a third argument ``a_hat``.

    ``op`` is bilinear (a convolution or a dot product), so its VJP w.r.t. ``x`` does not
    depend on ``x``: the input gradient stays the spatial ``W^T delta`` while the weight
    gradient becomes ``delta (x) a_hat`` instead of ``delta (x) x``. This is OTTT's
    ``GradwithTrace``, without running the layer twice. ``a_hat`` gets no gradient.
    """
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


def _trace_decay(model, trace_decay):
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
    """Make every ``nnx.Conv`` / ``nnx.Linear`` of the merged ``model`` (a fresh copy made
    inside this trace) form its weight gradient from the presynaptic trace of its input.

    The trace ``a_hat_t = lam * a_hat_{t-1} + a_t`` of the layer's input ``a_t`` runs over
    time: in single step mode from ``traces_in`` (keyed by layer path and call number, or
    None for zeros), in multi step mode along the folded time axis. A layer fed the raw
    network input ``x_in`` itself keeps its instantaneous input unless ``input_trace`` (the
    official code's OTTTSequential only wraps layers fed by [spike, trace] pairs). Such a
    layer is recognised by identity: its op receives ``x_in``, or, when the layer computes
    in another dtype, the very array its ``promote_dtype`` cast ``x_in`` to.

    The trace runs in float32 (a running sum over T, like a membrane; see
    ``layers.at_least_float32``) and is cast to the layer's compute dtype where it is used.

    Returns the dict the hooks fill with each layer's new trace (empty in multi mode), and
    a list the hooks append the paths of layers fed ``x_in`` to.
    """
    traces_out, calls, input_layers = {}, {}, []
    fed_input = [x_in]  # x_in and its casts to the layers' compute dtypes

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
            a = at_least_float32(jax.lax.stop_gradient(x))
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


def _spatial_method(net: Network, *, T: int, step_mode: str, K, seed: int, traces: bool,
                    trace_decay, input_trace: bool) -> Callable:
    """The shared engine of SLTT, SLTT-K and OTTT (see the comment block above)."""
    _check(step_mode, T)
    _check_K(K, T)
    ctx = Ctx("spike", step_mode, T, train=True, record=False, temporal_grad=False)

    def run(params, batch_stats, transient, x, traces_in):
        """One differentiable call of the model: one step (single) or all T (multi)."""
        model = net.merge(params, batch_stats, transient)
        traces_out = None
        if traces:
            traces_out, input_layers = _install_trace_hooks(
                model, x_in=x, traces_in=traces_in, ctx=ctx,
                lam=_trace_decay(model, trace_decay), input_trace=input_trace)
        logits = logits_of(model, x, ctx)
        if traces and not input_trace and not input_layers:
            # The input-layer rule recognises the network input by identity; a model that
            # reshapes or pools it before its first weight layer would silently get the
            # trace there instead.
            raise ValueError("input_trace=False: no convolution or dense layer is applied "
                             "to the network input itself, so the layers fed by the input "
                             "cannot be told apart; pass input_trace=True")
        _, new_stats, new_transient = _split(model)
        return logits, new_stats, new_transient, traces_out

    def grad_multi(params, batch_stats, images, labels, mask):
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

        (_, (loss, logits, new_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params)
        return loss, logits, new_stats, grads

    def grad_single(params, batch_stats, images, labels, mask):
        static = images.ndim == 4  # fed at every step without materialising T copies
        zero_grads = jax.tree.map(jnp.zeros_like, params)

        def step(carry, xs):
            stats, transient, traces_in, grads, loss_sum, logits_sum = carry
            x_B, m = xs
            x = images if static else x_B

            def loss_t(params):
                logits, new_stats, new_transient, traces_out = run(
                    params, stats, transient, x, traces_in)
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
        carry = (batch_stats,) + zeros
        (new_stats, _, _, grads, loss, logits), _ = jax.lax.scan(
            step, carry, (None if static else images, mask), length=T)
        return loss, logits, new_stats, grads

    def grad_fn(params, batch_stats, batch):
        check_batch(batch, T)
        mask = None if K is None else sltt_steps(batch, T=T, K=K, seed=seed)
        run_mode = grad_single if step_mode == "single" else grad_multi
        loss, logits, new_stats, grads = run_mode(params, batch_stats, batch["image"],
                                                  batch["label"], mask)
        return (loss, {"logits": logits, "batch_stats": new_stats}), grads

    return grad_fn


def sltt(net: Network, *, T: int, step_mode: str = "single", K: int | None = None,
         seed: int = 0, **unused) -> Callable:
    """Spatial learning through time (Meng et al., "Towards Memory- and Time-Efficient
    Backpropagation for Training Spiking Neural Networks", ICCV 2023, arXiv:2302.14311).

    The paper splits BPTT's gradient into a spatial part (through ``s^l[t] -> u^{l+1}[t]``
    within a step) and a temporal part (through ``u^l[t] -> u^l[t+1]``), observes that the
    temporal part contributes little, and keeps only the spatial one (the paper's Sec. 4,
    "Spatial Learning Through Time"). With ``delta^l_t = dL/dv^l_t`` along the spatial path
    of step t only,

        dL/dW^l = sum_t  delta^{l+1}_t (x) s^l_t,
        delta^l_t = (W^{l+1 T} delta^{l+1}_t) * sg(v^l_t),

    i.e. BPTT's recursion with ``du^l_t/du^l_{t-1}`` set to zero; the official neuron does
    this by detaching the membrane at every charge (``self.v.detach() * decay + x``). The
    reset then carries no gradient either, so every reset mode gives the same rule.

    ``K`` (SLTT-K, same paper): backpropagate only at K time steps drawn at random without
    replacement (:func:`sltt_steps`); the gradient is ``sum_{t in S} d(CE(o_t, y)/T)/dW``
    with no T/K rescaling, as in the official train_SLTTK.py. The reported loss still
    averages all T steps. The draw is a pure function of ``seed`` and the batch: put a key
    or the training step in ``batch["rng"]`` to control it. In single step mode the
    unselected steps run forward only (a ``lax.cond``), which is where the time is saved.

    Loss, BatchNorm and the step modes: see the comment block above :func:`_check_K`; the
    default step mode is "single", the online form the paper uses.
    """
    del unused
    return _spatial_method(net, T=T, step_mode=step_mode, K=K, seed=seed, traces=False,
                           trace_decay=None, input_trace=False)


def sltt_k(net: Network, *, K: int = 1, **kwargs) -> Callable:
    """SLTT-K (see :func:`sltt`): SLTT with gradients at K random time steps (default 1)."""
    return sltt(net, K=K, **kwargs)


def ottt(net: Network, *, T: int, step_mode: str = "single", trace_decay: float | None = None,
         input_trace: bool = False, **unused) -> Callable:
    """Online training through time (Xiao et al., NeurIPS 2022, arXiv:2210.04195), in its
    OTTT_A form: gradients accumulated over the T steps, one update per batch.

    OTTT drops the temporal dependency of BPTT (as :func:`sltt` does; the official
    ``OTTTLIFNode`` detaches its membrane every step) and recovers part of it by tracking
    presynaptic activity (paper Sec. 4, "Online Training Through Time"): for a layer
    ``y_t = W a_t`` feeding LIF neurons with decay ``lam``, ``du_t/dW`` summed along the
    postsynaptic membrane, with the reset's dependency ignored as the paper does, is the
    trace

        a_hat_t = lam * a_hat_{t-1} + a_t     (a_hat_0 = 0),

    and the gradient of the instantaneous loss ``L_t = CE(o_t, y)/T`` is

        dL/dW += delta_t (x) a_hat_t,   delta_t = dL_t/dy_t along step t's spatial path.

    Errors propagate to lower layers as in SLTT (``W^T delta_t``, no trace there); only the
    weight gradients of convolutions and dense layers (the classifier too, as in the
    official ``OTTTSequential``) use the trace. Biases and BatchNorm parameters keep their
    instantaneous gradients. At T=1, ``a_hat = a`` and OTTT equals BPTT.

    trace_decay: ``lam`` of the traces; None takes the network's neuron decay
      ``NeuronConfig.lam`` (the official code uses the LIF's ``1 - 1/tau``).
    input_trace: also use the trace for layers fed the raw network input. False (the
      default) keeps their instantaneous input, as the official code does (only layers fed
      by spiking neurons receive a [spike, trace] pair there).

    Generalisations to the zoo, which the paper (VGG with scaled weight standardisation and
    no BatchNorm) does not cover: the trace is that of each weight layer's actual input
    (a sum of spikes after a SEW add, the real-valued residual stream in PreAct-ResNet, the
    pooled spikes after a max pool), and BatchNorm uses per-step batch statistics in single
    step mode, with ``delta_t`` taken through them (see the comment block above
    :func:`_check_K`). Implementation: each merged ``nnx.Conv``/``nnx.Linear`` gets its
    ``conv_general_dilated``/``dot_general`` replaced by a custom-VJP op whose weight VJP
    is evaluated at the trace; the traces are carried by the time scan. In single step mode
    compiled memory does not grow with T.
    """
    del unused
    return _spatial_method(net, T=T, step_mode=step_mode, K=None, seed=0, traces=True,
                           trace_decay=trace_decay, input_trace=input_trace)


METHODS: dict[str, Callable] = {"bptt": bptt, "bptt_remat": bptt_remat, "rate": rate,
                                "sltt": sltt, "sltt_k": sltt_k, "ottt": ottt}


def make_grad_fn(name: str, net: Network, **kwargs) -> Callable:
    """The gradient function of method ``name`` (one of METHODS) for ``net``."""
    checks.check_choice("method", name, METHODS)
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
