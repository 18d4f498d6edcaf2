"""contract.check_model: the zoo keeps the layer contract (its tiny variants run, its
full-size models traced), each way of breaking it in tests/contract_models.py is named by
its operation and place, a ReLU on spikes is harmless, and the check leaves the model as
it was."""
import os
import subprocess
import sys

import chex
import jax
import pytest
from flax import nnx

from conftest import IMAGE_SIZE, tiny_setup
from ratebp_jax import contract, models, neurons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # tests.contract_models, as main.py imports it from the repository

TINY = ("vgg_tiny", "vggsnn_tiny", "resnet18_tiny", "resnet19_tiny", "sew_resnet_tiny",
        "preact_resnet_tiny")
# name -> (H, W, C) of the dataset its reproduction config trains on
FULL_SIZE = {"resnet18": (32, 32, 3), "resnet19": (32, 32, 3), "vgg11": (32, 32, 3),
             "vgg13": (32, 32, 3), "vggsnn_cifar": (32, 32, 3), "vggsnn_dvs": (48, 48, 2),
             "sew_resnet34": (224, 224, 3), "preact_resnet34": (224, 224, 3),
             "vgg_small": (8, 8, 1)}
SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)


def own_model(name):
    return models.create_model(f"tests.contract_models:{name}", num_classes=3, in_channels=1,
                               image_size=IMAGE_SIZE)


@pytest.mark.parametrize("step_mode", ["multi", "single"])
@pytest.mark.parametrize("name", TINY)
def test_tiny_zoo_models_keep_the_contract_traced_and_run(name, step_mode):
    net, params, batch_stats, batch = tiny_setup(name)
    findings = contract.check_model(net.merge(params, batch_stats),
                                    image_shape=batch["image"].shape[1:], T=3,
                                    step_mode=step_mode)
    assert findings == []


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_zoo_models_keep_the_contract_traced(name):
    shape = FULL_SIZE[name]
    model = nnx.eval_shape(lambda: models.resolve(name)(
        num_classes=10, in_channels=shape[-1], image_size=shape[0],
        neuron=neurons.NeuronConfig(), rngs=nnx.Rngs(0)))  # no weights are drawn
    for step_mode in ("multi", "single"):
        assert contract.check_model(model, image_shape=shape, step_mode=step_mode,
                                    numeric=False) == []


BETWEEN = "between LIF 'lif1' and LIF 'lif2'"
# (model, the finding's severity, its operation, where it is, the source line's function)
BROKEN = [
    ("MaxPoolBetween", "error", "reduce_window_max", BETWEEN, "_max_pool"),
    ("ReluBetween", "error", "max", BETWEEN, "TwoLIF.__call__"),
    ("GeluBetween", "error", "integer_pow, tanh, mul", BETWEEN, "TwoLIF.__call__"),
    ("TanhBetween", "error", "tanh", BETWEEN, "TwoLIF.__call__"),
    ("ExpLogBetween", "error", "exp, log", BETWEEN, "<lambda>"),
    ("ProductBetween", "error", "mul", BETWEEN, "<lambda>"),
    ("WhereBetween", "error", "gt, select_n", BETWEEN, "<lambda>"),
    ("MaxPoolAfter", "error", "reduce_window_max",
     "after LIF 'lif2', the last before the output", "_max_pool"),
    ("ReluOnSpikes", "harmless", "max", "after LIF 'lif1'", "TwoLIF.__call__"),
    ("NNXBatchNorm", "warning", "square, max, rsqrt, mul", "before LIF 'lif'",
     "NNXBatchNorm.__call__"),
]


@pytest.mark.parametrize("step_mode", ["multi", "single"])
@pytest.mark.parametrize("name,severity,operation,layer,function", BROKEN)
def test_broken_model_is_named_by_operation_and_place(name, severity, operation, layer,
                                                      function, step_mode):
    findings = contract.check_model(own_model(name), image_shape=SHAPE, step_mode=step_mode,
                                    numeric=False)
    assert len(findings) == 1, [str(f) for f in findings]
    finding, = findings
    assert (finding.severity, finding.operation, finding.layer) == (severity, operation, layer)
    assert finding.source.startswith("tests/contract_models.py:")
    assert f"({function})" in finding.source
    assert str(finding).startswith(f"{severity}: {operation} ({layer}, tests/contract_models")


def test_harmless_and_before_first_lif_findings_say_why():
    relu, = contract.check_model(own_model("ReluOnSpikes"), image_shape=SHAPE, numeric=False)
    assert "spikes and rates are non-negative, so it is the identity there" in relu.message
    norm, = contract.check_model(own_model("NNXBatchNorm"), image_shape=SHAPE, numeric=False)
    assert "flax/nnx/nn/normalization.py" in norm.source  # the library frame it went through
    assert "Harmless when the input is a static image" in norm.message
    assert "use layers.BatchNorm" in norm.message


@pytest.mark.parametrize("between,operation", [
    ("cond", "gt, cond"), ("scan", "tanh")])
