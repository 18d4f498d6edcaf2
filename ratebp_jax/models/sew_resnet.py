"""SEW-ResNet-34 with the ADD connection and an ImageNet stem (``model/sew_resnet.py``).

Stem conv7x7/2 (bias) -> BN -> LIF -> max pool 3x3/2. Each block is two conv -> BN -> LIF
units plus a spiking 1x1 downsample where the shape changes, joined by ``out + identity``
with no LIF after the add (spike-element-wise). Convolutions have bias and kaiming-normal
fan-out weights; the classifier keeps PyTorch's default initialisation.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from ratebp_jax import layers
from ratebp_jax.layers import LIF, ConvBN, Ctx, MaxPool
from ratebp_jax.neurons import NeuronConfig


class ConvBNLIF(nnx.Module):
    def __init__(self, in_ch, out_ch, kernel, *, stride=1, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        self.conv_bn = ConvBN(in_ch, out_ch, kernel, stride=stride, bias=True,
                              init=layers.KAIMING_FAN_OUT, rngs=rngs)
        self.lif = LIF(neuron)

    def __call__(self, x, ctx: Ctx):
        return self.lif(self.conv_bn(x, ctx), ctx)


class SEWBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        self.unit1 = ConvBNLIF(in_ch, out_ch, 3, stride=stride, neuron=neuron, rngs=rngs)
        self.unit2 = ConvBNLIF(out_ch, out_ch, 3, neuron=neuron, rngs=rngs)
        self.downsample = (ConvBNLIF(in_ch, out_ch, 1, stride=stride, neuron=neuron,
                                     rngs=rngs)
                           if stride != 1 or in_ch != out_ch else None)

    def __call__(self, x, ctx: Ctx):
        identity = x if self.downsample is None else self.downsample(x, ctx)
        return self.unit2(self.unit1(x, ctx), ctx) + identity


class SEWResNet(nnx.Module):
    """``x`` is ``[N, H, W, C]``; returns logits ``[N, K]``."""

    def __init__(self, *, stage_sizes: Sequence[int], widths: Sequence[int], num_classes: int,
                 in_channels: int = 3, image_size: int = 224, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        del image_size
        self.stem = ConvBNLIF(in_channels, widths[0], 7, stride=2, neuron=neuron, rngs=rngs)
        self.pool = MaxPool()
        self.stages = layers.residual_stages(
            lambda i, o, stride: SEWBlock(i, o, stride, neuron, rngs), stage_sizes, widths)
        self.fc = layers.dense(widths[-1], num_classes, init=layers.TORCH_DEFAULT, rngs=rngs)

    def __call__(self, x, ctx: Ctx):
        x = self.pool(layers.call_unit(self.stem, x, ctx), ctx)
        x = layers.run_stages(self.stages, x, ctx)
        return self.fc(layers.global_avg_pool(x))
