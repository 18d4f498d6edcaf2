"""Gradient comparison between methods: cosine, norm ratio and relative error, per
parameter and per layer (compiled memory and time: ``profiling.py``)."""
from __future__ import annotations

import math

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from flax import nnx


def named_leaves(tree) -> list[tuple[str, np.ndarray]]:
    """``[(dotted path, array)]`` of an NNX state or a nested dict of arrays, in path order."""
    state = tree if isinstance(tree, nnx.State) else nnx.State(tree)
    return [(".".join(map(str, path)), np.asarray(jax.device_get(v.get_value()
                                                                  if hasattr(v, "get_value")
                                                                  else v)))
            for path, v in nnx.to_flat_state(state)]


def cosine_and_norm_ratio(dot, norm2, norm2_ref) -> tuple[float, float]:
    """``(cosine, |g| / |g_ref|)`` of two gradients from ``<g, g_ref>``, ``|g|^2`` and
    ``|g_ref|^2``. Two zero gradients are identical, ``(1.0, 1.0)``; a figure that is
    undefined (a zero gradient against a non-zero one) or not finite is NaN."""
    dot, norm2, norm2_ref = float(dot), float(norm2), float(norm2_ref)
    if norm2 == 0 and norm2_ref == 0:
        return 1.0, 1.0
    nan = float("nan")
    defined = norm2 > 0 and norm2_ref > 0
    cosine = dot / (math.sqrt(norm2) * math.sqrt(norm2_ref)) if defined else nan
    ratio = math.sqrt(norm2 / norm2_ref) if norm2_ref > 0 else nan
    return tuple(x if math.isfinite(x) else nan for x in (cosine, ratio))


# The parity checker's floor (``parity.py``): a parameter's error is measured against at
# least this fraction of the whole reference gradient's norm.
REL_ERR_FLOOR = 1e-3


def _agreement(g, g_ref) -> dict:
    cosine, ratio = cosine_and_norm_ratio(np.dot(g, g_ref), np.dot(g, g), np.dot(g_ref, g_ref))
    return {"cosine": cosine, "norm_ratio": ratio,
            "norm": float(np.linalg.norm(g)), "norm_ref": float(np.linalg.norm(g_ref))}


def compare_gradients(grads, grads_ref, layers: list | None = None) -> dict:
    """Compare ``grads`` with the reference ``grads_ref`` (same tree structure), in float64.

    Returns ``{"cosine", "norm_ratio", "norm", "norm_ref", "max_rel_err", "max_zero_err",
    "per_param"}`` over all parameters, ``per_param`` a list of ``{"name", "cosine",
    "norm_ratio", "norm", "norm_ref", "rel_err", "structurally_zero"}`` in path order.

    ``rel_err = ||g - g_ref|| / max(||g_ref||, REL_ERR_FLOOR * ||G_ref||)``, ``G_ref`` the
    whole reference gradient, as the parity checker measures it: a parameter whose true
    gradient is zero (a conv bias feeding a BatchNorm) would otherwise divide rounding noise
    by rounding noise. Such a parameter, under the floor, is ``structurally_zero``; even
    floored its ``rel_err`` is noise, so ``max_rel_err`` leaves it out and ``max_zero_err``
    measures it against the whole gradient, ``max ||g - g_ref|| / ||G_ref||``.

    With ``layers`` (:func:`layer_groups`) it adds ``per_layer`` (``{"name", "params",
    "cosine", "norm_ratio", "norm", "norm_ref"}``) and ``hidden`` (:func:`hidden_summary`).
    """
    named, named_ref = named_leaves(grads), named_leaves(grads_ref)
    assert [n for n, _ in named] == [n for n, _ in named_ref], "different parameter trees"
    flat = {n: g.astype(np.float64).ravel() for n, g in named}
    flat_ref = {n: g.astype(np.float64).ravel() for n, g in named_ref}
    g_all, g_ref_all = np.concatenate(list(flat.values())), np.concatenate(list(flat_ref.values()))
    floor = REL_ERR_FLOOR * np.linalg.norm(g_ref_all)
    per_param = []
    for name in flat:
        g, g_ref = flat[name], flat_ref[name]
        n_ref = np.linalg.norm(g_ref)
        denominator = max(n_ref, floor)
        per_param.append({
            "name": name, **_agreement(g, g_ref),
            "rel_err": (float(np.linalg.norm(g - g_ref) / denominator) if denominator > 0
                        else float(np.linalg.norm(g))),
            "structurally_zero": bool(n_ref < floor)})
    result = {**_agreement(g_all, g_ref_all), **_max_errors(per_param, flat, flat_ref),
              "per_param": per_param}
    if layers is not None:
        result["per_layer"] = [
            {"name": layer, "params": names,
             **_agreement(np.concatenate([flat[n] for n in names]),
                          np.concatenate([flat_ref[n] for n in names]))}
            for layer, names in layers]
        result["hidden"] = hidden_summary(result["per_layer"])
    return result