def test_operations_inside_nested_programs_are_found(between, operation):
    findings = contract.check_model(_two_lif(between=between), image_shape=SHAPE,
                                    numeric=False)
    assert [(f.severity, f.operation, f.layer) for f in findings] == [
        ("error", operation, BETWEEN)]


def _two_lif(**kwargs):
    from tests import contract_models
    return contract_models.TwoLIF(num_classes=3, in_channels=1, image_size=IMAGE_SIZE,
                                  neuron=neurons.NeuronConfig(), rngs=nnx.Rngs(0), **kwargs)


def test_unknown_primitive_is_a_warning_and_an_unused_value_nothing():
    fft, = contract.check_model(_two_lif(between="fft"), image_shape=SHAPE, numeric=False)
    assert (fft.severity, fft.layer) == ("warning", BETWEEN) and "fft" in fft.operation
    assert "does not know whether" in fft.message
    assert contract.check_model(_two_lif(between="unused_tanh"), image_shape=SHAPE,
                                numeric=False) == []


def test_contract_layer_called_twice_is_an_error():
    findings = contract.check_model(own_model("LIFCalledTwice"), image_shape=SHAPE,
                                    numeric=False)
    assert [(f.severity, f.operation, f.layer) for f in findings] == [
        ("error", "call count", "'lif1'")]
    assert "2 times in the spike pass and 2 times in the rate pass" in findings[0].message


def test_value_checks_catch_what_the_logits_miss_and_leave_the_model_unchanged():
    """A max pooling between two LIF layers shows in the second LIF's rate-pass input,
    not in the logits; one after the last LIF shows in the logits. The spike pass runs in
    training mode, which would update BatchNorm's running statistics in place: it runs on
    a copy."""
    model = own_model("MaxPoolBetween")
    before = jax.tree.map(lambda x: x.copy(), nnx.state(model))
    graph_before = nnx.graphdef(model)
    findings = contract.check_model(model, image_shape=SHAPE, T=4)
    assert [(f.severity, f.operation, f.layer) for f in findings] == [
        ("error", "reduce_window_max", BETWEEN), ("error", "rate-pass value", "LIF 'lif2'")]
    chex.assert_trees_all_equal(nnx.state(model), before)
    assert nnx.graphdef(model) == graph_before
    assert all(not hasattr(m, contract._PATH_ATTR) for _, m in nnx.iter_modules(model))
    assert not any(hasattr(cls.__call__, "__wrapped__") for cls in contract.CONTRACT_LAYERS)
    after = contract.check_model(own_model("MaxPoolAfter"), image_shape=SHAPE, T=4)
    assert [(f.operation, f.layer) for f in after] == [
        ("reduce_window_max", "after LIF 'lif2', the last before the output"),
        ("logits", "")]


def test_lif_called_twice_fails_the_t1_gradient_check():
    findings = contract.check_model(own_model("LIFCalledTwice"), image_shape=SHAPE,
                                    step_mode="single")
    assert {"call count", "T=1 gradient"} <= {f.operation for f in findings}
    assert all(f.severity == "error" for f in findings)


@pytest.mark.parametrize("change", [{"model": "vgg_small"}, {"method": "bptt"}])
def test_zoo_models_and_runs_without_rate_bp_are_not_checked(change):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from configs import default
    config = default.get_config()
    config.update({"model": "tests.contract_models:MaxPoolBetween", **change})
    assert contract.check_config_model(config) == []


@pytest.mark.slow
def test_main_prints_the_findings_before_training_and_can_stop_on_them(tmp_path):
    """experiments/main.py with a broken model by import path: the findings come before
    the first epoch's line; with contract_errors_fatal the run stops with one error line
    (exit 2) and writes nothing."""
    command = [sys.executable, os.path.join(ROOT, "experiments", "main.py"),
               "--config.model=tests.contract_models:MaxPoolBetween",
               "--config.num_train_steps=1", "--config.T=2", "--config.batch_size=16",
               "--config.progress_bar=false", "--config.plots=false"]
    warned = subprocess.run(command + ["--workdir", str(tmp_path / "warned")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=600, check=False)
    out = warned.stdout
    assert warned.returncode == 0, out[-3000:]
    assert out.index("  error: reduce_window_max (between LIF 'lif1' and LIF 'lif2', "
                     "tests/contract_models.py:") < out.index("epoch 1/1 step 1")
    stopped = subprocess.run(command + ["--config.contract_errors_fatal=true", "--workdir",
                                        str(tmp_path / "stopped")], cwd=ROOT,
                             capture_output=True, text=True, timeout=600, check=False)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model='tests.contract_models:MaxPoolBetween': breaks "
                           "rate-BP's layer contract (2 errors, listed above)"), last
    assert "Traceback" not in stopped.stderr and not (tmp_path / "stopped").exists()


def test_abstract_model_is_traced_only():
    model = nnx.eval_shape(lambda: models.resolve("vgg_tiny")(
        num_classes=3, in_channels=1, image_size=IMAGE_SIZE, neuron=neurons.NeuronConfig(),
        rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="numeric=True: the model has no values"):
        contract.check_model(model, image_shape=SHAPE)
