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
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
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
        current = getattr(module, attr).get_value()
        value = _to_ours(kind, np.asarray(state_dict[key]), chw)
        if value.shape != current.shape:
            problems.append(f"{key}: shape {list(np.shape(state_dict[key]))} does not fit "
                            f"{'.'.join(map(str, _path_of(model, module)))}.{attr} "
                            f"{list(current.shape)}")
            continue
        values[(module, attr)] = value.astype(current.dtype)
    if problems:
        raise ValueError("state_dict: " + "; ".join(problems))
    for (module, attr), value in values.items():
        _replace_value(getattr(module, attr), value)


def _replace_value(var, value: np.ndarray) -> None:
    """Give ``var`` the new array ``value``, placed as its current one was. Set, not written
    into (``var[...] = value``), which would fail on an abstract model and compile a scatter
    per shape."""
    current = var.get_value()
    if getattr(current, "committed", False):
        var.set_value(jax.device_put(value, current.sharding))
    else:
        var.set_value(jnp.asarray(value))


def reference_shapes(model) -> dict[str, tuple[int, ...]]:
    """The shape of each entry of the reference ``state_dict`` that ``model`` imports and
    exports, in the reference's key order; an abstract model (``nnx.eval_shape``) will do."""
    shapes = {}
    for key, module, attr, kind, chw in _entries(model):
        shape = getattr(module, attr).get_value().shape
        shapes[key] = _to_reference(kind, np.broadcast_to(np.float32(0), shape), chw).shape
    return shapes


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


# --------------------------------------------------------------------------- files
# Where training scripts nest the weights in a checkpoint dict, most specific first: the
# reference's ``model_weights.pth`` is ``{best_acc, best_epoch, best_net, optimizer}``.
NESTED_STATE_DICT = ("best_net", "state_dict", "model")
# What a checkpoint may record about its weights, reported as found.
METADATA_KEYS = ("best_acc", "best_epoch", "epoch")


def unpack_checkpoint(obj, source: str = "state_dict") -> tuple[dict[str, np.ndarray], dict]:
    """``(state_dict, metadata)`` from a loaded checkpoint: a bare state_dict or a dict that
    nests one under ``best_net``, ``state_dict`` or ``model``.

    Pure and torch-free: values are numpy arrays or anything with ``.numpy()`` (tensors).
    Other entries (numbers, strings, optimizer dicts) are dropped, and the ``module.`` prefix
    that DistributedDataParallel puts on every key is stripped, so a DDP run's file imports
    like a single-device one. ``metadata`` holds the METADATA_KEYS the checkpoint recorded.
    ``source`` names the file in errors.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: holds a {type(obj).__name__}, not a dict of tensors")
    nested = next((obj[k] for k in NESTED_STATE_DICT if isinstance(obj.get(k), Mapping)), obj)
    state_dict = {k.removeprefix("module."): _as_array(v) for k, v in nested.items()
                  if isinstance(k, str) and _is_tensor(v)}
    if not state_dict:
        keys = ", ".join(map(str, obj)) or "none"
        raise ValueError(f"{source}: holds no tensors (keys: {keys})")
    metadata = {k: _as_scalar(obj[k]) for k in METADATA_KEYS if k in obj}
    return state_dict, metadata


def _is_tensor(value) -> bool:
    return isinstance(value, np.ndarray) or callable(getattr(value, "numpy", None))


def _as_array(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value.numpy())


def _as_scalar(value):
    """A recorded number as a Python number (checkpoints may store 0-d tensors)."""
    return value.item() if callable(getattr(value, "item", None)) else value


def load_reference_file(path: str, *, label: str = "state_dict") -> tuple[dict, dict]:
    """``(state_dict, metadata)`` from a ``.npz`` (always) or a ``.pth``/``.pt`` (when torch is
    installed), see ``unpack_checkpoint``. Errors name the file as ``label=path``; a command
    line passes its flag as ``label``."""
    source = f"{label}={path!r}"
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(f"{source}: {what}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return unpack_checkpoint(_read_npz(path, source), source)
    if ext in (".pth", ".pt"):
        return unpack_checkpoint(_read_torch(path, source), source)
    raise ValueError(f"{source}: unknown format {ext or '(no extension)'!r}; give a .npz, or a "
                     f".pth/.pt when torch is installed")


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """The state_dict of ``load_reference_file``, without the metadata."""
    return load_reference_file(path)[0]


def _read_npz(path: str, source: str) -> dict[str, np.ndarray]:
    # np.load takes a file that is not a zip for a pickle and then blames pickling (or zipfile
    # raises BadZipFile), so a truncated download would be reported misleadingly.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{source}: not a .npz archive (not a zip file; truncated, or another "
                         f"format)")
    try:
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{source}: unreadable .npz ({type(e).__name__}: {e})") from None


def _read_torch(path: str, source: str):
    try:
        import torch
    except ImportError:
        raise ValueError(f"{source}: reading .pth needs torch; save it as .npz with numpy "
                         f"instead") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but plain data
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}" if found else "not a file of tensors and numbers"
        raise ValueError(f"{source}: torch.load(weights_only=True) cannot read it ({what}); "
                         f"save the model's state_dict() instead") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{source}: torch.load failed ({first})") from None
