"""Method-level properties: T=1 exactness, exact readout, the rate pass, step modes, memory."""
import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ratebp_jax import analysis, layers, methods, neurons, profiling
from ratebp_jax.layers import Ctx

from conftest import (UNOPTIMISED, compiled_temp_bytes, grads_of, grads_of_each, jit_unoptimised,
                      rel_err, tiny_setup)


@pytest.mark.parametrize("step_mode", ["multi", "single"])
@pytest.mark.parametrize("reset", neurons.RESET_MODES)
def test_rate_gradient_equals_bptt_at_T1(tiny_name, reset, step_mode):
    net, params, stats, batch = tiny_setup(tiny_name, reset=reset)
    ((loss_b, aux_b), g_bptt), *rates = grads_of_each(
        net, params, stats, batch, ("bptt", dict(T=1, step_mode=step_mode)),
        *(("rate", dict(T=1, step_mode=step_mode, rate_grad_scale=scale))
          for scale in methods.RATE_GRAD_SCALES))
    for (loss_r, aux_r), g_rate in rates:  # identical at T=1 for every scale
        assert rel_err(g_rate, g_bptt) <= 1e-5
        # Per parameter too, each against the floor of compare_gradients.py; parameters with
        # a zero true gradient (conv biases feeding BatchNorm) to rounding of the whole.
        per_param = analysis.compare_gradients(g_rate, g_bptt)
        assert per_param["max_rel_err"] <= 1e-5 and per_param["max_zero_err"] <= 1e-6
        np.testing.assert_allclose(loss_r, loss_b, rtol=1e-6)
        chex.assert_trees_all_close(aux_r["batch_stats"], aux_b["batch_stats"], rtol=1e-6)
    # Both gradients are non-trivial: spikes happened and the comparison means something.
    assert float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(g_bptt)[0])) > 1e-3


@pytest.mark.parametrize("step_mode", ["multi", pytest.param("single", marks=pytest.mark.slow)])
@pytest.mark.parametrize("ties", layers.POOL_TIES)
@pytest.mark.parametrize("name", ["sew_resnet_tiny",
                                  pytest.param("preact_resnet_tiny", marks=pytest.mark.slow)])
def test_every_method_equals_bptt_at_T1_under_either_pool_tie_rule(name, ties, step_mode):
    """The max-pool tie rule is the same in the spike pass (BPTT, SLTT, OTTT) and the rate
    pass, so T=1 exactness holds under each rule. (SEW-ResNet pools spikes, so its windows
    tie; PreAct-ResNet pools real-valued BN outputs, where the rules agree.)"""
    net, params, stats, batch = tiny_setup(name, pool_ties=ties)
    others = ("rate", "sltt", "ottt")
    (_, g_bptt), *results = grads_of_each(
        net, params, stats, batch,
        *((method, dict(T=1, step_mode=step_mode)) for method in ("bptt",) + others))
    for method, (_, grads) in zip(others, results, strict=True):
        assert rel_err(grads, g_bptt) <= 1e-5, method


def test_pool_tie_rules_give_different_gradients_on_spikes():
    """What makes the test above mean something for SEW-ResNet: its stem pools spikes, and
    the two rules route those windows' gradients differently."""
    g = {}
    for ties in layers.POOL_TIES:
        net, params, stats, batch = tiny_setup("sew_resnet_tiny", pool_ties=ties)
        g[ties] = grads_of("bptt", net, params, stats, batch, T=1)[1]
    assert rel_err(g["split"], g["first"]) > 1e-2


def _readout(grads):
    """The final classifier's kernel gradient: ``fc`` in the ResNets, the last entry of
    ``classifier`` in the VGGs."""
    if "fc" in grads:
        return grads["fc"]["kernel"][...]
    return grads["classifier"][len(grads["classifier"]) - 1]["kernel"][...]