def _max_errors(per_param, flat, flat_ref) -> dict:
    """``max_rel_err`` over the parameters with a gradient, ``max_zero_err`` over the
    structurally zero ones, relative to the whole reference gradient (see
    :func:`compare_gradients`); 0.0 where there is no such parameter."""
    total = np.linalg.norm(np.concatenate(list(flat_ref.values())))
    zero = [p["name"] for p in per_param if p["structurally_zero"]]
    return {"max_rel_err": max((p["rel_err"] for p in per_param
                                if not p["structurally_zero"]), default=0.0),
            "max_zero_err": max((float(np.linalg.norm(flat[n] - flat_ref[n]) / total)
                                 for n in zero), default=0.0)}


def mean_comparison(comparisons: list[dict]) -> dict:
    """The mean of several :func:`compare_gradients` results (one per batch): every figure
    averaged per parameter, per layer and overall; a parameter is ``structurally_zero`` if
    it is on any batch; ``max_rel_err`` and ``hidden`` are taken from the averages."""
    if len(comparisons) == 1:
        return comparisons[0]

    def mean(records):
        out = dict(records[0])
        for key, value in out.items():
            if isinstance(value, float):
                out[key] = float(np.mean([r[key] for r in records]))
        return out
    result = mean(comparisons)
    result["per_param"] = [
        {**mean(list(ps)), "structurally_zero": any(p["structurally_zero"] for p in ps)}
        for ps in zip(*(c["per_param"] for c in comparisons))]
    result["max_rel_err"] = max((p["rel_err"] for p in result["per_param"]
                                 if not p["structurally_zero"]), default=0.0)
    result["max_zero_err"] = max(c["max_zero_err"] for c in comparisons)
    if "per_layer" in result:
        result["per_layer"] = [mean(list(ls)) for ls in zip(*(c["per_layer"]
                                                             for c in comparisons))]
        result["hidden"] = hidden_summary(result["per_layer"])
    return result


def hidden_summary(per_layer: list[dict]) -> dict:
    """Median and minimum cosine and norm ratio over the hidden layers: every layer but the
    readout (the last), whose rate-BP gradient is exact at any T and would otherwise
    dominate an overall figure. ``None`` entries when the network has no hidden layer."""
    hidden = per_layer[:-1]

    def stat(key, fn):
        values = [r[key] for r in hidden if math.isfinite(r[key])]
        return float(fn(values)) if values else None
    return {"layers": len(hidden), "readout": per_layer[-1]["name"] if per_layer else None,
            "median_cosine": stat("cosine", np.median), "min_cosine": stat("cosine", np.min),
            "median_norm_ratio": stat("norm_ratio", np.median),
            "min_norm_ratio": stat("norm_ratio", np.min)}


