"""NNX layers that know the phase a spiking network is run in (docs/DESIGN.md section 3).

A model passes a :class:`Ctx` down to its LIF, BatchNorm and MaxPool layers; every other
layer acts the same in every phase, so one model definition serves every method.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ratebp_jax import checks, convolution, neurons, ratebp

PHASES = ("spike", "rate")
STEP_MODES = ("multi", "single")


class Record(nnx.Variable):
    """What the spike pass leaves for the rate pass (rates, eligibilities, BN statistics)."""


class Membrane(nnx.Variable):
    """Neuron state carried between time steps in single step mode."""


@dataclasses.dataclass(frozen=True)
class Ctx:
    """How to run the network this call; static (hashable), never traced. The fields are
    described in docs/DESIGN.md section 3."""

    phase: str = "spike"
    step_mode: str = "multi"
    T: int = 1
    train: bool = True
    record: bool = False
    remat: bool = False
    temporal_grad: bool = True

    def __post_init__(self):
        checks.check_choice("phase", self.phase, PHASES)
        checks.check_choice("step_mode", self.step_mode, STEP_MODES)
        checks.check_int("T", self.T, 1)


def _placeholder():
    """Records and membranes take their real shape on first use; a scalar zero broadcasts."""
    return jnp.zeros((), jnp.float32)


def at_least_float32(x):
    """``x`` in float32, or in its own wider float (float64); a no-op on float32.

    Neurons and BatchNorm never compute in bfloat16: membranes, eligibilities and records
    are running sums over T, and BatchNorm's statistics means over T*B*H*W values, whose
    rounding to 8 significant bits would move spikes across the threshold. Spikes (0 or 1)
    are exact in bfloat16.
    """
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _accumulate(var: nnx.Variable, value, ctx: Ctx):
    """Multi mode sets the record; single mode adds this step's share of the time mean."""
    if ctx.step_mode == "single":
        var.set_value(var.get_value() + value / ctx.T)
    else:
        var.set_value(value)


class LIF(nnx.Module):
    """Leaky integrate-and-fire layer (``neurons.py``), computing in float32.

    Returns its spikes (rates, in the rate pass) in ``spike_dtype`` (None: float32), which
    ``models.set_compute_dtype`` sets, so that no spike train is kept both in float32 and
    as the next convolution's cast (docs/RESULTS.md, "Mixed precision (bfloat16)").
    """

    def __init__(self, cfg: neurons.NeuronConfig, spike_dtype=None):
        self.cfg = cfg
        self.spike_dtype = spike_dtype
        self.rate = Record(_placeholder())
        self.elig = Record(_placeholder())
        self.u = Membrane(_placeholder())
        self.eps_d = Membrane(_placeholder())
        if cfg.learnable_leak:  # lam = sigmoid(leak_logit), from cfg.lam (DESIGN section 8)
            self.leak_logit = nnx.Param(jnp.asarray(math.log(cfg.lam / (1.0 - cfg.lam)),
                                                    jnp.float32))
            self.elig_lam = Record(_placeholder())
            self.lam_d = Membrane(_placeholder())

    def leak(self):
        """The layer's decay: ``sigmoid(leak_logit)`` with a learnable leak, else None (the
        neuron functions then use the static ``cfg.lam``)."""
        if not self.cfg.learnable_leak:
            return None
        return jax.nn.sigmoid(self.leak_logit.get_value())

    def __call__(self, x, ctx: Ctx):
        out = self._fire(at_least_float32(x), ctx)
        return out if self.spike_dtype is None else out.astype(self.spike_dtype)

    def _fire(self, x, ctx: Ctx):
        lam, learnable = self.leak(), self.cfg.learnable_leak
        if ctx.phase == "rate":
            out = ratebp.rate_lif(x, self.rate.get_value(), self.elig.get_value())
            return ratebp.with_leak_gradient(out, lam, self.elig_lam.get_value()) \
                if learnable else out
        monitor_only = ctx.record and not ctx.train  # firing rates only, no eligibility
        if ctx.step_mode == "multi":
            x_TxN = x.reshape((ctx.T, -1) + x.shape[1:])
            if not ctx.train:  # evaluation
                spikes = neurons.lif_forward(x_TxN, self.cfg, lam)
                if monitor_only:
                    self.rate.set_value(neurons.time_mean(spikes))
            elif ctx.record:
                spikes, rate, elig, *elig_lam = neurons.lif_scan_with_eligibility(
                    x_TxN, self.cfg, lam)
                self.rate.set_value(rate)
                self.elig.set_value(elig)
                if learnable:
                    self.elig_lam.set_value(elig_lam[0])
            else:  # BPTT and its variants
                spikes = neurons.lif_scan(x_TxN, self.cfg, ctx.temporal_grad, lam)
            return spikes.reshape(x.shape)
        if ctx.record and not monitor_only:
            fields = (self.u, self.eps_d, self.elig) + (
                (self.lam_d, self.elig_lam) if learnable else ())
            carry = neurons.EligibilityCarry(*(f.get_value() for f in fields))
            carry, s, _ = neurons.eligibility_step(
                carry, jax.lax.stop_gradient(x), self.cfg, ctx.T, lam)
            for field, value in zip(fields, carry):
                field.set_value(value)
            _accumulate(self.rate, s, ctx)
            return s
        u_prev = self.u.get_value()
        if not ctx.temporal_grad:
            u_prev = jax.lax.stop_gradient(u_prev)
        u, s, _ = neurons.lif_step(u_prev, x, self.cfg, lam)
        self.u.set_value(u)
        if monitor_only:
            _accumulate(self.rate, s, ctx)
        return s


