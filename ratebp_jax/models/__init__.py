"""The spiking model zoo, and the researcher's own models, resolved by name.

Every constructor (a *factory*) takes the keyword arguments :data:`FACTORY_KWARGS` and
returns an NNX module whose ``__call__(x_NxHxWxC, ctx)`` gives logits ``[N, K]``; its
further keyword arguments, with defaults, are a config's ``model_kwargs``
(:func:`check_model_kwargs`). ``*_tiny`` variants keep each family's structure at test
size. A model outside the zoo is named by its import path ``"package.module:Factory"``
(:func:`resolve`) or registered by name (:func:`register`); its layers must keep the layer
contract of docs/DESIGN.md section 4.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ratebp_jax import checks
from ratebp_jax.layers import DEFAULT_POOL_TIES, LIF, MaxPool, check_pool_ties
from ratebp_jax.models import mlp, preact_resnet, resnet, sew_resnet, vgg
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
    "mlp": _p(mlp.MLP, hidden=(256, 256)),  # SHD: 700 -> 256 -> 256 -> 20
    # Tiny variants: same structure, test-sized.
    "resnet18_tiny": _p(resnet.ResNet, stage_sizes=(1, 1), widths=(4, 8)),
    "resnet19_tiny": _p(resnet.ResNet, stage_sizes=(1, 1), widths=(4, 8), hidden=8),
    "vgg_tiny": _p(vgg.VGG, spec=vgg.VGG_TINY),
    "vggsnn_tiny": _p(vgg.VGG, spec=vgg.VGGSNN_TINY),
    "sew_resnet_tiny": _p(sew_resnet.SEWResNet, stage_sizes=(1, 1), widths=(4, 8)),
    "preact_resnet_tiny": _p(preact_resnet.PreActResNet, stage_sizes=(1, 1), widths=(4, 8)),
    "mlp_tiny": _p(mlp.MLP, hidden=(8, 8)),
}

# One tiny stand-in per model family, for the exactness tests.
TINY = {
    "resnet18": "resnet18_tiny", "resnet19": "resnet19_tiny", "vgg11": "vgg_tiny",
    "vgg13": "vgg_tiny", "vggsnn_cifar": "vggsnn_tiny", "vggsnn_dvs": "vggsnn_tiny",
    "sew_resnet34": "sew_resnet_tiny", "preact_resnet34": "preact_resnet_tiny",
}

COMPUTE_DTYPES = ("float32", "bfloat16")
FACTORY_KWARGS = ("num_classes", "in_channels", "image_size", "neuron", "rngs")
ZOO = frozenset(MODELS)  # the built-in names, which register() never replaces


def register(name: str, factory: Callable[..., nnx.Module]) -> None:
    """Make ``factory`` model ``name`` in this process (a notebook's; ``experiments/main.py``
    takes an import path instead). Registering a name again replaces its factory, so that a
    notebook cell can be rerun; the zoo's names cannot be replaced."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name={name!r}: must be a non-empty name without ':' (a ':' marks "
                         f"an import path, package.module:Factory)")
    if name in ZOO:
        raise ValueError(f"name={name!r}: is a zoo model; choose another name")
    _check_factory(name, factory)
    MODELS[name] = factory


