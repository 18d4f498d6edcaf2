"""Fully connected spiking networks, for feature-vector inputs such as SHD's 700 channels.

Each hidden layer is dense -> BatchNorm -> LIF; a dense classifier gives the logits. The
input is flattened, so an image works as well as a feature vector: the trainer hands a
``[F]`` feature dataset to a factory as a 1x1 image of F channels (``train.create_model``),
and the first layer takes ``image_size**2 * in_channels`` inputs. Weights follow PyTorch's
``nn.Linear`` default (``layers.TORCH_DEFAULT``).
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from ratebp_jax import layers
from ratebp_jax.layers import LIF, BatchNorm, Ctx
from ratebp_jax.neurons import NeuronConfig


def _dense_bn_lif(unit, x, ctx: Ctx):
    """The unit ``(dense, bn, lif)`` of ``layers.call_unit``."""
    dense, bn, lif = unit
    return lif(bn(dense(x), ctx), ctx)


class MLP(nnx.Module):
    """Spiking MLP. ``x`` is ``[N, F]`` or ``[N, H, W, C]`` (N is T*B in multi step mode,
    B in single step mode); returns logits ``[N, K]``."""

    def __init__(self, *, hidden: Sequence[int], num_classes: int, in_channels: int,
                 image_size: int = 1, neuron: NeuronConfig, rngs: nnx.Rngs):
        widths = (image_size * image_size * in_channels,) + tuple(hidden)
        self.dense = nnx.List([layers.dense(a, b, init=layers.TORCH_DEFAULT, rngs=rngs)
                               for a, b in zip(widths[:-1], widths[1:])])
        self.bn = nnx.List([BatchNorm(w) for w in hidden])
        self.lif = nnx.List([LIF(neuron) for _ in hidden])
        self.fc = layers.dense(widths[-1], num_classes, init=layers.TORCH_DEFAULT,
                               rngs=rngs)

    def __call__(self, x, ctx: Ctx):
        if x.ndim > 2:  # images; feature vectors go in as they are (OTTT tells its input
            x = x.reshape((x.shape[0], -1))  # layer by the input array itself)
        for unit in zip(self.dense, self.bn, self.lif):
            x = layers.call_unit(unit, x, ctx, _dense_bn_lif)
        return self.fc(x)
