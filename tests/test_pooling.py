"""Max pooling's tie rules (layers.max_pool): the split rule's custom VJP against finite
differences and against the rules written out by hand on tied windows, overlapping windows
and padding, in float32 and bfloat16; and the rule's plumbing into models."""
import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import enable_x64
from jax.test_util import check_grads

from ratebp_jax import layers, models, parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WINDOW, STRIDE, PADDING = 3, 2, 1  # the ImageNet stems' MaxPool2d(3, 2, 1)


def pool_by_hand(x_HxW, g_HoxWo, ties):
    """``(value, gradient, tied windows)`` of one channel's 3x3/2 pad-1 max pooling with the rule written
    out: each window's maxima among its in-bounds cells, in row-major order; "split" gives
    each of them an equal share of the window's cotangent, "first" all of it to the first.
    Padding cells are never candidates, so they can neither win nor receive gradient."""
    x_HxW, g_HoxWo = np.asarray(x_HxW, np.float64), np.asarray(g_HoxWo, np.float64)
    H, W = x_HxW.shape
    value, grad, tied = np.zeros(g_HoxWo.shape), np.zeros_like(x_HxW), 0
    for i in range(g_HoxWo.shape[0]):
        for j in range(g_HoxWo.shape[1]):
            rows = range(i * STRIDE - PADDING, i * STRIDE - PADDING + WINDOW)
            cols = range(j * STRIDE - PADDING, j * STRIDE - PADDING + WINDOW)
            cells = [(r, c) for r in rows for c in cols if 0 <= r < H and 0 <= c < W]
            value[i, j] = max(x_HxW[cell] for cell in cells)
            maxima = [cell for cell in cells if x_HxW[cell] == value[i, j]]
            tied += len(maxima) > 1
            if ties == "first":
                maxima = maxima[:1]
            for cell in maxima:
                grad[cell] += g_HoxWo[i, j] / len(maxima)
    return value, grad, tied


def pool_with_vjp(x, g, ties):
    y, vjp = jax.vjp(lambda x: layers.max_pool(x, ties), x)
    return y, vjp(g)[0]


def check_against_by_hand(x_NxHxWxC, ties, seed=0, rtol=1e-6):
    """The pooled value and the VJP of a random cotangent equal :func:`pool_by_hand` in
    every (image, channel); returns the number of windows with tied maxima."""
    x = jnp.asarray(x_NxHxWxC)
    out_shape = jax.eval_shape(lambda x: layers.max_pool(x, ties), x).shape
    g = jax.random.normal(jax.random.key(seed), out_shape).astype(x.dtype)
    y, g_x = jax.jit(pool_with_vjp, static_argnums=2)(x, g, ties)
    assert y.dtype == x.dtype and g_x.dtype == x.dtype
    n_tied = 0
    for n in range(x.shape[0]):
        for c in range(x.shape[-1]):
            value, grad, tied = pool_by_hand(x[n, ..., c].astype(jnp.float32),
                                             g[n, ..., c].astype(jnp.float32), ties)
            np.testing.assert_array_equal(np.asarray(y[n, ..., c], np.float64), value)
            np.testing.assert_allclose(np.asarray(g_x[n, ..., c], np.float64), grad,
                                       rtol=rtol, atol=rtol)
            n_tied += tied
    return n_tied


@pytest.mark.parametrize("ties", layers.POOL_TIES)
@pytest.mark.parametrize("size", [7, 8])  # odd: the last window reaches into the padding
def test_pool_gradient_matches_the_rule_by_hand_on_spikes_and_rates(ties, size):
    """Spikes (0 or 1) and rates (multiples of 1/4) tie in most windows; overlapping
    windows (stride 2 < window 3) add their shares on shared cells; border windows hold
    padding. For "first" this also pins XLA's select-and-scatter to row-major order."""
    key_s, key_r = jax.random.split(jax.random.key(size))
    spikes = jax.random.bernoulli(key_s, 0.3, (2, size, size, 3)).astype(jnp.float32)
    rates = jax.random.randint(key_r, (2, size, size, 3), 0, 5).astype(jnp.float32) / 4
    assert check_against_by_hand(spikes, ties) > 10
    assert check_against_by_hand(rates, ties, seed=1) > 10


