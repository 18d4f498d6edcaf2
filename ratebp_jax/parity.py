"""Parity with the paper's reference code, one training step at a time.

A reference vector file (``tests/data/reference_vectors/*.json``) records one step of the
reference PyTorch implementation: loss, logits, and summaries (norm, sum, random
projection) of every gradient and BN buffer. The weights and inputs are rebuilt from the
seed by the vectors' recipe, imported with :mod:`ratebp_jax.interop`, and the same step is
run here with ``rate_grad_scale="reference"``. The comparison rule is the vectors' README's.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ratebp_jax import interop, layers, methods, models, neurons

LOSS_RTOL, LOGITS_ATOL, DEV_TOL = 1e-5, 1e-4, 1e-3


def read_keys(path) -> list[tuple[str, tuple, str, str]]:
    """``keys_<arch>.txt``: ``[(name, shape, dtype, "param" | "buffer")]`` in order."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                name, shape, dtype, kind = line.rstrip("\n").split("\t")
                rows.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s),
                             dtype, kind))
    return rows


def rebuild_state_dict(keys, seed: int) -> dict[str, np.ndarray]:
    """The recipe's weights: entry i drawn from ``default_rng([seed, i])``."""
    sd = {}
    for i, (name, shape, _, _) in enumerate(keys):
        rng = np.random.default_rng([seed, i])
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            sd[name] = np.zeros(shape, np.int64)
        elif leaf == "running_mean":
            sd[name] = np.zeros(shape, np.float32)
        elif leaf == "running_var":
            sd[name] = np.ones(shape, np.float32)
        elif leaf == "weight" and len(shape) >= 2:
            sd[name] = (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
                        ).astype(np.float32)
        elif leaf == "weight":
            sd[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif leaf == "bias":
            sd[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            raise ValueError(f"keys: no recipe for entry {name!r}")
    return sd


def rebuild_batch(seed: int, batch: int, channels: int, size: int, num_classes: int):
    x_NCHW = np.random.default_rng([seed, 1000000]).standard_normal(
        (batch, channels, size, size)).astype(np.float32)
    labels = np.random.default_rng([seed, 1000001]).integers(0, num_classes, batch)
    return {"image": np.transpose(x_NCHW, (0, 2, 3, 1)), "label": labels.astype(np.int32)}


def summarize(values: np.ndarray, seed: int, direction_index: int) -> dict:
    """``norm``, ``sum`` and ``proj`` (onto a seeded Gaussian direction), in float64."""
    v = np.asarray(values, np.float64)
    direction = np.random.default_rng([seed, direction_index]).standard_normal(v.shape)
    return {"norm": float(np.linalg.norm(v)), "sum": float(v.sum()),
            "proj": float((v * direction).sum())}


def deviation(ours: dict, ref: dict, n: int, floor: float) -> float:
    """The README's rule: max(|dnorm|, |dproj|, |dsum|/sqrt(n)) / max(norm, floor)."""
    return max(abs(ours["norm"] - ref["norm"]), abs(ours["proj"] - ref["proj"]),
               abs(ours["sum"] - ref["sum"]) / np.sqrt(n)) / max(ref["norm"], floor)


NEURON_RESETS = {"soft": "soft", "soft_nodetach": "soft_nodetach", "hard": "hard"}


def input_channels(keys) -> int:
    """The input channels of the architecture in ``keys``: those of its first convolution."""
    return next(shape for _, shape, _, _ in keys if len(shape) == 4)[1]


def reference_model(vec: dict, keys) -> nnx.Module:
    """The file's model with the recipe's weights (float32). The import replaces every
    parameter and buffer, so the model is built abstractly (``nnx.eval_shape``), skipping
    the initialisers' compilation (docs/RESULTS.md, "The test suite's time"); only the
    scalar placeholders of the records, which the import does not name, are made here."""
    model = nnx.eval_shape(lambda: models.create_model(
        vec["arch"], num_classes=vec["num_classes"], in_channels=input_channels(keys),
        image_size=vec["image_size"], neuron=neurons.NeuronConfig(
            reset=NEURON_RESETS[vec["reset"]]), pool_ties="first"))  # the reference's rule
    interop.import_state_dict(model, rebuild_state_dict(keys, vec["seed"]))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and isinstance(var.get_value(), jax.ShapeDtypeStruct):
            if not isinstance(var, (layers.Record, layers.Membrane)):
                raise ValueError(f"{vec['arch']}: {type(var).__name__} of shape "
                                 f"{var.get_value().shape} is not in the keys")
            abstract = var.get_value()
            var.set_value(jnp.zeros(abstract.shape, abstract.dtype))
    return model


def run_reference_step(vec: dict, keys, dtype=np.float32, compiler_options=None, model=None):
    """Our step on the file's configuration, computed in ``dtype`` (float64 needs
    ``jax_enable_x64``), compiled with XLA's ``compiler_options`` (``jax.jit``'s), on
    ``model`` (default: :func:`reference_model`; pass one to run several steps on it).
    Returns ``(loss, logits, grads_sd, buffers_sd)`` with gradients and buffers in the
    reference's names and layouts."""
    model = reference_model(vec, keys) if model is None else model
    net, params, batch_stats = methods.split_model(model)
    batch = rebuild_batch(vec["seed"], vec["batch"], input_channels(keys), vec["image_size"],
                          vec["num_classes"])
    cast = lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x  # noqa
    params, batch_stats = jax.tree.map(cast, params), jax.tree.map(cast, batch_stats)
    batch["image"] = cast(batch["image"])
    grad_fn = methods.make_grad_fn(vec["method"], net, T=vec["T"], step_mode=vec["step_mode"],
                                   rate_grad_scale=vec["rate_grad_scale"])
    (loss, aux), grads = jax.jit(grad_fn, compiler_options=compiler_options)(
        params, batch_stats, batch)
    grads_sd = interop.tree_to_reference(model, grads)
    buffers_sd = interop.tree_to_reference(model, aux["batch_stats"], buffers=True)
    return float(loss), np.asarray(aux["logits"]), grads_sd, buffers_sd


CONFIG_FIELDS = ("arch", "seed", "batch", "image_size", "num_classes", "step_mode",
                 "method", "T", "reset", "rate_grad_scale")


def load_vector(path: str, keys_dir: str | None = None) -> tuple[dict, list]:
    """A vector file and its architecture's keys (``keys_<arch>.txt`` next to it, or in
    ``keys_dir``)."""
    with open(path) as f:
        vec = json.load(f)
    vec["file"] = os.path.basename(path)
    keys_path = os.path.join(keys_dir or os.path.dirname(path), f"keys_{vec['arch']}.txt")
    return vec, read_keys(keys_path)


def step_config(vec: dict) -> dict:
    """The fields that define a vector's step: two files with equal configs (the float32
    and float64 sets) describe the same step, so one run of ours serves both."""
    return {k: vec[k] for k in CONFIG_FIELDS}


def compare(vec: dict, keys, step, dtype=np.float32) -> dict:
    """The vectors' README's rule applied to our ``step`` (``run_reference_step``'s
    output). Returns ``{"file", "dtype", "loss" (ours), "loss_rel_err",
    "logits_max_abs_err", "worst_param", "worst_dev", "worst_buffer", "worst_buffer_dev",
    "pass"}``."""
    loss, logits, grads_sd, buffers_sd = step
    index = {name: i for i, (name, *_rest) in enumerate(keys)}
    grad_norm_max = max(g["norm"] for g in vec["grads"].values())
    devs = {}
    for name, ref in vec["grads"].items():
        ours = summarize(grads_sd[name], vec["seed"], 2000000 + index[name])
        devs[name] = deviation(ours, ref, grads_sd[name].size, 1e-3 * grad_norm_max)
    buffer_devs = {}
    for name, ref in vec.get("buffers_after", {}).items():
        ours = summarize(buffers_sd[name], vec["seed"], 3000000 + index[name])
        buffer_devs[name] = deviation(ours, ref, buffers_sd[name].size, 1e-3)
    worst = max(devs, key=devs.get)
    worst_buffer = max(buffer_devs, key=buffer_devs.get) if buffer_devs else None
    loss_rel_err = abs(loss - vec["loss"]) / abs(vec["loss"])
    logits_err = float(np.max(np.abs(logits - np.asarray(vec["logits"]))))
    passed = (loss_rel_err <= LOSS_RTOL and logits_err <= LOGITS_ATOL
              and devs[worst] <= DEV_TOL
              and (worst_buffer is None or buffer_devs[worst_buffer] <= DEV_TOL))
    return {"file": vec["file"], "dtype": np.dtype(dtype).name,
            "loss": float(loss), "loss_rel_err": loss_rel_err,
            "logits_max_abs_err": logits_err, "worst_param": worst, "worst_dev": devs[worst],
            "worst_buffer": worst_buffer,
            "worst_buffer_dev": buffer_devs[worst_buffer] if worst_buffer else None,
            "pass": bool(passed)}


def check_file(path: str, keys_dir: str | None = None, dtype=np.float32) -> dict:
    """Run and compare one vector file (see :func:`compare`)."""
    vec, keys = load_vector(path, keys_dir)
    return compare(vec, keys, run_reference_step(vec, keys, dtype), dtype)