class BatchNorm(nnx.Module):
    """BatchNorm over all axes but the channels, in float32, with PyTorch's conventions.
    Not ``nnx.BatchNorm``: the rate pass takes its value from one set of statistics and its
    gradient through another (docs/DESIGN.md section 2.3)."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1):
        self.eps = eps
        self.momentum = momentum
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))  # PyTorch's num_batches_tracked
        self.spike_mean = Record(_placeholder())
        self.spike_var = Record(_placeholder())
        self.out_mean = Record(_placeholder())

    def __call__(self, x, ctx: Ctx):
        x = at_least_float32(x)
        axes = tuple(range(x.ndim - 1))
        if ctx.phase == "rate":
            rate_mean, rate_var = _moments(x, axes)
            mean = ratebp.straight_through(self.spike_mean.get_value(), rate_mean)
            var = ratebp.straight_through(self.spike_var.get_value(), rate_var)
            y = self._normalize(x, mean, var)
            if ctx.step_mode == "single":  # per-step statistics: docs/DESIGN.md section 5.2
                y = ratebp.straight_through(self.out_mean.get_value(), y)
            return y
        if ctx.train:
            mean, var = _moments(x, axes)
            self._update_running(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var),
                                 math.prod(x.shape[:-1]))
        else:
            mean, var = self.mean.get_value(), self.var.get_value()
        y = self._normalize(x, mean, var)
        if ctx.record:
            _accumulate(self.spike_mean, jax.lax.stop_gradient(mean), ctx)
            _accumulate(self.spike_var, jax.lax.stop_gradient(var), ctx)
            if ctx.step_mode == "single":
                _accumulate(self.out_mean, jax.lax.stop_gradient(y), ctx)
        return y

    def _normalize(self, x, mean, var):
        scale, bias = self.scale.get_value(), self.bias.get_value()
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias

    def _update_running(self, mean, var, n: int):
        # set_value, not ``self.mean[...] = new``, which traces a scatter per call
        # (docs/RESULTS.md, "The test suite's time").
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        self.mean.set_value((1 - m) * self.mean.get_value() + m * mean)
        self.var.set_value((1 - m) * self.var.get_value() + m * unbiased)
        self.count.set_value(self.count.get_value() + 1)


def _moments(x, axes):
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return mean, var


# --------------------------------------------------------------------------- initialisers
# The reference models' three schemes, in HWIO / [in, out] layout.
TORCH_DEFAULT = "torch_default"  # kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), bias alike
KAIMING_FAN_OUT = "kaiming_fan_out"  # kaiming_normal(fan_out, relu); bias torch default
NORMAL_05 = "normal_0.5"  # N(0, 0.5^2) weights, zero bias (the reference VGGs)
INITS = (TORCH_DEFAULT, KAIMING_FAN_OUT, NORMAL_05)


def _torch_default_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _initializers(init: str, fan_in: int):
    checks.check_choice("init", init, INITS)
    if init == TORCH_DEFAULT:
        return (nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                _torch_default_bias(fan_in))
    if init == KAIMING_FAN_OUT:
        return (nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                _torch_default_bias(fan_in))
    if init == NORMAL_05:
        return nnx.initializers.normal(0.5), nnx.initializers.zeros


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, bias: bool, init: str,
         rngs: nnx.Rngs) -> nnx.Conv:
    """A PyTorch-style convolution: symmetric padding ``kernel // 2`` ('SAME' pads stride 2
    asymmetrically, which PyTorch's weights would not fit), with ``convolution.py``'s
    kernel gradient."""
    kernel_init, bias_init = _initializers(init, in_ch * kernel * kernel)
    pad = kernel // 2
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=stride,
                    padding=((pad, pad), (pad, pad)), use_bias=bias,
                    kernel_init=kernel_init, bias_init=bias_init,
                    conv_general_dilated=convolution.conv_general_dilated, rngs=rngs)


def dense(in_features: int, out_features: int, *, init: str, rngs: nnx.Rngs) -> nnx.Linear:
    kernel_init, bias_init = _initializers(init, in_features)
    return nnx.Linear(in_features, out_features, kernel_init=kernel_init,
                      bias_init=bias_init, rngs=rngs)


class ConvBN(nnx.Module):
    """conv -> BatchNorm, the unit every model family is built from.

    The rate pass takes the convolution's value from the spike pass's time-mean record
    and runs only its backward pass: a convolution fewer per layer (docs/DESIGN.md
    section 2.3; docs/RESULTS.md, "The rate pass takes its convolutions' values from the
    spike pass").
    """

    def __init__(self, in_ch, out_ch, kernel, *, stride=1, bias=False, init=TORCH_DEFAULT,
                 rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, kernel, stride=stride, bias=bias, init=init, rngs=rngs)
        self.bn = BatchNorm(out_ch)
        self.out_mean = Record(_placeholder())

    def __call__(self, x, ctx: Ctx):
        if ctx.phase == "rate":
            y = _conv_from_record(self.conv, x, self.out_mean.get_value())
        else:
            y = self.conv(x)
            if ctx.record and ctx.train:
                _record_time_mean(self.out_mean, y, ctx)
        return self.bn(y, ctx)


def _record_time_mean(var: Record, y, ctx: Ctx):
    """Record the time mean of the spike-pass output ``y`` in float32, the precision the
    BatchNorm reads it in (docs/DESIGN.md section 2.3)."""
    y = at_least_float32(jax.lax.stop_gradient(y))
    if ctx.step_mode == "multi":
        y = neurons.time_mean(y.reshape((ctx.T, -1) + y.shape[1:]))
    _accumulate(var, y, ctx)


def _conv_from_record(conv_module: nnx.Conv, x, value):
    """``conv_module(x)`` with ``value`` as its value: only its backward pass runs."""
    graphdef, state = nnx.split(conv_module)

    def apply(x, state):
        return nnx.merge(graphdef, state)(x)

    out = jax.eval_shape(apply, x, state)
    if value.shape != out.shape:
        raise ValueError(
            f"ConvBN.out_mean: the record has shape {value.shape}, the convolution's output "
            f"{out.shape}; run the spike pass (methods.spike_pass, or a Ctx with record=True "
            "and train=True) on the same batch before the rate pass")
    return ratebp.recorded_value(apply, value, x, state)


def avg_pool(x, window: int):
    return nnx.avg_pool(x, (window, window), strides=(window, window))


def global_avg_pool(x_NxHxWxC):
    return x_NxHxWxC.mean(axis=(1, 2))


def adaptive_avg_pool(x_NxHxWxC, out_size: int):
    """PyTorch's AdaptiveAvgPool2d: window i spans [floor(i*H/o), ceil((i+1)*H/o)), so
    windows overlap when H is not a multiple of o."""
    def pool_axis(x, axis):
        n = x.shape[axis]
        slices = [jnp.take(x, jnp.arange(i * n // out_size, -(-(i + 1) * n // out_size)),
                           axis=axis).mean(axis=axis, keepdims=True) for i in range(out_size)]
        return jnp.concatenate(slices, axis=axis)
    return pool_axis(pool_axis(x_NxHxWxC, 1), 2)


# --------------------------------------------------------------------------- max pooling
# Spikes and rates tie often, so the gradient of a window with several maxima is a choice
# (docs/DESIGN.md section 5.1): "split" shares it equally among them (the minimum-norm
# subgradient, jnp.max's rule), "first" gives it to the first (XLA's and PyTorch's, so the
# reference's). Padding is -inf: never a maximum, never given gradient.
POOL_TIES = ("split", "first")
DEFAULT_POOL_TIES = "split"  # docs/RESULTS.md, "Max-pool tie rule"


def check_pool_ties(ties: str) -> str:
    return checks.check_choice("pool_ties", ties, POOL_TIES)


def max_pool(x_NxHxWxC, ties: str, *, window: int = 3, stride: int = 2, padding: int = 1):
    """``[N, Ho, Wo, C]``: max pooling with -inf ``padding`` on both sides; ``ties``
    (:data:`POOL_TIES`) changes the gradient only."""
    if check_pool_ties(ties) == "first":
        return _reduce_max(x_NxHxWxC, window, stride, padding)
    return _max_pool_split(x_NxHxWxC, window, stride, padding)


def _reduce_max(x, window, stride, padding):
    return nnx.max_pool(x, (window, window), strides=(stride, stride),
                        padding=((padding, padding), (padding, padding)))


def _windows(x_NxHxWxC, fill, window, stride, padding):
    """``[window**2, N, Ho, Wo, C]``: entry ``window * di + dj`` is each window's element at
    offset ``(di, dj)``. Linear, so its transpose scatters window entries back onto ``x``."""
    x = jnp.pad(x_NxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=fill)
    n, h, w, c = x.shape
    ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
    return jnp.stack([
        jax.lax.slice(x, (0, di, dj, 0), (n, di + (ho - 1) * stride + 1,
                                          dj + (wo - 1) * stride + 1, c), (1, stride, stride, 1))
        for di in range(window) for dj in range(window)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_split(x, window, stride, padding):
    return _reduce_max(x, window, stride, padding)


def _max_pool_split_fwd(x, window, stride, padding):
    y = _reduce_max(x, window, stride, padding)
    return y, (x, y)


def _max_pool_split_bwd(window, stride, padding, residuals, g):
    """Each window's cotangent divided by its number of tied maxima, added onto each of
    them; in float32, so that a bfloat16 cotangent is rounded once, not per share."""
    x, y = residuals
    x_wide = at_least_float32(x)
    entries, scatter = jax.vjp(lambda x: _windows(x, -jnp.inf, window, stride, padding),
                               x_wide)
    inside = _windows(jnp.ones(x.shape, bool), False, window, stride, padding)
    tied = (entries == at_least_float32(y)) & inside
    share = at_least_float32(g) / jnp.maximum(tied.sum(0), 1)  # a NaN window has no maximum
    g_x, = scatter(jnp.where(tied, share, 0).astype(x_wide.dtype))
    return (g_x.astype(x.dtype),)


_max_pool_split.defvjp(_max_pool_split_fwd, _max_pool_split_bwd)


class MaxPool(nnx.Module):
    """The ImageNet stem's MaxPool2d(3, stride 2, padding 1), made rate-pass aware.

    The rate pass takes the spike pass's time-mean record as its value and routes the
    gradient to each window's largest rate (docs/DESIGN.md section 5.1). Both passes
    return the input's dtype, so that their gradients are rounded alike.
    """

    def __init__(self, ties: str = DEFAULT_POOL_TIES):
        self.ties = check_pool_ties(ties)
        self.out_mean = Record(_placeholder())

    def __call__(self, x, ctx: Ctx):
        y = max_pool(x, self.ties)
        if ctx.phase == "rate":
            return ratebp.straight_through(self.out_mean.get_value(), y).astype(y.dtype)
        if ctx.record:
            _record_time_mean(self.out_mean, y, ctx)
        return y


def residual_stages(make_block, stage_sizes, widths) -> nnx.List:
    """ResNet stages of ``make_block(in_ch, out_ch, stride)``; the first block of every stage
    after the first halves the resolution. The stem's width is ``widths[0]``."""
    stages, in_ch = [], widths[0]
    for i, (depth, width) in enumerate(zip(stage_sizes, widths)):
        blocks = []
        for j in range(depth):
            blocks.append(make_block(in_ch, width, 2 if i > 0 and j == 0 else 1))
            in_ch = width
        stages.append(nnx.List(blocks))
    return nnx.List(stages)


def run_stages(stages, x, ctx: Ctx):
    for stage in stages:
        for block in stage:
            x = call_unit(block, x, ctx)
    return x


def call_unit(node, x, ctx: Ctx, fn=None):
    """``fn(node, x, ctx)`` (default ``node(x, ctx)``) for a module or a tuple of modules;
    under ``ctx.remat`` in multi step mode, a unit that keeps only its input for the
    backward pass and recomputes the rest there."""
    fn = fn or (lambda node, x, ctx: node(x, ctx))
    if not (ctx.remat and ctx.step_mode == "multi"):
        return fn(node, x, ctx)
    inner = dataclasses.replace(ctx, remat=False)
    graphdef, params, rest = nnx.split(node, nnx.Param, ...)

    def pure(params, x, rest):
        unit = nnx.merge(graphdef, params, rest, copy=True)
        y = fn(unit, x, inner)
        return y, nnx.split(unit, nnx.Param, ...)[2]

    y, rest = _remat_after_cotangent(pure)(params, x, rest)
    nnx.update(node, rest)
    return y


def conv_then_lif(pair, x, ctx: Ctx):
    """The unit ``(conv_bn, lif)`` of :func:`call_unit`: ``lif(conv_bn(x))``."""
    conv_bn, lif = pair
    return lif(conv_bn(x, ctx), ctx)


def _remat_after_cotangent(pure):
    """``pure(params, x, state) -> (y, new_state)`` keeping only its inputs for the backward
    pass, which recomputes ``y`` once ``y``'s cotangent exists; ``new_state`` gets no
    gradient.

    Not ``jax.checkpoint``: XLA:CPU drops its optimisation barriers and recomputes early,
    saving nothing (docs/RESULTS.md, "Memory and time against T"). Here the recomputation
    depends on the cotangent (``x + 0 * g[0]``), which no scheduler can hoist.
    """
    @jax.custom_vjp
    def run(params, x, state):
        return pure(params, x, state)

    def fwd(params, x, state):
        return pure(params, x, state), (params, x, state)

    def bwd(res, cotangents):
        params, x, state = res
        g_y, _ = cotangents
        x = x + 0.0 * g_y.reshape(-1)[0].astype(x.dtype)
        _, vjp = jax.vjp(lambda p, x: pure(p, x, state)[0], params, x)
        g_params, g_x = vjp(g_y)
        return g_params, g_x, jax.tree.map(_zero_cotangent, state)

    run.defvjp(fwd, bwd)
    return run


def _zero_cotangent(x):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)
