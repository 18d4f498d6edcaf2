"""Spiking VGGs (the reference's ``model/vgg.py``): VGG-11, VGG-13, VGGSNN for CIFAR and DVS.

Each integer in a feature spec is conv3x3 (with bias) -> BN -> LIF; ``"A"`` is a 2x2 average
pool, ``"AA"`` a global average pool and ``"AA3"`` PyTorch's adaptive average pool to 3x3.
There is no max pooling, so the rate pass is exact in value. Weights are N(0, 0.5^2) and
biases zero, as in the reference.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from ratebp_jax import layers
from ratebp_jax.layers import LIF, ConvBN, Ctx
from ratebp_jax.neurons import NeuronConfig

VGG11 = (64, "A", 128, 256, "A", 512, 512, "A", 512, "A", 512, 512, "AA")
VGG13 = (64, 64, "A", 128, 128, "A", 256, 256, "A", 512, 512, 512, "A", 512, "AA")
VGGSNN_CIFAR = (64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "AA3")
VGGSNN_DVS = (64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A")
VGG_SMALL = (32, "A", 64, "A", 128, "AA")  # the embedded digits default (8x8 inputs)
VGG_TINY = (8, "A", 16, "AA")  # the reference vectors' vgg_tiny
VGGSNN_TINY = (4, "A", 8, "AA3")
POOLS = ("A", "AA", "AA3")


def _pool(x, kind: str):
    if kind == "A":
        return layers.avg_pool(x, 2)
    if kind == "AA":
        return layers.global_avg_pool(x)[:, None, None, :]
    return layers.adaptive_avg_pool(x, 3)


def _flat_features(spec, image_size: int) -> int:
    size, channels = image_size, None
    for item in spec:
        if item == "A":
            size //= 2
        elif item == "AA":
            size = 1
        elif item == "AA3":
            size = 3
        else:
            channels = item
    return size * size * channels


class VGG(nnx.Module):
    """Spiking VGG. ``x`` is ``[N, H, W, C]``; returns logits ``[N, K]``.

    ``hidden`` adds ``Linear -> LIF`` layers before the classifier (none in the reference
    configurations). The flatten is NHWC; ``interop`` permutes weights from NCHW order.
    """

    def __init__(self, *, spec: Sequence, hidden: Sequence[int] = (), num_classes: int,
                 in_channels: int = 3, image_size: int = 32, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        self.spec = tuple(spec)
        units, in_ch = [], in_channels
        for item in self.spec:
            if item not in POOLS:
                units.append(ConvBN(in_ch, item, 3, bias=True, init=layers.NORMAL_05,
                                    rngs=rngs))
                units.append(LIF(neuron))
                in_ch = item
        self.features = nnx.List(units)
        widths = (_flat_features(self.spec, image_size),) + tuple(hidden) + (num_classes,)
        self.classifier = nnx.List([
            layers.dense(a, b, init=layers.NORMAL_05, rngs=rngs)
            for a, b in zip(widths[:-1], widths[1:])])
        self.classifier_lifs = nnx.List([LIF(neuron) for _ in hidden])

    def __call__(self, x, ctx: Ctx):
        units = iter(self.features)
        for item in self.spec:
            if item in POOLS:
                x = _pool(x, item)
            else:
                x = layers.call_unit((next(units), next(units)), x, ctx, layers.conv_then_lif)
        x = x.reshape((x.shape[0], -1))
        for linear, lif in zip(self.classifier[:-1], self.classifier_lifs):
            x = lif(linear(x), ctx)
        return self.classifier[-1](x)