# --------------------------------------------------------------------------- layers
def layer_groups(net, params, batch_stats, image_shape) -> list[tuple[str, list[str]]]:
    """The network's layers, from input to output: ``[(name, [parameter names])]``.

    A layer is a convolution or dense layer with the BatchNorm that follows it; any other
    module with parameters is a layer of its own. It is named by the dotted path its modules
    share, or its first module's. The order is that of first use in the T=1 forward pass
    (read from its jaxpr on an abstract ``image_shape`` batch), not the parameter tree's.
    """
    from ratebp_jax import layers as snn_layers

    kinds = {}
    for path, node in nnx.iter_graph(net.merge(params, batch_stats)):
        if isinstance(node, (nnx.Conv, nnx.Linear)):
            kinds[".".join(map(str, path))] = "weight"
        elif isinstance(node, snn_layers.BatchNorm):
            kinds[".".join(map(str, path))] = "norm"
    modules = []  # module paths in order of first use
    for name in _first_use_order(net, params, batch_stats, image_shape):
        module = name.rpartition(".")[0]
        if module not in modules:
            modules.append(module)
    groups: list[list[str]] = []
    for module in modules:
        kind = kinds.get(module)
        joins = (kind == "norm" and groups and kinds.get(groups[-1][0]) == "weight"
                 and len(groups[-1]) == 1)
        if joins:
            groups[-1].append(module)
        else:
            groups.append([module])
    names = [n for n, _ in named_leaves(params)]
    return [(_common_path(group), [n for n in names if n.rpartition(".")[0] in group])
            for group in groups]


def _common_path(modules: list[str]) -> str:
    parts = [m.split(".") for m in modules]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) if common and len(modules) > 1 else modules[0]


def _first_use_order(net, params, batch_stats, image_shape) -> list[str]:
    """Parameter names in the order the T=1 forward pass first reads them."""
    from ratebp_jax import methods

    names = [n for n, _ in named_leaves(params)]
    leaves, treedef = jax.tree.flatten(params)
    assert len(leaves) == len(names)
    images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)

    def forward(leaves, images):
        return methods.spike_inference(net, jax.tree.unflatten(treedef, leaves), batch_stats,
                                       images, T=1, step_mode="multi")[0]
    closed = jax.make_jaxpr(forward)(leaves, images)
    first = _first_uses(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[
        :len(leaves)])}, [0])
    return [names[i] for i in sorted(range(len(names)), key=lambda i: first.get(i, math.inf))]


def _first_uses(jaxpr, watched: dict, counter: list) -> dict:
    """``{input index: position of the first equation that reads it}``, looking inside
    calls (pjit, custom_vjp, remat) whose inner inputs match their operands one to one."""
    first = {}
    for eqn in jaxpr.eqns:
        inner = [p for p in eqn.params.values() if isinstance(p, (jex.Jaxpr, jex.ClosedJaxpr))]
        inner = [p.jaxpr if isinstance(p, jex.ClosedJaxpr) else p for p in inner]
        operands = {watched[v]: k for k, v in enumerate(eqn.invars)
                    if isinstance(v, jex.Var) and v in watched}
        if len(inner) == 1 and len(inner[0].invars) == len(eqn.invars) and operands:
            inner_watched = {inner[0].invars[k]: i for i, k in operands.items()}
            for i, pos in _first_uses(inner[0], inner_watched, counter).items():
                first.setdefault(i, pos)
        else:
            for i in operands:
                first.setdefault(i, counter[0])
        counter[0] += 1
    return first


def random_batch(key, batch: int, image_size: int, channels: int, num_classes: int,
                 scale: float = 1.0) -> dict:
    """``{"image": N(0, scale^2) [B, S, S, C], "label": uniform [B]}`` for probing methods,
    drawn with the threefry XLA:CPU compiles faster (``models.create_model``)."""
    key_x, key_y = jax.random.split(key)
    with jax.threefry_partitionable(False):
        return {"image": scale * jax.random.normal(key_x, (batch, image_size, image_size,
                                                           channels)),
                "label": jax.random.randint(key_y, (batch,), 0, num_classes)}


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def global_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))
