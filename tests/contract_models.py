"""Small models that break rate-BP's layer contract, each in one known way, for
test_contract.py and the command-line test of experiments/main.py:

    python experiments/main.py --config.model=tests.contract_models:MaxPoolBetween

``TwoLIF`` is conv -> BatchNorm -> LIF -> conv -> BatchNorm -> LIF -> dense, with one
operation inserted between the two LIF layers (``between``) or after the last (``after``).
"""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ratebp_jax import layers


def _max_pool(x):
    return nnx.max_pool(x, (2, 2), strides=(1, 1), padding="SAME")


# name -> (where it acts, the operation): "spikes" acts on the first LIF's output, "current"
# on the second convolution's output.
OPERATIONS = {
    "max_pool": ("spikes", _max_pool),
    "relu_on_spikes": ("spikes", nnx.relu),
    "relu": ("current", nnx.relu),
    "gelu": ("current", nnx.gelu),
    "tanh": ("current", jnp.tanh),
    "exp_log": ("current", lambda h: jnp.log(1.0 + jnp.exp(h))),
    "product": ("spikes", lambda s: s * jnp.roll(s, 1, axis=1)),  # SEW's AND of two trains
    "where": ("current", lambda h: jnp.where(h > 0, h, 0.1 * h)),
    "cond": ("current", lambda h: jax.lax.cond(h.mean() > 0, lambda a: a, lambda a: -a, h)),
    "scan": ("current", lambda h: jax.lax.scan(lambda c, a: (c, jnp.tanh(a)), 0.0, h)[1]),
    # linear, but the checker cannot tell
    "fft": ("current", lambda h: jnp.real(jnp.fft.ifft(jnp.fft.fft(h, axis=1), axis=1))),
    "unused_tanh": ("current", lambda h: (jnp.tanh(h), h)[1]),  # a value nothing reads
}


class TwoLIF(nnx.Module):
    """``x`` is ``[N, H, W, C]``; returns logits ``[N, K]``. ``between`` and ``after`` name
    an operation of :data:`OPERATIONS`; ``after`` is applied to the second LIF's output.
    ``reuse_lif`` calls the first LIF a second time instead of the second."""

    def __init__(self, *, num_classes, in_channels, image_size, neuron, rngs, between=None,
                 after=None, reuse_lif=False, width=4):
        self.between, self.after, self.reuse_lif = between, after, reuse_lif
        self.conv1 = layers.conv(in_channels, width, 3, bias=False, init=layers.TORCH_DEFAULT,
                                 rngs=rngs)
        self.bn1 = layers.BatchNorm(width)
        self.lif1 = layers.LIF(neuron)
        self.conv2 = layers.conv(width, width, 3, bias=False, init=layers.TORCH_DEFAULT,
                                 rngs=rngs)
        self.bn2 = layers.BatchNorm(width)
        self.lif2 = layers.LIF(neuron)
        self.fc = layers.dense(width * image_size ** 2, num_classes, init=layers.TORCH_DEFAULT,
                               rngs=rngs)

    def __call__(self, x, ctx):
        spikes = self.lif1(self.bn1(self.conv1(x), ctx), ctx)
        where, op = OPERATIONS.get(self.between, (None, None))
        if where == "spikes":
            spikes = op(spikes)
        current = self.conv2(spikes)
        if where == "current":
            current = op(current)
        spikes = (self.lif1 if self.reuse_lif else self.lif2)(self.bn2(current, ctx), ctx)
        if self.after is not None:
            spikes = OPERATIONS[self.after][1](spikes)
        return self.fc(spikes.reshape(spikes.shape[0], -1))


class NNXBatchNorm(nnx.Module):
    """conv -> nnx.BatchNorm -> LIF -> dense: a BatchNorm that is not the library's."""

    def __init__(self, *, num_classes, in_channels, image_size, neuron, rngs, width=4):
        self.conv = layers.conv(in_channels, width, 3, bias=False, init=layers.TORCH_DEFAULT,
                                rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.lif = layers.LIF(neuron)
        self.fc = layers.dense(width * image_size ** 2, num_classes, init=layers.TORCH_DEFAULT,
                               rngs=rngs)

    def __call__(self, x, ctx):
        spikes = self.lif(self.bn(self.conv(x), use_running_average=not ctx.train), ctx)
        return self.fc(spikes.reshape(spikes.shape[0], -1))


Clean = TwoLIF
MaxPoolBetween = functools.partial(TwoLIF, between="max_pool")
ReluBetween = functools.partial(TwoLIF, between="relu")
ReluOnSpikes = functools.partial(TwoLIF, between="relu_on_spikes")
GeluBetween = functools.partial(TwoLIF, between="gelu")
TanhBetween = functools.partial(TwoLIF, between="tanh")
ExpLogBetween = functools.partial(TwoLIF, between="exp_log")
ProductBetween = functools.partial(TwoLIF, between="product")
WhereBetween = functools.partial(TwoLIF, between="where")
MaxPoolAfter = functools.partial(TwoLIF, after="max_pool")
LIFCalledTwice = functools.partial(TwoLIF, reuse_lif=True)