def test_all_tied_windows_split_and_first_by_hand():
    """A 3x3 map of silent neurons: four 2x2 windows (the rest is padding), all tied.
    "split" gives each cell a quarter per window it lies in; "first" gives each window's
    cotangent to its top-left in-bounds cell."""
    x = jnp.zeros((1, 3, 3, 1))
    g = jnp.ones((1, 2, 2, 1))
    _, g_split = pool_with_vjp(x, g, "split")
    _, g_first = pool_with_vjp(x, g, "first")
    np.testing.assert_array_equal(g_split[0, ..., 0], [[0.25, 0.5, 0.25],
                                                        [0.5, 1.0, 0.5],
                                                        [0.25, 0.5, 0.25]])
    np.testing.assert_array_equal(g_first[0, ..., 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("ties", layers.POOL_TIES)
def test_padding_never_receives_gradient_even_below_every_input(ties):
    """Inputs far below zero (but above the -inf padding) at the border: every window's
    cotangent lands on real cells, so the input gradient sums to the output cotangent's
    sum, and the value never is the padding."""
    x = jnp.full((1, 5, 5, 2), -1e30).at[:, 2, 2, :].set(-3.0)
    g = jax.random.normal(jax.random.key(0), (1, 3, 3, 2))
    y, g_x = pool_with_vjp(x, g, ties)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(g_x.sum(), g.sum(), rtol=1e-6)
    check_against_by_hand(x, ties)


@pytest.mark.parametrize("ties", layers.POOL_TIES)
def test_pool_gradient_matches_finite_differences_without_ties(ties):
    """Distinct inputs (spaced 0.01 apart, far more than the float64 step): max pooling is
    differentiable there and both rules are its one gradient."""
    with enable_x64():
        perm = jax.random.permutation(jax.random.key(0), 2 * 7 * 6 * 3)
        x = 0.01 * perm.reshape(2, 7, 6, 3).astype(jnp.float64)
        assert x.dtype == jnp.float64
        check_grads(lambda x: layers.max_pool(x, ties), (x,), order=1, modes=("rev",),
                    eps=1e-4, atol=1e-8, rtol=1e-8)


def test_split_rule_in_bfloat16_keeps_the_dtype_and_rounds_once():
    """bfloat16 spikes and cotangent (mixed precision): the gradient is bfloat16 and equals
    the by-hand gradient to bfloat16 rounding (thirds and sums of overlapping shares are
    formed in float32 and rounded once)."""
    spikes = jax.random.bernoulli(jax.random.key(3), 0.3, (2, 7, 7, 3)).astype(jnp.bfloat16)
    assert check_against_by_hand(spikes, "split", rtol=2.0 ** -8) > 10


def test_unknown_tie_rule_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match=r"pool_ties='mean': allowed values are split, first"):
        layers.max_pool(jnp.zeros((1, 4, 4, 1)), "mean")
    with pytest.raises(ValueError, match=r"pool_ties='mean': allowed values are"):
        models.create_model("sew_resnet_tiny", image_size=8, pool_ties="mean")


@pytest.mark.parametrize("ties", layers.POOL_TIES)
def test_create_model_sets_the_rule_on_every_max_pool(ties):
    model = models.create_model("sew_resnet_tiny", image_size=8, pool_ties=ties)
    pools = [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.MaxPool)]
    assert pools and all(p.ties == ties for p in pools)
    # Models without max pooling take the argument too.
    models.create_model("vgg_tiny", image_size=8, pool_ties=ties)


class _Built(Exception):
    """Stops parity's step once it has asked for its model."""


def test_parity_and_reproduction_configs_use_the_reference_rule(monkeypatch):
    """The reference pools spikes with PyTorch's rule, "first"; parity with it and the
    configs reproducing the paper keep that rule, whatever the library default."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    for name in ("imagenet_sew_resnet34", "imagenet_preact_resnet34", "cifar10_resnet18",
                 "cifar10dvs_vggsnn"):
        assert importlib.import_module(f"configs.{name}").get_config().pool_ties == "first"
    asked = {}

    def create_model(name, **kwargs):
        asked.update(kwargs)
        raise _Built

    monkeypatch.setattr(models, "create_model", create_model)
    vectors = os.path.join(ROOT, "tests", "data", "reference_vectors")
    with open(os.path.join(vectors, "vgg_tiny_multi_rate_T1_soft_seed0.json")) as f:
        vec = json.load(f)
    with pytest.raises(_Built):
        parity.run_reference_step(vec, parity.read_keys(os.path.join(vectors,
                                                                     "keys_vgg_tiny.txt")))
    assert asked["pool_ties"] == "first"
