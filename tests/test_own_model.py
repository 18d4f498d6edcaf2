"""A model of one's own (examples/my_snn.py): exact rate-BP at T=1, trained by
experiments/main.py from its import path, and named errors for bad paths and names."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ratebp_jax import analysis, methods, models, neurons
from ratebp_jax import workdir as wd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # examples/ is a folder of the repository, not an installed package

EXAMPLE = "examples.my_snn:MySNN"


@pytest.mark.parametrize("step_mode", ["multi", "single"])
@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_own_model_rate_gradient_equals_bptt_at_T1(step_mode, reset):
    model = models.create_model(EXAMPLE, num_classes=5, in_channels=1, image_size=8,
                                neuron=neurons.NeuronConfig(reset=reset))
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(1), 8, 8, 1, 5, scale=2.0)
    grads = {method: jax.jit(methods.make_grad_fn(method, net, T=1, step_mode=step_mode))(
        params, batch_stats, batch)[1] for method in ("rate", "bptt")}
    comparison = analysis.compare_gradients(grads["rate"], grads["bptt"])
    assert comparison["max_rel_err"] <= 1e-5, comparison["per_param"]
    assert comparison["cosine"] > 1 - 1e-6
    # Spikes happened and the convolution got gradient: the comparison means something.
    assert analysis.global_norm(grads["bptt"]["conv"]) > 1e-3


@pytest.mark.parametrize("step_mode", ["multi", "single"])
def test_own_model_rate_pass_logits_equal_spike_pass_time_mean_at_T4(step_mode):
    """The check of docs/DESIGN.md section 4.3 at T > 1, where a non-linear layer after the
    last LIF would show."""
    model = models.create_model(EXAMPLE, num_classes=5, in_channels=1, image_size=8)
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(1), 8, 8, 1, 5, scale=2.0)
    logits_spike, new_stats, records = methods.spike_pass(
        net, params, batch_stats, batch["image"], T=4, step_mode=step_mode)
    logits_rate = methods.rate_pass(net, params, new_stats, records, batch["image"], T=4,
                                    step_mode=step_mode)
    np.testing.assert_allclose(logits_rate, logits_spike, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_main_trains_own_model_from_the_working_directory(tmp_path):
    """As a researcher would: their package in their folder, main.py from elsewhere."""
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "mypkg")
    args = ["--config.model=mypkg.my_snn:MySNN", "--config.model_kwargs={'width': 8}",
            "--config.num_train_steps=2",
            "--config.T=2", "--config.batch_size=16", "--config.progress_bar=false",
            "--config.plots=false", "--workdir", "run"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "main.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / wd.SUMMARY_FILE).read_text())
    assert summary["model"] == "mypkg.my_snn:MySNN" and summary["steps"] == 2
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    recorded = json.loads((tmp_path / "run" / wd.CONFIG_FILE).read_text())
    assert recorded["model"] == "mypkg.my_snn:MySNN"
    assert recorded["model_kwargs"] == {"width": 8}
    # The recorded import path and arguments are compared on a rerun like any other field.
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from configs import default
    config = default.get_config()
    config.update({**recorded, "model": "vgg_tiny"})
    with pytest.raises(wd.RunMismatch, match="model 'mypkg.my_snn:MySNN' -> 'vgg_tiny'"):
        wd.check_same_run(str(tmp_path / "run"), config)
    config.update({**recorded, "model_kwargs": {"width": 4}})
    with pytest.raises(wd.RunMismatch, match="model_kwargs {'width': 8} -> {'width': 4}"):
        wd.check_same_run(str(tmp_path / "run"), config)


def test_model_kwargs_reach_own_and_zoo_factories():
    own = nnx.eval_shape(lambda: models.create_model(
        EXAMPLE, num_classes=3, in_channels=1, image_size=8, model_kwargs={"width": 6}))
    assert own.conv.kernel.shape == (3, 3, 1, 6) and own.fc.kernel.shape == (6 * 16, 3)
    # A zoo alias's bound arguments (a functools.partial) may be given again.
    zoo = nnx.eval_shape(lambda: models.create_model(
        "vgg_tiny", num_classes=3, in_channels=1, image_size=8,
        model_kwargs={"spec": [4, "A", 6, "AA"], "hidden": [5]}))
    assert zoo.features[2].conv.kernel.shape == (3, 3, 4, 6)
    assert [d.kernel.shape for d in zoo.classifier] == [(6, 5), (5, 3)]
    assert models.model_keywords(EXAMPLE) == ("width",)
    assert models.model_keywords("vgg_tiny") == ("spec", "hidden")


@pytest.mark.parametrize("name,kwargs,message", [
    (EXAMPLE, {"widht": 8}, "model 'examples.my_snn:MySNN' takes no argument 'widht'; "
                            "allowed values are width; did you mean 'width'?"),
    ("resnet18_tiny", {"depth": 2}, "allowed values are stage_sizes, widths, "),
    (EXAMPLE, {"rngs": 1}, "'rngs' is one of the model keywords"),
    (EXAMPLE, {"width": {8}}, "'width' has a value of type set"),
    (EXAMPLE, {"width": float("nan")}, "'width' has a value of type float"),
    (EXAMPLE, [("width", 8)], "must be a dict of keyword arguments"),
])
def test_bad_model_kwargs_are_named_in_one_line(name, kwargs, message):
    with pytest.raises(ValueError) as info:
        models.check_model_kwargs(name, kwargs)
    text = str(info.value)
    assert text.startswith("model_kwargs=") and message in text and "\n" not in text


@pytest.mark.parametrize("name,error,message", [
    ("nopkg_xyz.mymodel:Net", ValueError,
     "model='nopkg_xyz.mymodel:Net': cannot import module 'nopkg_xyz.mymodel' (No module"),
    ("examples.my_snn:NoSuchNet", ValueError,
     "model='examples.my_snn:NoSuchNet': module 'examples.my_snn' has no attribute"),
    ("ratebp_jax.layers:PHASES", TypeError,
     "model='ratebp_jax.layers:PHASES': not callable (a tuple); expected a class or"),
    ("ratebp_jax.layers:BatchNorm", ValueError,
     "does not take the model keywords (missing a required argument: 'num_features')"),
    ("mypkg/my_snn.py:MySNN", ValueError, "must be package.module:Factory"),
    ("examples.my_snn:", ValueError, "must be package.module:Factory"),
    ("resnet50", ValueError, "model='resnet50': allowed values are resnet18, "),
])
def test_bad_model_name_or_path_is_named(name, error, message):
    with pytest.raises(error) as info:
        models.resolve(name)
    text = str(info.value)
    assert text.startswith(f"model={name!r}: ") and message in text and "\n" not in text


def test_import_error_inside_the_module_is_not_blamed_on_the_search_path(tmp_path,
                                                                         monkeypatch):
    (tmp_path / "needs_torch.py").write_text("import torch_xyz_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="No module named 'torch_xyz_missing'\\)$"):
        models.resolve("needs_torch:Net")


def test_registered_model_is_created_by_name_and_can_be_replaced(monkeypatch):
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))  # leave the registry as it was
    from examples import my_snn
    models.register("my_snn", my_snn.MySNN)
    models.register("my_snn", functools.partial(my_snn.MySNN, width=4))  # a cell rerun
    model = models.create_model("my_snn", num_classes=3, in_channels=1, image_size=8)
    assert model.conv.kernel.shape == (3, 3, 1, 4) and model.fc.kernel.shape == (64, 3)


@pytest.mark.parametrize("name,message", [
    ("resnet18", "name='resnet18': is a zoo model"),
    ("mypkg:Net", "name='mypkg:Net': must be a non-empty name without ':'"),
    ("", "name='': must be a non-empty name"),
])
def test_register_refuses_zoo_names_and_import_paths(name, message):
    from examples import my_snn
    with pytest.raises(ValueError, match=message):
        models.register(name, my_snn.MySNN)


def test_factory_must_return_an_nnx_module(monkeypatch):
    monkeypatch.setattr(models, "MODELS", dict(models.MODELS))
    models.register("not_a_module", lambda **kwargs: "logits")
    with pytest.raises(TypeError, match="model='not_a_module': the factory returned a str"):
        models.create_model("not_a_module")