@pytest.mark.parametrize("step_mode", ["multi", "single"])
@pytest.mark.parametrize("T", [2, 5])
def test_readout_gradient_is_exact_at_any_T(tiny_name, T, step_mode):
    net, params, stats, batch = tiny_setup(tiny_name)
    (_, g_bptt), (_, g_exact), (_, g_ref) = grads_of_each(
        net, params, stats, batch, ("bptt", dict(T=T, step_mode=step_mode)),
        ("rate", dict(T=T, step_mode=step_mode)),
        ("rate", dict(T=T, step_mode=step_mode, rate_grad_scale="reference")))
    np.testing.assert_allclose(_readout(g_exact), _readout(g_bptt), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_readout(g_ref), _readout(g_bptt) / T, rtol=1e-4, atol=1e-6)
    # ...while the hidden layers are only approximated (else this test proves nothing).
    assert rel_err(g_exact, g_bptt) > 1e-4


@contextlib.contextmanager
def capture(*classes):
    """Record ``(x, out)`` of every call to a layer of ``classes``, keyed by module id."""
    calls, originals = {}, {cls: cls.__call__ for cls in classes}

    def hook(orig):
        def call(self, x, ctx):
            out = orig(self, x, ctx)
            calls.setdefault(id(self), []).append((x, out))
            return out
        return call

    for cls, orig in originals.items():
        cls.__call__ = hook(orig)
    try:
        yield calls
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig


def spike_pass_calls(net, params, stats, x_TxB, T, step_mode, cls=layers.LIF):
    """Inputs and outputs ``[T, B, ...]`` of every ``cls`` layer in a recording spike pass,
    keyed by path."""
    model = net.merge(params, stats)
    ctx = Ctx("spike", step_mode, T, train=True, record=True)
    with capture(cls) as calls:
        if step_mode == "multi":
            model(x_TxB.reshape((-1,) + x_TxB.shape[2:]), ctx)
        else:
            for x_B in x_TxB:
                model(x_B, ctx)
    by_path = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, cls):
            steps = calls[id(module)]
            by_path[path] = tuple(
                a[0].reshape((T, -1) + a[0].shape[1:]) if step_mode == "multi" else jnp.stack(a)
                for a in zip(*steps))
    return by_path


def spike_trains(net, params, stats, x_TxB, T, step_mode):
    return {path: out for path, (_, out) in
            spike_pass_calls(net, params, stats, x_TxB, T, step_mode).items()}


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_rate_pass_values_equal_spike_pass_time_means(tiny_name, step_mode):
    """Each LIF's and BN's rate-pass value is the time mean of its spike-pass output, and
    each BN's recorded statistics are those of its spike-pass input."""
    T = 4
    net, params, stats, batch = tiny_setup(tiny_name)
    x_TxB = methods.time_major(batch["image"], T)
    logits_spike, _, records = methods.spike_pass(net, params, stats, x_TxB, T=T,
                                                  step_mode=step_mode)
    model = net.merge(params, stats, records)
    with capture(layers.LIF, layers.BatchNorm) as calls:
        logits_rate = model(x_TxB.mean(0), Ctx("rate", step_mode, T))
    np.testing.assert_allclose(logits_rate, logits_spike, rtol=1e-5, atol=1e-6)

    spikes = spike_pass_calls(net, params, stats, x_TxB, T, step_mode)
    bns = spike_pass_calls(net, params, stats, x_TxB, T, step_mode, layers.BatchNorm)
    assert sum(float(s.sum()) for _, s in spikes.values()) > 0
    for path, module in nnx.iter_modules(model):
        if isinstance(module, (layers.LIF, layers.BatchNorm)):
            (_, out_rate), = calls[id(module)]
            x_spike, out_spike = (spikes if isinstance(module, layers.LIF) else bns)[path]
            np.testing.assert_allclose(out_rate, out_spike.mean(0), rtol=1e-5, atol=2e-5)
        if isinstance(module, layers.BatchNorm):
            axes = tuple(range(1, x_spike.ndim - 1))  # per step, over batch and space
            per_step_mean = x_spike.mean(axes)
            per_step_var = ((x_spike - x_spike.mean(axes, keepdims=True)) ** 2).mean(axes)
            if step_mode == "multi":  # pooled over T*B
                want_mean = per_step_mean.mean(0)
                want_var = ((x_spike - want_mean) ** 2).mean((0,) + axes)
            else:  # the mean over T of the per-step statistics
                want_mean, want_var = per_step_mean.mean(0), per_step_var.mean(0)
            np.testing.assert_allclose(module.spike_mean[...], want_mean, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(module.spike_var[...], want_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_rate_pass_convolutions_take_their_value_from_the_spike_pass(tiny_name, step_mode,
                                                                     monkeypatch):
    """Each ConvBN's convolution runs backward only in the rate pass, with the time mean of
    its spike-pass outputs as its value: the gradient is the one of running it forward on
    the rate input (equal by linearity, to float rounding), and the compiled multi mode
    step has one convolution fewer per ConvBN than that."""
    net, params, stats, batch = tiny_setup(tiny_name)
    kw = dict(T=4, step_mode=step_mode)
    fn = methods.make_grad_fn("rate", net, **kw)
    (loss, aux), grads = jit_unoptimised(fn)(params, stats, batch)
    n_convbn = sum(isinstance(m, layers.ConvBN) for _, m in nnx.iter_modules(net.merge(
        params, stats)))
    convolutions = profiling.compile_with_stats(fn, params, stats, batch, compiler_options=
                                                UNOPTIMISED)[0].as_text().count(" convolution(")
    with monkeypatch.context() as m:
        m.setattr(layers, "_conv_from_record", lambda conv, x, value: conv(x))
        fn_forward = methods.make_grad_fn("rate", net, **kw)
        (loss_f, _), grads_f = jit_unoptimised(fn_forward)(params, stats, batch)
        convolutions_f = profiling.compile_with_stats(
            fn_forward, params, stats, batch, compiler_options=UNOPTIMISED)[0].as_text().count(
            " convolution(")
    assert rel_err(grads, grads_f) <= 1e-5
    np.testing.assert_allclose(loss, loss_f, rtol=1e-6)
    assert float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(grads)[0])) > 1e-3
    # The count reads XLA:CPU's HLO text; other backends compile convolutions to library
    # calls named otherwise.
    if step_mode == "multi" and jax.default_backend() == "cpu":
        assert n_convbn > 0 and convolutions == convolutions_f - n_convbn


