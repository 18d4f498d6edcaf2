"""The convolution with a hand-written kernel gradient (ratebp_jax/convolution.py)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from ratebp_jax import convolution

NHWC = ("NHWC", "HWIO", "NHWC")
# (input size, kernel, stride, padding): the zoo's 3x3/s1, 3x3/s2, 1x1/s2 shortcut and 7x7/s2
# stem, plus strides that skip rows at the border (sizes not divisible by the stride).
CASES = [(8, 3, 1, 1), (8, 3, 2, 1), (8, 1, 2, 0), (9, 7, 2, 3), (7, 3, 2, 1), (10, 4, 3, 2),
         (6, 3, 2, 0)]
# For tests of the programs XLA:CPU compiles: other backends compile convolutions to their
# own library calls, whose HLO text these tests do not describe.
ON_XLA_CPU = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="checks the HLO that XLA:CPU compiles")


def _operands(size, kernel, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (2, size, size, 3)),
            jax.random.normal(kw, (kernel, kernel, 3, 4)))


@pytest.mark.parametrize("size,kernel,stride,pad", CASES)
def test_value_and_vjp_equal_jax_convolution(size, kernel, stride, pad):
    x, w = _operands(size, kernel)
    padding = ((pad, pad), (pad, pad))
    y, vjp = jax.vjp(lambda x, w: convolution.conv_nhwc(x, w, (stride, stride), padding), x, w)
    y_ref, vjp_ref = jax.vjp(
        lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                              dimension_numbers=NHWC), x, w)
    g = jax.random.normal(jax.random.key(7), y.shape)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for got, want in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,kernel,stride,pad", CASES[:4])
def test_vjp_matches_finite_differences(size, kernel, stride, pad):
    x, w = _operands(size, kernel, seed=1)
    padding = ((pad, pad), (pad, pad))
    check_grads(lambda x, w: convolution.conv_nhwc(x, w, (stride, stride), padding), (x, w),
                order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_other_configurations_fall_back_to_jax():
    x, w = _operands(8, 3)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    for kwargs in ({"rhs_dilation": (2, 2)}, {"lhs_dilation": (2, 2)}):
        got = convolution.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=dn, **kwargs)
        want = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn,
                                        **kwargs)
        np.testing.assert_array_equal(got, want)
    got = convolution.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    want = lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=dn)
    np.testing.assert_allclose(got, want, atol=1e-5)  # string padding takes the fast path


def _conv_labels_of_scanned_grad(conv):
    """The dimension labels of every convolution XLA compiles for the kernel gradient of a
    convolution inside a ``lax.scan`` (a while loop)."""
    x, w = _operands(8, 3)

    def loss(w):
        def body(c, _):
            return c, jnp.sum(conv(x * c, w) ** 2)
        return lax.scan(body, 1.0, None, length=3)[1].sum()

    hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    return set(re.findall(r"dim_labels=([\w>-]+)", hlo))


@ON_XLA_CPU
def test_kernel_gradient_in_a_loop_compiles_to_canonical_convolutions():
    # The slow path XLA:CPU takes inside loops is the non-canonical kernel-gradient layout
    # that JAX's own transpose rule produces; ours must not produce it.
    padding = ((1, 1), (1, 1))
    ours = _conv_labels_of_scanned_grad(
        lambda x, w: convolution.conv_nhwc(x, w, (2, 2), padding))
    jaxs = _conv_labels_of_scanned_grad(
        lambda x, w: lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=NHWC))
    assert ours == {"b01f_01io->b01f"}, ours
    assert jaxs != {"b01f_01io->b01f"}, "XLA no longer needs this workaround"


@pytest.mark.parametrize("size,kernel,stride,pad", [  # the fast tier: the 3x3/s2 case
    case if case == (8, 3, 2, 1) else pytest.param(*case, marks=pytest.mark.slow)
    for case in CASES])
def test_float64_convolution_as_dots_equals_jax_convolution(size, kernel, stride, pad):
    """Float64 on the CPU goes through ``conv_as_dots``: value, input gradient and kernel
    gradient equal XLA's own float64 convolution to float64 rounding."""
    with jax.enable_x64():
        x, w = (a.astype(jnp.float64) for a in _operands(size, kernel, seed=2))
        dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
        padding = ((pad, pad), (pad, pad))
        y, vjp = jax.vjp(lambda x, w: convolution.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=dn), x, w)
        y_ref, vjp_ref = jax.vjp(lambda x, w: lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=NHWC), x, w)
        g = jax.random.normal(jax.random.key(3), y.shape, jnp.float64)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for got, want in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@ON_XLA_CPU
def test_float64_convolution_compiles_to_dots_on_cpu_and_float32_to_a_convolution():
    x, w = _operands(8, 3)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def hlo(x, w):
        f = jax.grad(lambda x, w: jnp.sum(convolution.conv_general_dilated(
            x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn) ** 2), argnums=(0, 1))
        return jax.jit(f).lower(x, w).compile().as_text()

    assert "convolution(" in hlo(x, w)
    with jax.enable_x64():
        text = hlo(x.astype(jnp.float64), w.astype(jnp.float64))
    assert "convolution(" not in text and "dot(" in text
