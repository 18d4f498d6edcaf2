"""Spiking ResNet-18 and ResNet-19 with CIFAR stems (the reference's ``model/resnet.py``).

conv3x3 -> BN -> LIF stem, no max pool; BasicBlocks whose LIF sits after the residual add;
1x1 conv + BN shortcuts where the shape changes; convolutions without bias and PyTorch's
default initialisation. ResNet-19 has a hidden ``Linear(512, 256) -> LIF`` before the
classifier.
"""
from __future__ import annotations

from typing import Sequence

from flax import nnx

from ratebp_jax import layers
from ratebp_jax.layers import LIF, ConvBN, Ctx
from ratebp_jax.neurons import NeuronConfig


class BasicBlock(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: NeuronConfig,
                 rngs: nnx.Rngs):
        self.conv1 = ConvBN(in_ch, out_ch, 3, stride=stride, rngs=rngs)
        self.lif1 = LIF(neuron)
        self.conv2 = ConvBN(out_ch, out_ch, 3, rngs=rngs)
        self.shortcut = (ConvBN(in_ch, out_ch, 1, stride=stride, rngs=rngs)
                         if stride != 1 or in_ch != out_ch else None)
        self.lif2 = LIF(neuron)

    def __call__(self, x, ctx: Ctx):
        out = self.conv2(self.lif1(self.conv1(x, ctx), ctx), ctx)
        identity = x if self.shortcut is None else self.shortcut(x, ctx)
        return self.lif2(out + identity, ctx)


class ResNet(nnx.Module):
    """CIFAR-stem spiking ResNet. ``x`` is ``[N, H, W, C]``; returns logits ``[N, K]``."""

    def __init__(self, *, stage_sizes: Sequence[int], widths: Sequence[int],
                 hidden: int | None = None, num_classes: int, in_channels: int = 3,
                 image_size: int = 32, neuron: NeuronConfig, rngs: nnx.Rngs):
        del image_size  # global average pooling makes the head size-independent
        self.stem = ConvBN(in_channels, widths[0], 3, rngs=rngs)
        self.stem_lif = LIF(neuron)
        self.stages = layers.residual_stages(
            lambda i, o, stride: BasicBlock(i, o, stride, neuron, rngs), stage_sizes, widths)
        in_ch = widths[-1]
        if hidden is None:
            self.hidden, self.hidden_lif = None, None
        else:
            self.hidden = layers.dense(in_ch, hidden, init=layers.TORCH_DEFAULT, rngs=rngs)
            self.hidden_lif = LIF(neuron)
            in_ch = hidden
        self.fc = layers.dense(in_ch, num_classes, init=layers.TORCH_DEFAULT, rngs=rngs)

    def __call__(self, x, ctx: Ctx):
        x = layers.call_unit((self.stem, self.stem_lif), x, ctx, layers.conv_then_lif)
        x = layers.run_stages(self.stages, x, ctx)
        x = layers.global_avg_pool(x)
        if self.hidden is not None:
            x = self.hidden_lif(self.hidden(x), ctx)
        return self.fc(x)
