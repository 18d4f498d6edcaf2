"""A 2-D convolution whose kernel gradient XLA:CPU compiles fast inside loops.

Why this exists: JAX's transpose rule forms the kernel gradient of an NHWC/HWIO
convolution as a convolution with dimension labels ``f01b_i01o->01bf``. At the top level of
a program XLA:CPU rewrites that into its fast library convolution, but inside a
``while`` body (a ``lax.scan`` or ``fori_loop``) it does not, and falls back to a naive
loop nest: measured on 2 CPU cores, a 3x3, 64-channel, 32x32, batch-16 kernel gradient took
10.6 s for 4 loop iterations against 0.16 s written as below. Every method that takes
gradients inside a time scan (BPTT, SLTT and OTTT in single step mode) hit that path.

Here the kernel gradient is written directly as a convolution in the canonical layout:
input channels play the batch, the batch plays the input features, and the output
gradient is the kernel, dilated by the stride. XLA keeps that form in loop bodies. The
value and the input gradient are JAX's own. Any configuration outside the plain case
(dilations, feature groups, another layout, extra keyword arguments) is passed to
``lax.conv_general_dilated`` unchanged.

Float64 convolutions on the CPU are written as one matrix product of the k*k shifted
input slices (:func:`conv_as_dots`): XLA:CPU has a library convolution for float32 but not
for float64, and falls back to a naive loop nest, while its float64 dot is a library GEMM.
One float64 VGG-SNN training step (batch 4, 32x32, T=1, the parity check) ran 19.4 s as
convolutions and 1.1 s as k*k dots. One dot per convolution instead of k*k then cut the
float64 ResNet-18 parity steps' compile time by a fifth (single step BPTT, T=4: 22.3 ->
18.5 s; multi step rate-BP, T=4: 18.5 -> 14.3 s) and their run time too (3.3 -> 2.6 s,
2.1 -> 1.7 s).
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
    """``lax.conv_general_dilated`` in NHWC/HWIO with explicit ``padding`` pairs; see the
    module docstring for why its VJP is written by hand."""
    return _conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def kernel_grad(x, g, kernel_shape, strides, padding, precision=None):
    """``d/dw <g, conv(x, w)>`` as one canonical-layout convolution.

    ``dw[i, j, c, o] = sum_{b, p, q} x_pad[b, p*s + i, q*s + j, c] g[b, p, q, o]``: a
    convolution of ``x`` (channels as batch, batch as features) with ``g`` (as the kernel,
    dilated by the stride s). The high padding is trimmed by the rows the forward stride
    skipped, so that the output is exactly the kernel's size.
    """
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
    """The NHWC/HWIO convolution as one matrix product: the kernel's k*k taps (strided
    slices of the padded input) side by side on the channel axis, times the kernel as a
    ``[k*k*Cin, Cout]`` matrix. Equal to the convolution up to the order of summation; its
    gradients are JAX's, of slices, a concatenation and a dot. For float64 on the CPU
    (module docstring)."""
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
