"""Import and export the reference PyTorch code's ``state_dict`` (as name -> array).

Each zoo model has a fixed correspondence between its NNX modules and the reference's
module names (``layer2.0.shortcut.1`` <-> ``stages.1.0.shortcut.bn``). Layout changes:
convolution kernels OIHW <-> HWIO, linear weights ``[out, in]`` <-> ``[in, out]``, and the
VGG classifier's input rows from NCHW flatten order (C, H, W) to ours (H, W, C). BatchNorm
``weight/bias/running_mean/running_var/num_batches_tracked`` map to
``scale/bias/mean/var/count``. torch is never required: ``.npz`` works everywhere, and
``.pth`` files load when torch happens to be installed.
"""
from __future__ import annotations

import os
import re

import numpy as np
from flax import nnx

from ratebp_jax import layers
from ratebp_jax.models import preact_resnet, resnet, sew_resnet, vgg

BN_FIELDS = {"weight": "scale", "bias": "bias", "running_mean": "mean",
             "running_var": "var", "num_batches_tracked": "count"}


# --------------------------------------------------------------------------- name maps
def _block_name(p, projection: str):
    """``stages.i.j.{conv1,conv2,<projection>}.{conv,bn}`` -> the reference's
    ``layer{i+1}.j.{conv1,bn1,conv2,bn2,<projection>.0,<projection>.1}``, else None."""
    m = re.fullmatch(rf"stages\.(\d+)\.(\d+)\.(conv1|conv2|{projection})\.(conv|bn)", p)
    if not m:
        return None
    stage, block, unit, part = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}."
    if unit == projection:
        return prefix + projection + (".0" if part == "conv" else ".1")
    return prefix + (unit if part == "conv" else "bn" + unit[-1])


def _resnet_name(path, model):
    p = ".".join(map(str, path))
    if p.startswith("stem."):
        return {"stem.conv": "conv0.0", "stem.bn": "conv0.1"}[p]
    if p.startswith("stages."):
        return _block_name(p, "shortcut")
    if p == "hidden":
        return "classifier.0"
    if p == "fc":
        return "classifier.2" if model.hidden is not None else "classifier.0"
    return None


def _vgg_name(path, model):
    p = ".".join(map(str, path))
    m = re.fullmatch(r"features\.(\d+)\.(conv|bn)", p)
    if m:
        unit, part = int(m.group(1)) // 2, m.group(2)
        index, convs = 0, 0
        for item in model.spec:  # reference: conv, bn, lif per int; one module per pool
            if item in vgg.POOLS:
                index += 1
                continue
            if convs == unit:
                return f"feature.{index + (0 if part == 'conv' else 1)}"
            index, convs = index + 3, convs + 1
    m = re.fullmatch(r"classifier\.(\d+)", p)
    if m:
        return f"classifier.{2 * int(m.group(1))}"  # a LIF sits between reference Linears
    return None


def _sew_name(path, model):
    p = ".".join(map(str, path))
    if p in ("stem.conv_bn.conv", "stem.conv_bn.bn"):
        return "convNeuron1." + ("0" if p.endswith("conv") else "1")
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(unit1|unit2|downsample)\.conv_bn\.(conv|bn)", p)
    if m:
        stage, block, unit, part = m.groups()
        name = {"unit1": "convNeuron1", "unit2": "convNeuron2", "downsample": "downsample"}
        return f"layer{int(stage) + 1}.{block}.{name[unit]}." + ("0" if part == "conv" else "1")
    return "fc" if p == "fc" else None


def _preact_name(path, model):
    p = ".".join(map(str, path))
    if p in ("stem.conv", "stem.bn"):
        return "conv1" if p.endswith("conv") else "bn1"
    if p.startswith("stages."):
        return _block_name(p, "downsample")
    return "fc" if p == "fc" else None


_NAMERS = {resnet.ResNet: _resnet_name, vgg.VGG: _vgg_name,
           sew_resnet.SEWResNet: _sew_name, preact_resnet.PreActResNet: _preact_name}


def module_names(model) -> dict[tuple, tuple[str, nnx.Module]]:
    """``{our module path: (reference prefix, module)}`` for every conv, linear and BN."""
    namer = _NAMERS.get(type(model))
    if namer is None:
        raise TypeError(f"model: {type(model).__name__} has no reference state_dict mapping")
    out = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (nnx.Conv, nnx.Linear, layers.BatchNorm)):
            name = namer(path, model)
            if name is None:
                raise ValueError(f"no reference name for module {'.'.join(map(str, path))}")
            out[path] = (name, module)
    return out


