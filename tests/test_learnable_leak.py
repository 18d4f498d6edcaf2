"""A learnable leak (PLIF's ``lam = sigmoid(w)``, docs/DESIGN.md section 8): a parameter of
each LIF layer, trained by every method but OTTT, and rate-BP's leak gradient exact where
the derivation says it is: on one LIF layer with the loss on its rate, at any T."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import grads_of_each, tiny_setup
from ratebp_jax import analysis, layers, methods, models, neurons, train
from test_data import config_with


class OneLIF(nnx.Module):
    """One LIF layer whose spikes are the logits: the loss is on its firing rate."""

    def __init__(self, cfg):
        self.lif = layers.LIF(cfg)

    def __call__(self, x, ctx):
        return self.lif(x, ctx)


def one_lif(reset, T, lam=0.6, classes=5, batch=16):
    """A float64 OneLIF, its parameters, and a batch of time-varying inputs ``[T, B, K]``
    around the threshold. Call inside ``jax.enable_x64()``."""
    cfg = neurons.NeuronConfig(lam=lam, reset=reset, learnable_leak=True)
    net, params, stats = methods.split_model(OneLIF(cfg))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    x = 0.5 + 1.2 * jax.random.normal(jax.random.key(T), (T, batch, classes), jnp.float64)
    return cfg, net, params, stats, {"image": x, "label": jnp.arange(batch) % classes}


def leak_grads(net, params, stats, batch, T, step_mode="multi"):
    """The leak's gradient, ``d loss / d w``, of rate-BP (exact scale) and of BPTT."""
    (_, rate), (_, bptt) = grads_of_each(
        net, params, stats, batch, ("rate", dict(T=T, step_mode=step_mode)),
        ("bptt", dict(T=T, step_mode=step_mode)))
    return float(rate["lif"]["leak_logit"][...]), float(bptt["lif"]["leak_logit"][...])


def test_leak_is_a_layer_parameter_that_starts_at_the_configs_lam():
    lif = layers.LIF(neurons.NeuronConfig(lam=0.3, learnable_leak=True))
    assert isinstance(lif.leak_logit, nnx.Param) and lif.leak_logit.shape == ()
    np.testing.assert_allclose(float(lif.leak()), 0.3, rtol=1e-7)
    # Off by default: no parameter, and the neuron functions read the static lam.
    fixed = layers.LIF(neurons.NeuronConfig(lam=0.3))
    assert fixed.leak() is None and not hasattr(fixed, "leak_logit")
    for lam in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"lam={lam}: must be a finite number in "
                                             r"\(0.0, 1.0\)"):
            neurons.NeuronConfig(lam=lam, learnable_leak=True)
    with pytest.raises(ValueError, match="learnable_leak=1: must be true or false"):
        neurons.NeuronConfig(learnable_leak=1)


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_leak_gradient_is_zero_at_T1(step_mode):
    """At T=1 the membrane starts at rest, so ``v_1 = x_1`` does not depend on the leak."""
    with jax.enable_x64():
        _, net, params, stats, batch = one_lif("soft", 1)
        assert leak_grads(net, params, stats, batch, 1, step_mode) == (0.0, 0.0)


