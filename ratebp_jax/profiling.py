"""Compiled memory and step time of the gradient methods and of inference.

Memory is XLA's own account of the compiled program (deterministic for a program and
backend); times are medians of runs interleaved round robin, so that drift of the machine
touches every program alike.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from ratebp_jax import methods


def compile_with_stats(fn, *args, compiler_options=None) -> tuple[Any, dict]:
    """Jit-compile ``fn`` for ``args`` with XLA's ``compiler_options`` (``jax.jit``'s).
    Returns the executable and ``{"temp_bytes", "argument_bytes", "output_bytes",
    "compile_s"}``."""
    start = time.perf_counter()
    compiled = jax.jit(fn, compiler_options=compiler_options).lower(*args).compile()
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
    """Median wall time of each ``name -> (compiled, args)``, run round robin, so that the
    ratios between them survive slow drift of the machine."""
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
    """``(fn, args)``: one gradient step of ``method`` (see ``methods.make_grad_fn``)."""
    fn = methods.make_grad_fn(method, net, T=T, step_mode=step_mode, **method_kwargs)
    return fn, (params, batch_stats, batch)


def inference_program(net, params, batch_stats, images, *, T: int, step_mode: str):
    """``(fn, args)``: the spike-mode forward alone, the floor for any training step."""
    def infer(params, batch_stats, images):
        return methods.spike_inference(net, params, batch_stats, images, T=T,
                                       step_mode=step_mode)[0]
    return infer, (params, batch_stats, images)


def rate_phase_programs(net, params, batch_stats, batch, *, T: int, step_mode: str) -> dict:
    """The two passes of a rate-BP step as separate programs, to see where its time goes:
    ``{"spike_pass": (fn, args), "rate_pass": (fn, args)}``. The rate pass (forward and
    backward) runs on the records of one spike pass, computed here."""
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
    """Memory and time of one gradient step of ``method``: :func:`compile_with_stats`'s
    figures and ``"step_s"`` (None with ``repeats=0``)."""
    fn, args = step_program(method, net, params, batch_stats, batch, T=T,
                            step_mode=step_mode, **method_kwargs)
    compiled, stats = compile_with_stats(fn, *args)
    stats["step_s"] = median_time(compiled, *args, repeats=repeats) if repeats else None
    return stats


def profile_inference(net, params, batch_stats, images, *, T: int, step_mode: str,
                      repeats: int = 5) -> dict:
    """Memory and time of the spike-mode forward alone: :func:`compile_with_stats`'s
    figures and ``"infer_s"`` (None with ``repeats=0``)."""
    fn, args = inference_program(net, params, batch_stats, images, T=T, step_mode=step_mode)
    compiled, stats = compile_with_stats(fn, *args)
    stats["infer_s"] = median_time(compiled, *args, repeats=repeats) if repeats else None
    return stats
