"""The spiking model zoo, resolved by name.

Every constructor takes ``num_classes``, ``in_channels``, ``image_size``, ``neuron`` (a
:class:`~ratebp_jax.neurons.NeuronConfig`) and ``rngs``, and returns an NNX module whose
``__call__(x_NxHxWxC, ctx)`` gives logits ``[N, K]``. ``*_tiny`` variants keep each
family's structure at widths 4 to 16 for tests. ``compute_dtype`` (:data:`COMPUTE_DTYPES`)
is the dtype convolutions and dense layers compute in; see :func:`set_compute_dtype`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ratebp_jax.layers import LIF
from ratebp_jax.models import preact_resnet, resnet, sew_resnet, vgg
from ratebp_jax.neurons import NeuronConfig

_p = functools.partial
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "resnet18": _p(resnet.ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "resnet19": _p(resnet.ResNet, stage_sizes=(3, 3, 2), widths=(128, 256, 512), hidden=256),
    "vgg11": _p(vgg.VGG, spec=vgg.VGG11),
    "vgg13": _p(vgg.VGG, spec=vgg.VGG13),
    "vggsnn_cifar": _p(vgg.VGG, spec=vgg.VGGSNN_CIFAR),
    "vggsnn_dvs": _p(vgg.VGG, spec=vgg.VGGSNN_DVS),
    "sew_resnet34": _p(sew_resnet.SEWResNet, stage_sizes=(3, 4, 6, 3),
                       widths=(64, 128, 256, 512)),
    "preact_resnet34": _p(preact_resnet.PreActResNet, stage_sizes=(3, 4, 6, 3),
                          widths=(64, 128, 256, 512)),
    "vgg_small": _p(vgg.VGG, spec=vgg.VGG_SMALL),
    # Tiny variants: same structure, test-sized.
    "resnet18_tiny": _p(resnet.ResNet, stage_sizes=(1, 1), widths=(4, 8)),
    "resnet19_tiny": _p(resnet.ResNet, stage_sizes=(1, 1), widths=(4, 8), hidden=8),
    "vgg_tiny": _p(vgg.VGG, spec=vgg.VGG_TINY),
    "vggsnn_tiny": _p(vgg.VGG, spec=vgg.VGGSNN_TINY),
    "sew_resnet_tiny": _p(sew_resnet.SEWResNet, stage_sizes=(1, 1), widths=(4, 8)),
    "preact_resnet_tiny": _p(preact_resnet.PreActResNet, stage_sizes=(1, 1), widths=(4, 8)),
}

# One tiny stand-in per model family, for the exactness tests.
TINY = {
    "resnet18": "resnet18_tiny", "resnet19": "resnet19_tiny", "vgg11": "vgg_tiny",
    "vgg13": "vgg_tiny", "vggsnn_cifar": "vggsnn_tiny", "vggsnn_dvs": "vggsnn_tiny",
    "sew_resnet34": "sew_resnet_tiny", "preact_resnet34": "preact_resnet_tiny",
}

COMPUTE_DTYPES = ("float32", "bfloat16")


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, neuron: NeuronConfig = NeuronConfig(),
                 seed: int = 0, compute_dtype: str = "float32") -> nnx.Module:
    """Build model ``name`` (one of MODELS) with weights drawn from ``seed``, its
    convolutions and dense layers computing in ``compute_dtype`` (:func:`set_compute_dtype`).

    The weights are drawn with JAX's non-partitionable threefry: XLA:CPU compiles each
    initialiser's partitionable threefry in 3 to 10 s (0.4 to 0.8 s otherwise), so this
    one choice takes a tiny model's construction from about 15 s to 2 s. Parameters are
    created replicated, so the partitionable variant's sharding benefit does not apply.
    """
    if name not in MODELS:
        raise ValueError(f"model={name!r}: allowed values are {', '.join(MODELS)}")
    _check_compute_dtype(compute_dtype)
    with jax.threefry_partitionable(False):
        model = MODELS[name](num_classes=num_classes, in_channels=in_channels,
                             image_size=image_size, neuron=neuron, rngs=nnx.Rngs(seed))
    return set_compute_dtype(model, compute_dtype)


def set_compute_dtype(model: nnx.Module, compute_dtype: str) -> nnx.Module:
    """Make every ``nnx.Conv`` and ``nnx.Linear`` of ``model`` compute in ``compute_dtype``
    (in place; returns ``model``). Mixed precision, with float32 master weights:

    * The parameters stay float32, so the optimiser state does too. A layer casts its
      input, kernel and bias to ``compute_dtype`` and returns that dtype; the cast's
      transpose brings each parameter's gradient back as float32.
    * LIF and BatchNorm layers cast their input to float32 and compute in it (see
      ``layers.at_least_float32`` for why), and the methods average the logits over time
      and take the loss in float32. LIF layers return their spikes, exact in bfloat16, in
      ``compute_dtype`` (see ``layers.LIF``).

    ``"float32"`` unsets the layers' dtype (Flax's default: they compute in the dtype of
    their parameters), so float32 programs are exactly what they were without this
    function, and the float64 parity runs stay float64.
    """
    _check_compute_dtype(compute_dtype)
    dtype = None if compute_dtype == "float32" else jnp.dtype(compute_dtype)
    model.set_attributes(nnx.Conv, nnx.Linear, dtype=dtype)
    model.set_attributes(LIF, spike_dtype=dtype)
    return model


def _check_compute_dtype(compute_dtype):
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: allowed values are "
                         f"{', '.join(COMPUTE_DTYPES)}")
