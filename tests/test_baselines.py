"""SLTT, SLTT-K and OTTT: T=1 exactness, a hand-computed T=3 case, flat memory, errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ratebp_jax import layers, methods, neurons

from conftest import compiled_temp_bytes, grads_of, grads_of_each, tiny_setup

BASELINES = [("sltt", {}), ("sltt_k", {"K": 1}), ("ottt", {})]


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def rel_err(a, b):
    """conftest's ``rel_err`` in NumPy: eager jnp ops would compile a kernel per shape."""
    a, b = _flat(a), _flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- 1. T = 1
def test_baselines_equal_bptt_at_T1(tiny_name):
    """At T=1 the per-step loss is BPTT's loss, there is no temporal path to drop and the
    trace is the input: every baseline's gradient is BPTT's, in both step modes. (At T=1
    BPTT itself is the same in both modes, which test_methods checks through rate-BP.)"""
    net, params, stats, batch = tiny_setup(tiny_name)
    cases = list(itertools.product(BASELINES, ["single", "multi"]))
    ((loss_b, aux_b), g_bptt), *results = grads_of_each(
        net, params, stats, batch, ("bptt", dict(T=1, step_mode="multi")),
        *((name, dict(T=1, step_mode=step_mode, **kwargs))
          for (name, kwargs), step_mode in cases))
    assert np.linalg.norm(_flat(g_bptt)) > 1e-3
    for ((name, _), step_mode), ((loss, aux), grads) in zip(cases, results, strict=True):
        assert rel_err(grads, g_bptt) <= 1e-5, (name, step_mode)
        np.testing.assert_allclose(loss, loss_b, rtol=1e-6)
        np.testing.assert_allclose(aux["logits"], aux_b["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_flat(aux["batch_stats"]), _flat(aux_b["batch_stats"]),
                                   rtol=1e-6)


# --------------------------------------------------------------------------- 2. by hand
D_IN, H1, H2, K_OUT, B, T = 6, 5, 4, 3, 4, 3


class TwoLayer(nnx.Module):
    """dense -> LIF -> dense -> LIF -> dense readout, no BatchNorm."""

    def __init__(self, cfg, rngs):
        init = layers.TORCH_DEFAULT
        self.fc1 = layers.dense(D_IN, H1, init=init, rngs=rngs)
        self.lif1 = layers.LIF(cfg)
        self.fc2 = layers.dense(H1, H2, init=init, rngs=rngs)
        self.lif2 = layers.LIF(cfg)
        self.readout = layers.dense(H2, K_OUT, init=init, rngs=rngs)

    def __call__(self, x, ctx):  # x: [B, 1, 1, D_IN]; dense layers act on the last axis
        x = self.readout(self.lif2(self.fc2(self.lif1(self.fc1(x), ctx)), ctx))
        return x.reshape((x.shape[0], -1))


def _two_layer(reset):
    cfg = neurons.NeuronConfig(reset=reset)
    model = TwoLayer(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    weights = {}
    for name, (n_in, n_out) in {"fc1": (D_IN, H1), "fc2": (H1, H2),
                                "readout": (H2, K_OUT)}.items():
        layer = getattr(model, name)
        layer.kernel[...] = jnp.asarray(rng.normal(0.0, 1.0, (n_in, n_out)), jnp.float32)
        layer.bias[...] = jnp.asarray(rng.normal(0.3, 0.3, (n_out,)), jnp.float32)
        weights[name] = (np.asarray(layer.kernel[...], np.float64),
                         np.asarray(layer.bias[...], np.float64))
    net, params, stats = methods.split_model(model)
    batch = {"image": jnp.asarray(rng.normal(0.5, 1.5, (T, B, 1, 1, D_IN)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, K_OUT, (B,)), jnp.int32)}
    return cfg, net, params, stats, batch, weights


def _numpy_grads(cfg, weights, batch, *, traces, input_trace=False, steps=None):
    """The SLTT (``traces=False``) or OTTT formula, written out in float64."""
    (w1, b1), (w2, b2), (w3, b3) = weights["fc1"], weights["fc2"], weights["readout"]
    x = np.asarray(batch["image"], np.float64).reshape(T, B, D_IN)
    onehot = np.eye(K_OUT)[np.asarray(batch["label"])]
    sg = lambda v: cfg.alpha * (s := 1 / (1 + np.exp(-cfg.alpha * (v - cfg.thresh)))) * (1 - s)

    def lif(u, current):
        v = cfg.lam * u + current
        s = (v >= cfg.thresh).astype(np.float64)
        u = v * (1 - s) + cfg.v_reset * s if cfg.hard else v - cfg.thresh * s
        return u, s, v

    grads = {k: [np.zeros_like(w), np.zeros_like(b)] for k, (w, b) in weights.items()}
    u1, u2 = np.zeros((B, H1)), np.zeros((B, H2))
    tr_x, tr1, tr2 = np.zeros((B, D_IN)), np.zeros((B, H1)), np.zeros((B, H2))
    losses = []
    for t in range(T):
        u1, s1, v1 = lif(u1, x[t] @ w1 + b1)
        u2, s2, v2 = lif(u2, s1 @ w2 + b2)
        o = s2 @ w3 + b3
        p = np.exp(o - o.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        losses.append(-np.mean(np.log((p * onehot).sum(1))))
        tr_x, tr1, tr2 = cfg.lam * tr_x + x[t], cfg.lam * tr1 + s1, cfg.lam * tr2 + s2
        if steps is not None and not steps[t]:
            continue
        # Spatial backward of step t's loss CE(o_t, y) / T; nothing flows to step t-1.
        d_o = (p - onehot) / (B * T)
        d2 = (d_o @ w3.T) * sg(v2)
        d1 = (d2 @ w2.T) * sg(v1)
        a_in = tr_x if traces and input_trace else x[t]
        a1, a2 = (tr1, tr2) if traces else (s1, s2)
        for name, a, d in (("fc1", a_in, d1), ("fc2", a1, d2), ("readout", a2, d_o)):
            grads[name][0] += a.T @ d
            grads[name][1] += d.sum(0)
    return np.mean(losses), grads


def _check_against_numpy(grads, want):
    for name, (g_w, g_b) in want.items():
        assert np.abs(g_w).sum() > 0, name  # spikes happened: the check means something
        for got, expected in ((grads[name]["kernel"][...], g_w), (grads[name]["bias"][...], g_b)):
            err = np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected)
            assert err < 1e-5, (name, err)


@pytest.mark.parametrize("reset,step_mode", [("soft", "single"), ("soft", "multi"),
                                             ("hard", "single")])
def test_sltt_and_ottt_match_the_formulas_by_hand(reset, step_mode):
    cfg, net, params, stats, batch, weights = _two_layer(reset)
    cases = [("sltt", {}, dict(traces=False)),
             ("ottt", {}, dict(traces=True)),
             ("ottt", {"input_trace": True}, dict(traces=True, input_trace=True))]
    for name, kwargs, formula in cases:
        (loss, _), grads = grads_of(name, net, params, stats, batch, T=T,
                                    step_mode=step_mode, **kwargs)
        want_loss, want = _numpy_grads(cfg, weights, batch, **formula)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        _check_against_numpy(grads, want)

    # SLTT-K: the same formula restricted to the drawn steps; the loss still spans all T.
    for K, rng in ((1, 0), (2, 7)):
        batch_k = {**batch, "rng": rng}
        steps = np.asarray(methods.sltt_steps(batch_k, T=T, K=K))
        assert steps.sum() == K
        (loss, _), grads = grads_of("sltt_k", net, params, stats, batch_k, T=T,
                                    step_mode=step_mode, K=K)
        want_loss, want = _numpy_grads(cfg, weights, batch, traces=False, steps=steps)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        _check_against_numpy(grads, want)


def test_sltt_k_draws_are_pure_and_vary_with_the_batch():
    _, _, _, _, batch, _ = _two_layer("soft")
    T_long, K = 8, 3
    draw = lambda b: np.asarray(methods.sltt_steps(b, T=T_long, K=K))
    assert draw(batch).sum() == K
    np.testing.assert_array_equal(draw(batch), draw(batch))
    np.testing.assert_array_equal(draw({**batch, "rng": 5}), draw({**batch, "rng": 5}))
    key = jax.random.key(3)
    np.testing.assert_array_equal(draw({**batch, "rng": key}), draw({**batch, "rng": key}))
    by_step = {tuple(draw({**batch, "rng": step})) for step in range(20)}
    by_data = {tuple(draw({**batch, "image": batch["image"] + i})) for i in range(20)}
    assert len(by_step) > 5 and len(by_data) > 5
    # K = T selects every step: SLTT-K is then SLTT.
    net, params, stats, batch8 = tiny_setup("vgg_tiny")
    _, g_all = grads_of("sltt_k", net, params, stats, batch8, T=2, K=2, step_mode="single")
    _, g_sltt = grads_of("sltt", net, params, stats, batch8, T=2, step_mode="single")
    assert rel_err(g_all, g_sltt) <= 1e-6


def test_ottt_differs_from_sltt_only_in_trace_fed_weights():
    """OTTT and SLTT share every error signal; only weight gradients of layers fed by
    spikes (not the stem, which sees the raw input) change, and biases and BN do not."""
    net, params, stats, batch = tiny_setup("vgg_tiny")
    _, g_sltt = grads_of("sltt", net, params, stats, batch, T=3, step_mode="single")
    _, g_ottt = grads_of("ottt", net, params, stats, batch, T=3, step_mode="single")
    flat = lambda g: {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(g)}
    f_sltt, f_ottt = flat(g_sltt), flat(g_ottt)
    stem = "features/0/conv/kernel"
    assert stem in f_sltt
    for path, g in f_sltt.items():
        if path.endswith("kernel") and path != stem:
            assert rel_err(f_ottt[path], g) > 1e-3, path
        else:
            np.testing.assert_allclose(f_ottt[path], g, rtol=1e-5, atol=1e-7, err_msg=path)


# --------------------------------------------------------------------------- 3. memory
def test_single_mode_baseline_memory_is_flat_in_T():
    net, params, stats, batch = tiny_setup("resnet18_tiny", batch=8)
    temp = {}
    for name, kwargs in [("sltt", {}), ("ottt", {}), ("bptt", {})]:
        for T_ in (2, 16):
            fn = methods.make_grad_fn(name, net, T=T_, step_mode="single", **kwargs)
            temp[name, T_] = compiled_temp_bytes(fn, params, stats, batch)
    for name in ("sltt", "ottt"):
        assert temp[name, 16] <= 1.15 * temp[name, 2], temp
    assert temp["bptt", 16] > 3 * temp["bptt", 2], temp  # the contrast


# --------------------------------------------------------------------------- 4. errors
def test_method_names_and_arguments_are_checked():
    net, *_ = tiny_setup("vgg_tiny")
    with pytest.raises(ValueError, match="method='sltt-k'.*sltt, sltt_k, ottt"):
        methods.make_grad_fn("sltt-k", net, T=2)
    for kwargs, field in [({"T": 2, "K": 3}, "K=3"), ({"T": 2, "K": 0}, "K=0"),
                          ({"T": 2, "step_mode": "m"}, "step_mode"), ({"T": 0}, "T")]:
        with pytest.raises(ValueError, match=field):
            methods.make_grad_fn("sltt_k", net, **kwargs)
    with pytest.raises(ValueError, match="step_mode='s'.*multi, single"):
        methods.make_grad_fn("ottt", net, T=2, step_mode="s")
    net, params, stats, batch = tiny_setup("vgg_tiny")
    with pytest.raises(ValueError, match="trace_decay"):
        methods.make_grad_fn("ottt", net, T=2, trace_decay=1.5)(params, stats, batch)

    class FlattenFirst(TwoLayer):  # no layer sees the input array itself
        def __call__(self, x, ctx):
            return super().__call__(x.reshape((x.shape[0], -1))[:, None, None, :], ctx)

    net, params, stats = methods.split_model(FlattenFirst(neurons.NeuronConfig(), nnx.Rngs(0)))
    batch = {"image": jnp.ones((T, B, 1, 1, D_IN)), "label": jnp.zeros((B,), jnp.int32)}
    with pytest.raises(ValueError, match="input_trace=False: no convolution or dense"):
        methods.make_grad_fn("ottt", net, T=T)(params, stats, batch)
    methods.make_grad_fn("ottt", net, T=T, input_trace=True)(params, stats, batch)