def test_rate_pass_without_records_names_the_missing_record():
    net, params, stats, batch = tiny_setup("resnet18_tiny")
    _, _, records = methods.spike_pass(net, params, stats, batch["image"], T=1,
                                       step_mode="multi")
    other_batch = jnp.concatenate([batch["image"], batch["image"]])
    with pytest.raises(ValueError, match=r"ConvBN\.out_mean.*spike pass"):
        methods.rate_pass(net, params, stats, records, other_batch, T=1, step_mode="multi")


def test_multi_and_single_step_modes_give_identical_spikes_without_batchnorm():
    cfg = neurons.NeuronConfig()

    class NoBN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = layers.conv(3, 6, 3, bias=True, init=layers.TORCH_DEFAULT, rngs=rngs)
            self.lif1 = layers.LIF(cfg)
            self.conv2 = layers.conv(6, 8, 3, stride=2, bias=True, init=layers.TORCH_DEFAULT,
                                     rngs=rngs)
            self.lif2 = layers.LIF(cfg)
            self.fc = layers.dense(8, 5, init=layers.TORCH_DEFAULT, rngs=rngs)

        def __call__(self, x, ctx):
            x = self.lif2(self.conv2(self.lif1(self.conv1(x), ctx)), ctx)
            return self.fc(layers.global_avg_pool(x))

    net, params, stats = methods.split_model(NoBN(nnx.Rngs(0)))
    x_TxB = 3.0 * jax.random.normal(jax.random.key(0), (6, 2, 8, 8, 3))  # varies over time
    spikes = {mode: spike_trains(net, params, stats, x_TxB, 6, mode)
              for mode in ("multi", "single")}
    assert spikes["multi"].keys() == spikes["single"].keys()
    total = 0.0
    for path in spikes["multi"]:
        np.testing.assert_array_equal(spikes["multi"][path], spikes["single"][path])
        total += float(spikes["multi"][path].sum())
    assert total > 0
    logits = {mode: methods.simulate(net, params, stats, x_TxB,
                                     Ctx("spike", mode, 6, train=True, record=True))
              for mode in ("multi", "single")}
    chex.assert_trees_all_close(logits["multi"][0], logits["single"][0], rtol=1e-6)


