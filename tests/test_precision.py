"""bfloat16 mixed precision (``models.set_compute_dtype``): convolutions and dense layers in
bfloat16; parameters, optimiser state, LIF and BatchNorm state, logits and loss in float32.

Programs are combined into one jit per model where possible: on 2 CPU cores a jit's fixed
cost (tracing, XLA's pipeline) is about half of a tiny model's compile time.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ratebp_jax import analysis, layers, methods, models

from conftest import compiled_temp_bytes, jit_unoptimised, rel_err, tiny_setup

BF16 = "bfloat16"
STEP_MODES = ("multi", "single")


def with_compute_dtype(net, params, batch_stats, compute_dtype):
    """``net`` rebuilt with its convolutions and dense layers computing in
    ``compute_dtype``; the parameters and statistics are shared, unchanged."""
    model = net.merge(params, batch_stats)
    models.set_compute_dtype(model, compute_dtype)
    return methods.split_model(model)[0]


def float_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# --------------------------------------------------------------------------- T=1 exactness
# Tolerance, derived. At T=1 rate-BP and BPTT compute the same forward values: the same
# bfloat16 convolutions of the same inputs, and the spike pass's records are BPTT's spikes
# and surrogate derivatives. Their backward passes are the same operations, grouped
# differently: their float32 values differ by reassociation only, delta <~ 2^-20 relative
# (float32 rate-BP and BPTT differ by up to 2e-6 at T=1, tests/test_methods.py), and their
# bfloat16 operations (a spike train's cotangent summed over its two consumers, say) take
# the same operands. A cast of such a float32 value to bfloat16 (a cotangent entering a
# convolution's or dense layer's backward pass, or leaving a LIF's) then gives the same
# result, except for elements within delta of a rounding boundary: boundaries are one unit
# (ulp) apart, 2^-8 to 2^-7 of the value, so that is a fraction of at most
# 2 * delta / 2^-8 = 2^-11 of the elements, each moved by one unit (<= 2^-7 of its value).
# Norm-wise that is 2^-7 * sqrt(2^-11) < 1.8e-4 per cast, and no tiny model has more than 8
# weight layers (resnet19_tiny): below 1.5e-3, within bfloat16's unit roundoff
# 2^-8 = 3.9e-3, which the test allows for the gradients, the loss and the BatchNorm
# statistics alike.
# Measured (6 families x 2 step modes, batch 4, 8x8): gradients 0 in 10 of 12 cases, at most
# 6.9e-9 (resnet18_tiny, single; 4.4e-9 with full optimisation); loss and statistics
# identical in all 12.
T1_TOL = 2.0 ** -8


def test_rate_gradient_equals_bptt_at_T1_in_bfloat16(tiny_name):
    net, params, stats, batch = tiny_setup(tiny_name)
    net = with_compute_dtype(net, params, stats, BF16)

    def both(params, stats, batch):
        return {(method, mode): methods.make_grad_fn(method, net, T=1, step_mode=mode)(
            params, stats, batch) for method in ("bptt", "rate") for mode in STEP_MODES}

    out = jit_unoptimised(both)(params, stats, batch)
    for mode in STEP_MODES:
        (loss_b, aux_b), g_bptt = out["bptt", mode]
        (loss_r, aux_r), g_rate = out["rate", mode]
        assert rel_err(g_rate, g_bptt) <= T1_TOL, mode
        np.testing.assert_allclose(loss_r, loss_b, rtol=T1_TOL)
        assert rel_err(aux_r["batch_stats"], aux_b["batch_stats"]) <= T1_TOL, mode
        assert float(jnp.linalg.norm(ravel_pytree(g_bptt)[0])) > 1e-3
        # float32 master weights: float32 gradients, logits, loss and BatchNorm statistics
        for result in (loss_r, aux_r, g_rate, loss_b, aux_b, g_bptt):
            assert float_dtypes(result) == {jnp.dtype(jnp.float32)}, mode


# --------------------------------------------------------------------------- every method
def test_every_method_and_spike_inference_run_in_bfloat16_with_float32_state():
    """Each of methods.METHODS and spike inference, in both step modes, at T=2: finite,
    non-zero float32 gradients, float32 loss, logits, statistics and records (rates,
    eligibilities, BatchNorm moments), and logits close to the float32 model's, but not
    equal to them (bfloat16 rounding, and the few spikes it moves). vgg_tiny has
    convolutions with bias and a dense classifier; the hidden dense layer feeding a LIF
    (resnet19_tiny) is in the T=1 test."""
    T = 2
    net32, params, stats, batch = tiny_setup("vgg_tiny")
    net = with_compute_dtype(net32, params, stats, BF16)

    def everything(params, stats, batch):
        out = {}
        for mode in STEP_MODES:
            for method in methods.METHODS:
                out[method, mode] = methods.make_grad_fn(method, net, T=T, step_mode=mode)(
                    params, stats, batch)
            for name, n in (("bfloat16", net), ("float32", net32)):
                out[name, mode] = methods.spike_inference(n, params, stats, batch["image"],
                                                          T=T, step_mode=mode)
            out["records", mode] = methods.spike_pass(net, params, stats, batch["image"], T=T,
                                                      step_mode=mode)[2]
        return out

    out = jit_unoptimised(everything)(params, stats, batch)
    f32 = {jnp.dtype(jnp.float32)}
    for mode in STEP_MODES:
        for method in methods.METHODS:
            (loss, aux), grads = out[method, mode]
            assert float_dtypes((loss, aux, grads)) == f32, (method, mode)
            flat = ravel_pytree(grads)[0]
            assert bool(jnp.all(jnp.isfinite(flat))) and float(jnp.linalg.norm(flat)) > 1e-3
        assert float_dtypes(out["bfloat16", mode]) == f32  # logits and firing rates
        assert float_dtypes(out["records", mode]) == f32
        # measured 1.7e-2 in both step modes
        assert 0 < rel_err(out["bfloat16", mode][0], out["float32", mode][0]) < 0.05, mode
    assert float_dtypes(params) == f32  # the parameters were never cast in place


# --------------------------------------------------------------------------- float32 default
def test_float32_default_is_the_program_it_was(monkeypatch):
    """Float32 results are bit-identical to what they were before mixed precision, because
    the programs are: a model built without ``compute_dtype``, one built with
    ``compute_dtype="float32"`` and one set to bfloat16 and back have the same graph, and
    its lowered program (rate-BP and OTTT, both step modes) is the one traced with the
    float32 casts (``layers.at_least_float32``) removed: on float32 arrays they are no
    operations at all."""
    net, params, stats, batch = tiny_setup("resnet18_tiny")
    explicit = methods.split_model(models.create_model(
        "resnet18_tiny", num_classes=5, image_size=8, compute_dtype="float32"))[0]
    round_trip = with_compute_dtype(with_compute_dtype(net, params, stats, BF16), params, stats,
                                    "float32")
    assert explicit.graphdef == net.graphdef == round_trip.graphdef

    def lowered():
        def steps(params, stats, batch):
            return [methods.make_grad_fn(method, net, T=2, step_mode=mode)(params, stats, batch)
                    for method in ("rate", "ottt") for mode in STEP_MODES]
        return jax.jit(steps).lower(params, stats, batch).as_text()

    with_casts = lowered()
    for module in (layers, methods):
        monkeypatch.setattr(module, "at_least_float32", lambda x: x)
    assert lowered() == with_casts
    assert "bf16" not in with_casts


# --------------------------------------------------------------------------- really bfloat16
def _ops(hlo: str, op: str) -> list[str]:
    return [line for line in hlo.splitlines() if f"stablehlo.{op}" in line]


def test_bfloat16_step_convolves_and_multiplies_in_bfloat16():
    """The lowered rate step (StableHLO, what JAX hands XLA) does every convolution and
    every dense layer's product in bfloat16, forward and backward. (XLA:CPU then emulates
    them: it rounds to bfloat16 and computes in float32.)"""
    net, params, stats, batch = tiny_setup("resnet19_tiny")
    net = with_compute_dtype(net, params, stats, BF16)
    hlo = jax.jit(methods.make_grad_fn("rate", net, T=2, step_mode="multi")).lower(
        params, stats, batch).as_text()
    convs, dots = _ops(hlo, "convolution"), _ops(hlo, "dot_general")
    # neurons.time_mean sums each LIF's float32 spikes over time as a product of a vector of
    # ones [T] with them: a reduction, not a layer, and its records are float32 by design.
    dots = [line for line in dots if not re.search(r":\s*\(tensor<\d+xf32>,", line)]
    # 6 convolutions, each in the spike pass and in the rate pass's kernel gradient, and the
    # input gradients of all but the stem (the rate pass takes the convolutions' values
    # from the spike pass, layers.ConvBN); 2 dense layers, each in the spike pass, the rate
    # pass and its kernel gradient
    assert len(convs) >= 2 * 6 + 5 and len(dots) >= 3 * 2
    for line in convs + dots:
        operand_types = re.search(r":\s*\((.*)\)\s*->", line).group(1)
        assert "f32" not in operand_types and "bf16" in operand_types, line


# --------------------------------------------------------------------------- memory
ON_CPU = jax.default_backend() == "cpu"


def _rate_step_temp_bytes() -> dict:
    """XLA's compiled temporary memory of a rate step (T=4, multi) in each compute dtype, on
    resnet18_tiny at batch 256: a model whose kernels are negligible beside its
    activations, so that what is measured is the activations' dtype."""
    net, params, stats, _ = tiny_setup("resnet18_tiny")
    batch = analysis.random_batch(jax.random.key(0), 256, 8, 3, 5)
    temp = {}
    for dtype in ("float32", BF16):
        step = methods.make_grad_fn("rate", with_compute_dtype(net, params, stats, dtype),
                                    T=4, step_mode="multi")
        temp[dtype] = compiled_temp_bytes(step, params, stats, batch)
    return temp


@pytest.mark.skipif(not ON_CPU, reason="checks XLA:CPU, which has no bfloat16 convolution")
def test_bfloat16_rate_step_needs_no_less_compiled_memory_on_xla_cpu():
    """XLA:CPU rounds a bfloat16 convolution's operands and convolves in float32, so the
    tensors around it exist in float32 anyway, and what the rate pass keeps is float32 by
    design: bfloat16 saves no memory there (docs/RESULTS.md, "Compiled memory on XLA:CPU:
    no saving"). Should XLA:CPU gain native bfloat16 convolutions, this fails and the
    accelerator test below should run here too."""
    temp = _rate_step_temp_bytes()
    assert temp[BF16] >= temp["float32"], temp


@pytest.mark.skipif(ON_CPU, reason="XLA:CPU has no bfloat16 convolution: see the test above")
def test_bfloat16_rate_step_needs_less_compiled_memory_on_an_accelerator():
    """Where convolutions run in bfloat16 natively, a bfloat16 rate step keeps smaller
    activations (docs/RESULTS.md, GPU section)."""
    temp = _rate_step_temp_bytes()
    assert temp[BF16] < temp["float32"], temp
