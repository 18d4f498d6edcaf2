"""Pre-activation spiking ResNet-34 with an ImageNet stem (``model/preact_resnet.py``).

Stem conv7x7/2 (bias) -> BN -> max pool 3x3/2, with no LIF: the residual stream stays
real-valued. Each block is ``LIF -> conv -> BN -> LIF -> conv -> BN`` added to the identity
(or a non-spiking 1x1 conv + BN downsample of it). The last block's output is pooled and
classified directly. Initialisation as in SEW-ResNet.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from ratebp_jax import layers
from ratebp_jax.layers import LIF, ConvBN, Ctx, MaxPool
from ratebp_jax.neurons import NeuronConfig


def _conv_bn(in_ch, out_ch, kernel, stride, rngs):
    return ConvBN(in_ch, out_ch, kernel, stride=stride, bias=True, init=layers.KAIMING_FAN_OUT,
                  rngs=rngs)


class PreActBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        self.lif1 = LIF(neuron)
        self.conv1 = _conv_bn(in_ch, out_ch, 3, stride, rngs)
        self.lif2 = LIF(neuron)
        self.conv2 = _conv_bn(out_ch, out_ch, 3, 1, rngs)
        self.downsample = (_conv_bn(in_ch, out_ch, 1, stride, rngs)
                           if stride != 1 or in_ch != out_ch else None)

    def __call__(self, x, ctx: Ctx):
        out = self.conv1(self.lif1(x, ctx), ctx)
        out = self.conv2(self.lif2(out, ctx), ctx)
        return out + (x if self.downsample is None else self.downsample(x, ctx))


class PreActResNet(nnx.Module):
    """``x`` is ``[N, H, W, C]``; returns logits ``[N, K]``."""

    def __init__(self, *, stage_sizes: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, image_size: int = 224, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        del image_size
        self.stem = _conv_bn(in_channels, widths[0], 7, 2, rngs)
        self.pool = MaxPool()
        self.stages = layers.residual_stages(
            lambda i, o, stride: PreActBlock(i, o, stride, neuron, rngs), stage_sizes, widths)
        self.fc = layers.dense(widths[-1], num_classes, init=layers.TORCH_DEFAULT, rngs=rngs)

    def __call__(self, x, ctx: Ctx):
        x = self.pool(self.stem(x, ctx), ctx)
        x = layers.run_stages(self.stages, x, ctx)
        return self.fc(layers.global_avg_pool(x))
