"""A 2-D convolution whose kernel gradient XLA:CPU compiles fast inside loops.

JAX's transpose rule writes the kernel gradient with dimension labels
``f01b_i01o->01bf``, which XLA:CPU turns into its library convolution at the top level of a
program but not inside a ``while`` body (a time scan), where it runs a naive loop nest
(docs/RESULTS.md, "Memory and time against T"). :func:`kernel_grad` writes it in the
canonical layout instead, which XLA keeps in loop bodies; the value and the input gradient
are JAX's own. Anything but the plain NHWC case goes to ``lax.conv_general_dilated``.

Float64 convolutions on the CPU run as one matrix product of the shifted input slices
(:func:`conv_as_dots`): XLA:CPU has a library GEMM for float64 but no library convolution
(docs/RESULTS.md, "Parity with the reference implementation").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_nhwc(x, w, strides, padding, precision=None):
    """``lax.conv_general_dilated`` in NHWC/HWIO with explicit ``padding`` pairs, with the
    kernel gradient of :func:`kernel_grad`."""
    return _conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def kernel_grad(x, g, kernel_shape, strides, padding, precision=None):
    """``d/dw <g, conv(x, w)>`` as one canonical-layout convolution of ``x`` (channels as
    batch, batch as features) with ``g`` as the kernel, dilated by the stride; the high
    padding loses the rows the forward stride skipped, so the output has the kernel's size."""
    pads = []
    for size, k, s, (lo, hi) in zip(x.shape[1:3], kernel_shape[:2], strides, padding):
        skipped = (size + lo + hi - k) % s
        pads.append((lo, hi - skipped))
    dw = lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads,
        rhs_dilation=strides, dimension_numbers=_NHWC, precision=precision)
    return dw.transpose(1, 2, 0, 3)


def _conv_bwd(strides, padding, precision, res, g):
    x, w = res
    _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding, precision), x)
    (dx,) = input_vjp(g)
    return dx, kernel_grad(x, g, w.shape, strides, padding, precision).astype(w.dtype)


conv_nhwc.defvjp(_conv_fwd, _conv_bwd)


def conv_as_dots(x, w, strides, padding, precision=None):
    """The NHWC/HWIO convolution as one matrix product: the k*k strided slices of the padded
    input side by side on the channel axis, times the kernel as a ``[k*k*Cin, Cout]``
    matrix. Equal up to the order of summation; its gradients are JAX's."""
    kh, kw, cin, cout = w.shape
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0),
                                              (0, 0, 0)))
    n, hp, wp, _ = xp.shape
    (sh, sw), ho, wo = strides, (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1
    taps = [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else lax.concatenate(taps, 3)
    return lax.dot_general(patches, w.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                           precision=precision)


def _conv_plain(x, w, strides, padding, precision):
    """:func:`conv_nhwc`, or :func:`conv_as_dots` for float64 on the CPU."""
    if x.dtype != jnp.float64:
        return conv_nhwc(x, w, strides, padding, precision)
    return lax.platform_dependent(
        x, w, cpu=lambda x, w: conv_as_dots(x, w, strides, padding, precision),
        default=lambda x, w: conv_nhwc(x, w, strides, padding, precision))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, **kwargs):
    """Drop-in for ``lax.conv_general_dilated`` (the signature ``nnx.Conv`` calls): the plain
    NHWC case goes to :func:`conv_nhwc`, everything else to JAX unchanged."""
    plain = (lhs.ndim == 4 and feature_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
             and all(v is None for v in kwargs.values()))
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_plain(lhs, rhs, tuple(window_strides), padding, precision)
