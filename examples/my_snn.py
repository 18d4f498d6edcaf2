"""A spiking network of one's own, trained with rate-BP or BPTT by the same code as the zoo.

    python experiments/main.py --config.model=examples.my_snn:MySNN   # from the repo root

The factory contract (``ratebp_jax.models``): the constructor takes ``num_classes``,
``in_channels``, ``image_size``, ``neuron`` and ``rngs``, and ``__call__(x, ctx)`` returns
logits. The layer contract (docs/DESIGN.md section 4): every spiking neuron is a
``layers.LIF`` and every BatchNorm a ``layers.BatchNorm``, and both get ``ctx``; everything
else is linear (convolutions, dense layers, average pooling), so the rate pass can run it
on firing rates as it is.
"""
from flax import nnx

from ratebp_jax import layers


class MySNN(nnx.Module):
    """conv3x3 -> BatchNorm -> LIF -> 2x2 average pool -> dense. ``x`` is ``[N, H, W, C]``
    (N is T*B in multi step mode, B in single step mode); returns logits ``[N, K]``."""

    def __init__(self, *, num_classes, in_channels, image_size, neuron, rngs, width=16):
        self.conv = layers.conv(in_channels, width, 3, bias=False, init=layers.TORCH_DEFAULT,
                                rngs=rngs)
        self.bn = layers.BatchNorm(width)
        self.lif = layers.LIF(neuron)
        self.fc = layers.dense(width * (image_size // 2) ** 2, num_classes,
                               init=layers.TORCH_DEFAULT, rngs=rngs)

    def __call__(self, x, ctx):
        spikes = self.lif(self.bn(self.conv(x), ctx), ctx)
        pooled = layers.avg_pool(spikes, 2)
        return self.fc(pooled.reshape(pooled.shape[0], -1))
