"""Gradient comparison between methods (cosine, norm ratio, relative error per parameter)."""
from __future__ import annotations

import jax
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


# Two all-zero gradients are identical: cosine and norm ratio 1. One zero against a non-zero
# one has no defined cosine: NaN (written as null in JSON).
def _cosine(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _norm_ratio(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(na / nb) if nb > 0 else float("nan")


def compare_gradients(grads, grads_ref) -> dict:
    """Compare ``grads`` with the reference ``grads_ref`` (same tree structure).

    Returns ``{"cosine", "norm_ratio", "max_rel_err", "per_param": [{"name", "cosine",
    "norm_ratio", "rel_err"}]}``; ``rel_err = ||g - g_ref|| / ||g_ref||`` per parameter,
    ``cosine`` and ``norm_ratio`` over all parameters together. Computed in float64.
    """
    per_param, flat, flat_ref = [], [], []
    for (name, g), (name_ref, g_ref) in zip(named_leaves(grads), named_leaves(grads_ref),
                                            strict=True):
        assert name == name_ref, (name, name_ref)
        g, g_ref = g.astype(np.float64).ravel(), g_ref.astype(np.float64).ravel()
        flat.append(g)
        flat_ref.append(g_ref)
        n_ref = np.linalg.norm(g_ref)
        per_param.append({
            "name": name, "cosine": _cosine(g, g_ref), "norm_ratio": _norm_ratio(g, g_ref),
            "rel_err": float(np.linalg.norm(g - g_ref) / n_ref) if n_ref > 0 else
            float(np.linalg.norm(g)),
        })
    g, g_ref = np.concatenate(flat), np.concatenate(flat_ref)
    return {"cosine": _cosine(g, g_ref), "norm_ratio": _norm_ratio(g, g_ref),
            "max_rel_err": max(p["rel_err"] for p in per_param), "per_param": per_param}


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def global_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))