def test_single_mode_rate_memory_is_flat_in_T():
    net, params, stats, batch = tiny_setup("resnet18_tiny", batch=8, image_size=16)
    temp = {}
    for method in ("rate", "bptt"):
        for T in (2, 16):
            fn = methods.make_grad_fn(method, net, T=T, step_mode="single")
            temp[method, T] = compiled_temp_bytes(fn, params, stats, batch)
    assert temp["rate", 16] <= 1.15 * temp["rate", 2], temp
    # The contrast that makes the bound meaningful: BPTT stores every step.
    assert temp["bptt", 16] > 3 * temp["bptt", 2], temp


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_rematerialised_bptt_equals_bptt(tiny_name, step_mode):
    net, params, stats, batch = tiny_setup(tiny_name)
    (loss, aux), grads = grads_of("bptt", net, params, stats, batch, T=3, step_mode=step_mode)
    (loss_r, aux_r), grads_r = grads_of("bptt_remat", net, params, stats, batch, T=3,
                                        step_mode=step_mode)
    assert rel_err(grads_r, grads) <= 1e-5
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    chex.assert_trees_all_close(aux_r["batch_stats"], aux["batch_stats"], rtol=1e-6)


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_rematerialised_bptt_needs_less_memory(step_mode):
    # In multi mode this holds only because the recomputation waits for the cotangent:
    # with plain jax.checkpoint XLA:CPU recomputes during the forward pass (equal memory).
    net, params, stats, batch = tiny_setup("resnet18_tiny", batch=8, image_size=16)
    temp = {method: compiled_temp_bytes(
                methods.make_grad_fn(method, net, T=4, step_mode=step_mode), params, stats, batch)
            for method in ("bptt", "bptt_remat")}
    assert temp["bptt_remat"] < 0.75 * temp["bptt"], temp


@pytest.mark.parametrize("kwargs,field", [
    ({"T": 0}, "T"), ({"T": 2, "step_mode": "both"}, "step_mode"),
    ({"T": 2, "rate_grad_scale": "half"}, "rate_grad_scale")])
def test_bad_method_arguments_name_the_field(kwargs, field):
    net, *_ = tiny_setup("vgg_tiny")
    with pytest.raises(ValueError, match=field):
        methods.make_grad_fn("rate", net, **kwargs)


def test_unknown_method_lists_allowed_names():
    net, *_ = tiny_setup("vgg_tiny")
    with pytest.raises(ValueError, match="method='sgd'.*bptt"):
        methods.make_grad_fn("sgd", net, T=1)


def test_keyword_no_method_takes_is_named_in_a_type_error():
    net, *_ = tiny_setup("vgg_tiny")
    with pytest.raises(TypeError, match="argument 'step_mod'; did you mean 'step_mode'"):
        methods.make_grad_fn("rate", net, T=4, step_mod="single")


def test_keyword_of_another_method_is_ignored():
    """The trainer passes ``rate_grad_scale`` to every method: BPTT's gradient is the same
    with it as without."""
    net, params, stats, batch = tiny_setup("vgg_tiny")
    programs = [str(jax.make_jaxpr(methods.make_grad_fn("bptt", net, T=2, **kwargs))(
        params, stats, batch)) for kwargs in ({"rate_grad_scale": "reference"}, {})]
    assert programs[0] == programs[1]


def test_make_grad_fn_documents_every_keyword():
    for name in methods.METHODS:
        for keyword in methods.method_keywords(name):
            assert f"\n    {keyword}:" in methods.make_grad_fn.__doc__, (name, keyword)


@pytest.mark.parametrize("batch_fn,error,message", [
    (lambda b: {**b, "label": b["label"][:2]}, ValueError, "label: expected shape"),
    (lambda b: {**b, "label": b["label"].astype(jnp.float32)}, TypeError, "integer dtype"),
    (lambda b: {**b, "image": b["image"][None, None]}, ValueError, "image: expected"),
    (lambda b: {"image": b["image"]}, TypeError, "'image' and 'label'"),
])
def test_bad_batches_are_rejected_by_name(batch_fn, error, message):
    net, params, stats, batch = tiny_setup("vgg_tiny")
    for method in ("rate", "bptt"):
        with pytest.raises(error, match=message):
            methods.make_grad_fn(method, net, T=2)(params, stats, batch_fn(batch))