def resolve(name: str) -> Callable[..., nnx.Module]:
    """The factory of model ``name``: a key of MODELS, or an import path
    ``"package.module:Factory"``. Raises ValueError (TypeError for an attribute that is not
    callable) naming ``model=...`` and what is allowed, before anything is built."""
    if not isinstance(name, str) or ":" not in name:
        checks.check_choice("model", name, MODELS, also="an import path package.module:Factory")
        return MODELS[name]
    module_name, _, attribute = name.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".") + [attribute]):
        raise ValueError(f"model={name!r}: an import path must be package.module:Factory "
                         f"(dotted Python names, not a file path)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        # Only a missing module of the path itself is a search-path problem; an import
        # that fails inside the module (a missing dependency) says so in its own message.
        where = ("; run from the folder that holds it, or put that folder on PYTHONPATH"
                 if isinstance(e, ModuleNotFoundError) and e.name
                 and (module_name + ".").startswith(e.name + ".") else "")
        raise ValueError(f"model={name!r}: cannot import module {module_name!r} ({e}){where}"
                         ) from e
    if not hasattr(module, attribute):
        raise ValueError(f"model={name!r}: module {module_name!r} has no attribute "
                         f"{attribute!r}")
    factory = getattr(module, attribute)
    _check_factory(name, factory)
    return factory


def factory_signature(factory) -> inspect.Signature | None:
    """The signature a call of ``factory`` binds to (None for a builtin): a class's
    ``__init__`` without ``self``, as an NNX class reports its metaclass's, and a
    ``functools.partial`` as what it wraps, its bound keywords as defaults."""
    args, keywords = (), {}
    while isinstance(factory, functools.partial):
        args, keywords = factory.args + args, {**factory.keywords, **keywords}
        factory = factory.func
    if inspect.isclass(factory):
        factory, args = factory.__init__, (None, *args)
    try:
        return inspect.signature(functools.partial(factory, *args, **keywords))
    except (TypeError, ValueError):
        return None


def model_keywords(name: str) -> tuple[str, ...] | None:
    """The keyword arguments model ``name``'s factory takes beyond :data:`FACTORY_KWARGS`
    (what ``model_kwargs`` may set), in signature order; None when it takes any
    (``**kwargs``) or its signature cannot be read."""
    signature = factory_signature(resolve(name))
    if signature is None or any(p.kind is p.VAR_KEYWORD
                                for p in signature.parameters.values()):
        return None
    return tuple(k for k, p in signature.parameters.items()
                 if k not in FACTORY_KWARGS and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY))


def check_model_kwargs(name: str, model_kwargs) -> dict:
    """``model_kwargs`` (a dict or ConfigDict) as a plain dict, checked before anything is
    built: keys model ``name``'s factory takes beyond :data:`FACTORY_KWARGS`, and values
    config.json keeps. Raises ValueError naming the argument and the allowed names."""
    kwargs = model_kwargs.to_dict() if hasattr(model_kwargs, "to_dict") else model_kwargs
    if not isinstance(kwargs, dict):
        raise ValueError(f"model_kwargs={model_kwargs!r}: must be a dict of keyword "
                         f"arguments, e.g. \"{{'width': 8}}\"")
    allowed = model_keywords(name)
    for key, value in kwargs.items():
        if key in FACTORY_KWARGS:
            raise ValueError(f"model_kwargs={kwargs!r}: {key!r} is one of the model keywords "
                             f"({', '.join(FACTORY_KWARGS)}), which the trainer sets from "
                             f"the config")
        if allowed is not None and key not in allowed:
            names = (checks.allowed_values(allowed) if allowed
                     else "it takes no keyword arguments beyond the model keywords")
            raise ValueError(f"model_kwargs={kwargs!r}: model {name!r} takes no argument "
                             f"{key!r}; {names}{checks.closest(str(key), allowed)}")
        if not _json_value(value):
            raise ValueError(f"model_kwargs={kwargs!r}: {key!r} has a value of type "
                             f"{type(value).__name__}; allowed are numbers, strings, "
                             f"booleans, None, and lists, tuples and dicts of them")
    _check_factory(name, resolve(name), kwargs)
    return kwargs


