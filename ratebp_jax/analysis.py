"""Gradient comparison between methods, and compiled memory and step time of each."""
from __future__ import annotations

import time
from typing import Any

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


def random_batch(key, batch: int, image_size: int, channels: int, num_classes: int,
                 scale: float = 1.0) -> dict:
    """``{"image": N(0, scale^2) [B, S, S, C], "label": uniform [B]}`` for probing methods
    (non-partitionable threefry, which XLA:CPU compiles several times faster; see
    ``models.create_model``)."""
    key_x, key_y = jax.random.split(key)
    with jax.threefry_partitionable(False):
        return {"image": scale * jax.random.normal(key_x, (batch, image_size, image_size,
                                                           channels)),
                "label": jax.random.randint(key_y, (batch,), 0, num_classes)}


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def global_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


# --------------------------------------------------------------------------- profiling
def compile_with_stats(fn, *args) -> tuple[Any, dict]:
    """Jit-compile ``fn`` for ``args``; return the executable and XLA's compiled memory
    statistics (deterministic for a given program and backend) with the compile time."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return compiled, {"temp_bytes": int(mem.temp_size_in_bytes),
                      "argument_bytes": int(mem.argument_size_in_bytes),
                      "output_bytes": int(mem.output_size_in_bytes),
                      "compile_s": compile_s}


def median_time(compiled, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``compiled(*args)`` over ``repeats`` runs after ``warmup``,
    blocking on the result each time."""
    return interleaved_medians({"program": (compiled, args)}, repeats, warmup)["program"]


def interleaved_medians(programs: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Median wall time of each ``name -> (compiled, args)``, run round robin.

    Every round runs each program once, so slow drift of the machine (other jobs, clock
    changes) touches all of them alike and the ratios between them stay meaningful.
    """
    for compiled, args in programs.values():
        for _ in range(warmup):
            jax.block_until_ready(compiled(*args))
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, (compiled, args) in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def step_program(method: str, net, params, batch_stats, batch, *, T: int, step_mode: str,
                 **method_kwargs):
    """``(fn, args)``: one gradient step of ``method`` (see ``methods.METHODS``)."""
    from ratebp_jax import methods
    fn = methods.make_grad_fn(method, net, T=T, step_mode=step_mode, **method_kwargs)
    return fn, (params, batch_stats, batch)


def inference_program(net, params, batch_stats, images, *, T: int, step_mode: str):
    """``(fn, args)``: the spike-mode forward alone, the floor for any training step."""
    from ratebp_jax import methods

    def infer(params, batch_stats, images):
        return methods.spike_inference(net, params, batch_stats, images, T=T,
                                       step_mode=step_mode)[0]
    return infer, (params, batch_stats, images)


def rate_phase_programs(net, params, batch_stats, batch, *, T: int, step_mode: str) -> dict:
    """The two passes of a rate-BP step as separate programs, to see where its time goes:
    ``{"spike_pass": (fn, args), "rate_pass": (fn, args)}``. The rate pass (forward and
    backward) runs on the records of one spike pass, computed here."""
    from ratebp_jax import methods

    def spike(params, batch_stats, images):
        return methods.spike_pass(net, params, batch_stats, images, T=T, step_mode=step_mode)

    def rate_grad(params, batch_stats, records, batch):
        def loss(params):
            logits = methods.rate_pass(net, params, batch_stats, records,
                                       methods.time_mean(batch["image"], T), T=T,
                                       step_mode=step_mode)
            return methods.cross_entropy(logits, batch["label"])
        return jax.grad(loss)(params)

    _, new_stats, records = jax.jit(spike)(params, batch_stats, batch["image"])
    return {"spike_pass": (spike, (params, batch_stats, batch["image"])),
            "rate_pass": (rate_grad, (params, new_stats, records, batch))}


def profile_step(method: str, net, params, batch_stats, batch, *, T: int, step_mode: str,
                 repeats: int = 5, **method_kwargs) -> dict:
    """Memory and time of one gradient step of ``method`` (see ``methods.METHODS``):
    ``{"temp_bytes", "argument_bytes", "output_bytes", "compile_s", "step_s"}``."""
    fn, args = step_program(method, net, params, batch_stats, batch, T=T,
                            step_mode=step_mode, **method_kwargs)
    compiled, stats = compile_with_stats(fn, *args)
    stats["step_s"] = (median_time(compiled, *args, repeats=repeats)
                       if repeats else None)  # repeats=0: memory and compile time only
    return stats


def profile_inference(net, params, batch_stats, images, *, T: int, step_mode: str,
                      repeats: int = 5) -> dict:
    """Memory and time of the spike-mode forward alone, the floor for any training step."""
    fn, args = inference_program(net, params, batch_stats, images, T=T, step_mode=step_mode)
    compiled, stats = compile_with_stats(fn, *args)
    stats["infer_s"] = median_time(compiled, *args, repeats=repeats) if repeats else None
    return stats
