"""Neuron-level properties: surrogates, custom VJPs, and the eligibility identity."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ratebp_jax import neurons, ratebp

# Antiderivatives of the smooth surrogates: the surrogate is the true derivative of these.
PRIMITIVES = {
    "sigmoid": lambda x, a: jax.nn.sigmoid(a * x),
    "atan": lambda x, a: jnp.arctan(jnp.pi / 2 * a * x) / jnp.pi + 0.5,
}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_smooth_surrogate_is_derivative_of_its_primitive(name):
    x = jnp.linspace(-2.0, 2.0, 101, dtype=jnp.float64) if jax.config.jax_enable_x64 else \
        jnp.linspace(-2.0, 2.0, 101)
    h = 1e-3
    fd = (PRIMITIVES[name](x + h, 4.0) - PRIMITIVES[name](x - h, 4.0)) / (2 * h)
    np.testing.assert_allclose(neurons.SURROGATES[name](x, 4.0), fd, atol=2e-3)


@pytest.mark.parametrize("name", sorted(neurons.SURROGATES))
def test_surrogate_integrates_to_one(name):
    # A surrogate replaces the Dirac delta dH/dv, so its total mass must be 1.
    x = np.linspace(-60.0, 60.0, 2_400_001)
    mass = np.trapezoid(np.asarray(neurons.SURROGATES[name](jnp.asarray(x), 4.0)), x)
    assert abs(mass - 1.0) < 5e-3, mass


@pytest.mark.parametrize("name", sorted(neurons.SURROGATES))
def test_spike_vjp_is_surrogate_times_cotangent(name):
    cfg = neurons.NeuronConfig(surrogate=name, thresh=0.7)
    v = jnp.linspace(-1.0, 3.0, 41)
    g = jnp.cos(v)
    s, vjp = jax.vjp(lambda v: neurons.spike(v, cfg), v)
    np.testing.assert_array_equal(s, (v >= 0.7).astype(v.dtype))
    np.testing.assert_allclose(vjp(g)[0], g * neurons.surrogate_grad(v, cfg), rtol=1e-6)


def test_rate_lif_vjp_is_eligibility_times_cotangent():
    x, r, e, g = (jax.random.uniform(k, (5, 3)) for k in jax.random.split(jax.random.key(0), 4))
    out, vjp = jax.vjp(ratebp.rate_lif, x, r, e)
    np.testing.assert_array_equal(out, r)
    gx, gr, ge = vjp(g)
    np.testing.assert_allclose(gx, g * e, rtol=1e-7)
    chex.assert_trees_all_equal((gr, ge), (jnp.zeros_like(r), jnp.zeros_like(e)))


def test_recorded_value_has_the_given_value_and_the_vjp_of_its_function():
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w, value = (jax.random.normal(k, s) for k, s in zip(
        jax.random.split(jax.random.key(0), 3), [(2, 5, 5, 3), (3, 3, 3, 4), (2, 5, 5, 4)]))
    out, vjp = jax.vjp(lambda x, w: ratebp.recorded_value(conv, value, x, w), x, w)
    np.testing.assert_array_equal(out, value)
    g = jax.random.normal(jax.random.key(3), value.shape)
    chex.assert_trees_all_close(vjp(g), jax.vjp(conv, x, w)[1](g), rtol=1e-6)
    # Numerically: with fn's own output as the value, the function is fn, and its gradient
    # must be fn's derivative.
    check_grads(lambda x, w: ratebp.recorded_value(conv, conv(x, w), x, w), (x, w),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    # The record gets no gradient.
    g_value = jax.grad(lambda v: ratebp.recorded_value(conv, v, x, w).sum())(value)
    chex.assert_trees_all_equal(g_value, jnp.zeros_like(value))


def test_straight_through_value_and_gradient_match_finite_differences():
    def f(a, b):
        return jnp.sum(jnp.sin(ratebp.straight_through(a, b)) * jnp.arange(3.0))

    a = jnp.array([0.3, -1.2, 2.0])
    b = jnp.array([1.1, 0.4, -0.5])
    np.testing.assert_allclose(f(a, b), jnp.sum(jnp.sin(a) * jnp.arange(3.0)), rtol=1e-6)
    ga, gb = jax.grad(f, argnums=(0, 1))(a, b)
    chex.assert_trees_all_equal(ga, jnp.zeros_like(a))
    # Gradient w.r.t. b is that of sum(sin(value) * w) evaluated at the value a (by design).
    h = 1e-3
    fd = jnp.stack([(jnp.sum(jnp.sin(a + h * jnp.eye(3)[i]) * jnp.arange(3.0))
                     - jnp.sum(jnp.sin(a - h * jnp.eye(3)[i]) * jnp.arange(3.0))) / (2 * h)
                    for i in range(3)])
    np.testing.assert_allclose(gb, fd, atol=1e-3)


def _bptt_rate_shift_derivative(x_TxN, cfg):
    """d/dc of mean_t s_t(x_t + c) at c = 0, by autodiff through the BPTT scan."""
    # Neurons are independent, so the gradient of the summed rates is the per-neuron derivative.
    def summed_rate(c_N):
        return neurons.lif_scan(x_TxN + c_N, cfg).mean(0).sum()
    return jax.grad(summed_rate)(jnp.zeros(x_TxN.shape[1:]))


@pytest.mark.parametrize("reset", neurons.RESET_MODES)
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_eligibility_equals_bptt_rate_derivative_for_constant_input(reset, T):
    cfg = neurons.NeuronConfig(reset=reset, lam=0.6)
    x_N = jnp.linspace(-0.5, 2.5, 301)
    x_TxN = jnp.broadcast_to(x_N, (T,) + x_N.shape)
    spikes, rate, elig = neurons.lif_scan_with_eligibility(x_TxN, cfg)
    np.testing.assert_allclose(rate, spikes.mean(0), rtol=1e-6)
    np.testing.assert_allclose(elig, _bptt_rate_shift_derivative(x_TxN, cfg), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("reset", neurons.RESET_MODES)
def test_eligibility_is_derivative_wrt_time_constant_shift_of_any_input(reset):
    cfg = neurons.NeuronConfig(reset=reset, lam=0.5, v_reset=-0.2)
    x_TxN = 1.5 * jax.random.normal(jax.random.key(3), (7, 200))
    _, _, elig = neurons.lif_scan_with_eligibility(x_TxN, cfg)
    np.testing.assert_allclose(elig, _bptt_rate_shift_derivative(x_TxN, cfg), rtol=1e-5,
                               atol=1e-6)


def test_eligibility_of_wrong_reset_mode_differs_from_bptt():
    # The identity needs the same reset treatment on both sides: it is a real constraint.
    x_TxN = jnp.broadcast_to(jnp.linspace(0.5, 2.5, 101), (6, 101))
    _, _, elig_detached = neurons.lif_scan_with_eligibility(x_TxN, neurons.NeuronConfig())
    bptt = _bptt_rate_shift_derivative(x_TxN, neurons.NeuronConfig(reset="soft_nodetach"))
    assert float(jnp.max(jnp.abs(elig_detached - bptt))) > 1e-2


@pytest.mark.parametrize("reset", neurons.RESET_MODES)
@pytest.mark.parametrize("T", [1, 2, 7])
def test_forward_and_spike_pass_give_the_bptt_scans_spikes_bit_for_bit(reset, T):
    # lif_forward and the spike pass carry the pre-reset membrane and write over their
    # input; the spikes, the rates and the eligibilities must not move by a single bit.
    cfg = neurons.NeuronConfig(reset=reset, lam=0.5, v_reset=-0.2)
    x_TxN = 1.5 * jax.random.normal(jax.random.key(T), (T, 300)) + 0.5
    spikes = neurons.lif_scan(x_TxN, cfg)
    assert 0 < float(spikes.mean()) < 1
    chex.assert_trees_all_equal(jax.jit(neurons.lif_forward, static_argnums=1)(x_TxN, cfg),
                                spikes)
    # The step-by-step eligibility, as single step mode runs it, against the multi mode scan.
    carry, steps = neurons.eligibility_init(x_TxN.shape[1:], cfg), []
    for x in x_TxN:
        carry, s, _ = neurons.eligibility_step(carry, x, cfg, T)
        steps.append(s)
    scanned, rate, elig = jax.jit(neurons.lif_scan_with_eligibility, static_argnums=1)(
        x_TxN, cfg)
    chex.assert_trees_all_equal(scanned, spikes, jnp.stack(steps))
    chex.assert_trees_all_equal(rate, spikes.mean(0))
    # Fused and step-by-step code may round the surrogate's exponential differently.
    np.testing.assert_allclose(elig, carry.elig, rtol=1e-6, atol=1e-7)


def test_time_mean_of_spikes_is_their_mean_bit_for_bit():
    spikes = (jax.random.uniform(jax.random.key(0), (7, 4, 5)) > 0.6).astype(jnp.float32)
    chex.assert_trees_all_equal(neurons.time_mean(spikes), spikes.mean(0))


@pytest.mark.parametrize("T", [2, 3, 8])
def test_forward_and_spike_pass_write_their_spikes_over_their_input(T):
    # The point of lif_forward and of the spike pass's loop: no buffer for the stacked
    # spikes and no copy of the carry. XLA's compiled memory statistics are deterministic.
    x_TxN = jnp.zeros((T, 64, 1024))
    cfg = neurons.NeuronConfig()

    def temp_bytes(fn):
        return jax.jit(lambda x: fn(2.0 * x, cfg)).lower(x_TxN).compile() \
            .memory_analysis().temp_size_in_bytes

    scan = temp_bytes(neurons.lif_scan)
    # The in-place loops keep one membrane (plus scalars; the eligibility is an output);
    # the scan a stacked [T, N] buffer too.
    for fn in (neurons.lif_forward, neurons.lif_scan_with_eligibility):
        assert temp_bytes(fn) < 2 * x_TxN[0].nbytes <= x_TxN.nbytes <= scan, fn.__name__


@pytest.mark.parametrize("field,value", [("lam", 1.0), ("lam", -0.1), ("thresh", 0.0),
                                         ("reset", "soft-ish"), ("surrogate", "erf")])
def test_bad_neuron_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        neurons.NeuronConfig(**{field: value})