def _json_value(value) -> bool:
    """Whether ``value`` is kept by config.json (tuples come back as lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, float) or math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(map(_json_value, value))
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return False


def _check_factory(name: str, factory, model_kwargs=None) -> None:
    """A factory must be callable with the keyword arguments every model gets (any
    further arguments have defaults), and with ``model_kwargs`` added; checked on its
    signature, so a mismatch is named before any run starts."""
    expects = f"a class or function taking {', '.join(FACTORY_KWARGS)}"
    if not callable(factory):
        raise TypeError(f"model={name!r}: not callable (a {type(factory).__name__}); "
                        f"expected {expects}")
    signature = factory_signature(factory)
    if signature is None:  # no signature to read: the call will tell
        return
    try:
        signature.bind(**dict.fromkeys(FACTORY_KWARGS))
    except TypeError as e:
        raise ValueError(f"model={name!r}: does not take the model keywords ({e}); "
                         f"expected {expects}") from e
    if model_kwargs is not None:
        try:
            signature.bind(**dict.fromkeys(FACTORY_KWARGS), **model_kwargs)
        except TypeError as e:
            raise ValueError(f"model_kwargs={model_kwargs!r}: model {name!r} cannot be "
                             f"called with them and the model keywords ({e})") from e


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32, neuron: NeuronConfig = NeuronConfig(),
                 seed: int = 0, compute_dtype: str = "float32",
                 pool_ties: str = DEFAULT_POOL_TIES,
                 model_kwargs: dict | None = None) -> nnx.Module:
    """Build model ``name`` (see :func:`resolve`) with weights drawn from ``seed``, its
    convolutions and dense layers computing in ``compute_dtype`` (:func:`set_compute_dtype`)
    and its max pooling breaking ties by ``pool_ties`` (:func:`set_pool_ties`).
    ``model_kwargs`` are the factory's own further arguments (:func:`check_model_kwargs`),
    such as a zoo alias's ``widths`` or ``examples/my_snn.py``'s ``width``.

    The weights are drawn with JAX's non-partitionable threefry, which XLA:CPU compiles
    several times faster (parameters are created replicated, so the partitionable variant's
    sharding does not apply), under one ``nnx.jit``: one program instead of one per
    initialiser and shape, with the same weights. A factory that needs concrete values
    while it builds runs eagerly.
    """
    factory = resolve(name)
    kwargs = check_model_kwargs(name, model_kwargs or {})
    _check_compute_dtype(compute_dtype)
    check_pool_ties(pool_ties)

    def build():
        model = factory(num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size, neuron=neuron, rngs=nnx.Rngs(seed), **kwargs)
        if not isinstance(model, nnx.Module):
            raise TypeError(f"model={name!r}: the factory returned a "
                            f"{type(model).__name__}, not an nnx.Module")
        return model

    with jax.threefry_partitionable(False):
        try:
            try:
                model = nnx.jit(build)()
            except jax.errors.ConcretizationTypeError:  # a factory that needs concrete values
                model = build()
        except (TypeError, ValueError) as e:
            if not kwargs:
                raise
            # A value the signature accepts but the factory cannot use (a width of "8").
            raise ValueError(f"model_kwargs={kwargs!r}: model {name!r} cannot be built with "
                             f"them ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    return set_pool_ties(set_compute_dtype(model, compute_dtype), pool_ties)


def set_compute_dtype(model: nnx.Module, compute_dtype: str) -> nnx.Module:
    """Make every ``nnx.Conv`` and ``nnx.Linear`` of ``model`` compute in ``compute_dtype``,
    and its LIF layers return their spikes in it (in place; returns ``model``).

    Parameters, and so gradients and optimiser state, stay float32; LIF and BatchNorm
    compute in float32 (``layers.at_least_float32``). ``"float32"`` unsets the layers'
    dtype (they compute in their parameters'), so float32 programs are unchanged and the
    float64 parity runs stay float64.
    """
    _check_compute_dtype(compute_dtype)
    dtype = None if compute_dtype == "float32" else jnp.dtype(compute_dtype)
    model.set_attributes(nnx.Conv, nnx.Linear, dtype=dtype)
    model.set_attributes(LIF, spike_dtype=dtype)
    return model


def set_pool_ties(model: nnx.Module, pool_ties: str) -> nnx.Module:
    """Make every ``layers.MaxPool`` of ``model`` break ties by ``pool_ties``
    (``layers.POOL_TIES``), in place; returns ``model``. The rule is part of the graph, so
    split the model after setting it."""
    model.set_attributes(MaxPool, ties=check_pool_ties(pool_ties), raise_if_not_found=False)
    return model


def _check_compute_dtype(compute_dtype):
    checks.check_choice("compute_dtype", compute_dtype, COMPUTE_DTYPES)