# --------------------------------------------------------------------------- layouts
def _flatten_perm(model, module):
    """For the VGG classifier's first Linear: (C, H, W) of the map it flattens, or None."""
    if isinstance(model, vgg.VGG) and module is model.classifier[0]:
        c = module.in_features
        side = {"AA": 1, "AA3": 3}.get(model.spec[-1])
        if side is None:  # 'A' last: derive the spatial size from the feature count
            last = [s for s in model.spec if s not in vgg.POOLS][-1]
            side = int(round((c / last) ** 0.5))
            c = last
        else:
            c = c // (side * side)
        return c, side, side
    return None


def _to_ours(kind, ref, chw=None):
    if kind == "conv":
        return np.transpose(ref, (2, 3, 1, 0))
    if kind == "linear":
        if chw is not None:
            c, h, w = chw
            ref = ref.reshape(ref.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(ref.shape[0], -1)
        return ref.T
    return ref


def _to_reference(kind, ours, chw=None):
    if kind == "conv":
        return np.transpose(ours, (3, 2, 0, 1))
    if kind == "linear":
        ref = ours.T
        if chw is not None:
            c, h, w = chw
            ref = ref.reshape(ref.shape[0], h, w, c).transpose(0, 3, 1, 2).reshape(ref.shape[0], -1)
        return ref
    return ours


def _entries(model):
    """``[(reference key, module, attribute, kind, chw)]`` for every importable entry."""
    entries = []
    for _, (prefix, module) in module_names(model).items():
        if isinstance(module, layers.BatchNorm):
            for ref_field, ours in BN_FIELDS.items():
                entries.append((f"{prefix}.{ref_field}", module, ours, "bn", None))
            continue
        kind = "conv" if isinstance(module, nnx.Conv) else "linear"
        entries.append((f"{prefix}.weight", module, "kernel", kind,
                        _flatten_perm(model, module)))
        if module.bias is not None:
            entries.append((f"{prefix}.bias", module, "bias", "bias", None))
    return entries


# --------------------------------------------------------------------------- public API
def import_state_dict(model, state_dict: dict, *, strict: bool = True) -> None:
    """Load a reference ``state_dict`` into ``model`` in place.

    Unknown, missing and mis-shaped keys are reported by name in one ``ValueError``
    (unknown keys are allowed with ``strict=False``).
    """
    entries = _entries(model)
    expected = {key for key, *_ in entries}
    missing = sorted(expected - set(state_dict))
    unknown = sorted(set(state_dict) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unknown and strict:
        problems.append(f"unknown keys: {', '.join(unknown)}")
    values = {}
    for key, module, attr, kind, chw in entries:
        if key not in state_dict:
            continue
        var = getattr(module, attr)
        value = _to_ours(kind, np.asarray(state_dict[key]), chw)
        if value.shape != var[...].shape:
            problems.append(f"{key}: shape {list(np.shape(state_dict[key]))} does not fit "
                            f"{'.'.join(map(str, _path_of(model, module)))}.{attr} "
                            f"{list(var[...].shape)}")
            continue
        values[(module, attr)] = value.astype(var[...].dtype)
    if problems:
        raise ValueError("state_dict: " + "; ".join(problems))
    for (module, attr), value in values.items():
        getattr(module, attr)[...] = value


def export_state_dict(model) -> dict[str, np.ndarray]:
    """``model``'s parameters and BN buffers as a reference ``state_dict`` (float32, with
    ``num_batches_tracked`` as int64), in the reference's key order per module."""
    out = {}
    for key, module, attr, kind, chw in _entries(model):
        value = _to_reference(kind, np.asarray(getattr(module, attr)[...]), chw)
        out[key] = value.astype(np.int64) if attr == "count" else value
    return out


BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def tree_to_reference(model, tree, *, buffers: bool = False) -> dict[str, np.ndarray]:
    """A params-shaped tree (e.g. gradients), or with ``buffers=True`` a batch_stats-shaped
    one, in the reference's names and layouts."""
    shadow = nnx.clone(model)
    nnx.update(shadow, tree)
    return {k: v for k, v in export_state_dict(shadow).items()
            if k.endswith(BUFFER_SUFFIXES) == buffers}


def _path_of(model, target):
    for path, module in nnx.iter_modules(model):
        if module is target:
            return path
    return ()


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """Read ``.npz`` (always) or ``.pth``/``.pt`` (when torch is installed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state_dict={path!r}: no such file")
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    try:
        import torch
    except ImportError:
        raise ValueError(f"state_dict={path!r}: reading .pth needs torch; save it as .npz "
                         f"with numpy instead") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k.removeprefix("module."): v.numpy() for k, v in sd.items()}