@pytest.mark.parametrize("reset", neurons.RESET_MODES)
@pytest.mark.parametrize("T", [2, 4, 8])
def test_rate_leak_gradient_equals_bptt_on_one_layer(reset, T):
    """Loss on one layer's rate: rate-BP's leak gradient is ``dL/dr * dr/dlam * lam(1 -
    lam)`` with ``dr/dlam`` recorded exactly by the spike pass, so it is BPTT's to float64
    rounding (docs/DESIGN.md section 8)."""
    with jax.enable_x64():
        _, net, params, stats, batch = one_lif(reset, T)
        rate, bptt = leak_grads(net, params, stats, batch, T)
    assert abs(bptt) > 1e-5  # spikes happened and the leak matters
    assert rate == pytest.approx(bptt, rel=1e-12, abs=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_rate_leak_gradient_equals_bptt_in_single_step_mode(reset):
    with jax.enable_x64():
        _, net, params, stats, batch = one_lif(reset, 4)
        rate, bptt = leak_grads(net, params, stats, batch, 4, "single")
    assert rate == pytest.approx(bptt, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_rate_leak_gradient_equals_jvp_of_the_bptt_scan(reset, monkeypatch):
    """Forward mode in ``lam`` through ``neurons.lif_scan`` itself, its spike made forward-
    differentiable with the same surrogate; ``dw = dlam * lam (1 - lam)``. (Finite
    differences of the rate pass cannot check this: its value is the recorded rate.)"""
    T = 4
    with jax.enable_x64():
        cfg, net, params, stats, batch = one_lif(reset, T)
        rate, _ = leak_grads(net, params, stats, batch, T)

        monkeypatch.setattr(neurons, "spike", spike_with_jvp)

        def loss_of_lam(lam):
            rates = neurons.lif_scan(batch["image"], cfg, lam=lam).mean(0)
            return methods.cross_entropy(rates, batch["label"])

        lam = jax.nn.sigmoid(params["lif"]["leak_logit"][...])
        _, dloss_dlam = jax.jvp(loss_of_lam, (lam,), (jnp.ones_like(lam),))
        dloss_dw = float(dloss_dlam * lam * (1 - lam))
    assert rate == pytest.approx(dloss_dw, rel=1e-12)


def spike_with_jvp(v, cfg):
    """``neurons.spike`` with the surrogate as a custom JVP instead of a custom VJP."""
    @jax.custom_jvp
    def fire(v):
        return (v >= cfg.thresh).astype(v.dtype)

    fire.defjvp(lambda primals, tangents: (
        fire(primals[0]), tangents[0] * neurons.surrogate_grad(primals[0], cfg)))
    return fire(v)


@pytest.mark.parametrize("step_mode", ["multi", pytest.param("single", marks=pytest.mark.slow)])
def test_every_method_but_ottt_trains_the_leak(step_mode):
    """bptt, bptt_remat, sltt and rate give every LIF layer's leak a gradient; OTTT, whose
    traces assume one fixed decay, refuses with one line."""
    model = models.create_model("mlp_tiny", num_classes=5, in_channels=12, image_size=1,
                                neuron=neurons.NeuronConfig(learnable_leak=True))
    net, params, stats = methods.split_model(model)
    batch = {"image": 2.0 * jax.random.normal(jax.random.key(1), (6, 12)),
             "label": jnp.arange(6) % 5}
    names = ("bptt", "bptt_remat", "sltt", "rate")
    results = grads_of_each(net, params, stats, batch,
                            *[(m, dict(T=3, step_mode=step_mode)) for m in names])
    for name, (_, grads) in zip(names, results, strict=True):
        leaks = [v for k, v in analysis.named_leaves(grads) if k.endswith("leak_logit")]
        assert len(leaks) == 2 and all(abs(float(g)) > 0 for g in leaks), name
    with pytest.raises(ValueError, match="method='ottt' with a learnable leak: OTTT's "
                                         "presynaptic traces decay by one fixed factor"):
        jax.eval_shape(methods.make_grad_fn("ottt", net, T=3, step_mode=step_mode),
                       params, stats, batch)


def test_leak_off_leaves_the_parameters_as_they_were():
    """The default: no leak parameter, so the reference parity's parameter trees, and its
    programs, are those without the option."""
    _, params, _, _ = tiny_setup("vgg_tiny")
    assert not any("leak" in k for k, _ in analysis.named_leaves(params))


def test_config_with_learnable_leak_refuses_ottt():
    with pytest.raises(ValueError, match="method='ottt' with learnable_leak=True"):
        train.validate_config(config_with(learnable_leak=True, method="ottt"))
    with pytest.raises(ValueError, match="grad_agreement_methods=.* with learnable_leak"):
        train.validate_config(config_with(learnable_leak=True,
                                          grad_agreement_methods=("rate", "ottt")))


@pytest.mark.slow
def test_config_learnable_leak_trains_every_layers_leak(tmp_path):
    config = config_with(learnable_leak=True, model="mlp_tiny", T=2, batch_size=16,
                         num_train_steps=3, progress_bar=False, plots=False)
    summary = train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    _, _, state = train.load_trained(config, str(tmp_path), log=lambda *_: None)
    leaks = [float(jax.nn.sigmoid(v)) for k, v in analysis.named_leaves(state["params"])
             if k.endswith("leak_logit")]
    assert summary["steps"] == 3 and len(leaks) == 2
    assert all(0 < lam < 1 and lam != pytest.approx(0.2, abs=1e-7) for lam in leaks)
