"""Gradient agreement with BPTT: per-parameter floors, layer grouping, logging during training
(without touching the run, exact at T=1, resumable) and compare_gradients on a trained run."""
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ratebp_jax import agreement, analysis, methods, models, train

from conftest import grads_of, jit_unoptimised
from test_train import ROOT, _final_params, tiny_config

METHODS = ("rate", "sltt", "ottt")


# --------------------------------------------------------------------------- the figures
def test_rel_err_is_floored_and_structurally_zero_parameters_are_marked():
    """A parameter whose reference gradient is rounding noise (a conv bias feeding a
    BatchNorm) is compared against 1e-3 of the whole gradient's norm, not against its own
    noise; a real parameter's error still counts in full."""
    ref = {"kernel": jnp.ones(100), "bias": jnp.full(4, 1e-9)}
    noisy = {"kernel": jnp.ones(100), "bias": jnp.full(4, -1e-9)}
    result = analysis.compare_gradients(noisy, ref)
    by_name = {p["name"]: p for p in result["per_param"]}
    assert by_name["bias"]["structurally_zero"] and not by_name["kernel"]["structurally_zero"]
    assert by_name["bias"]["rel_err"] == pytest.approx(4e-9 / 1e-2)  # without the floor: 2.0
    assert result["max_rel_err"] == 0.0  # the kernel's; the bias is structurally zero
    assert result["max_zero_err"] == pytest.approx(4e-9 / 10)
    wrong = {"kernel": jnp.ones(100) * 1.5, "bias": jnp.full(4, 1e-9)}
    assert analysis.compare_gradients(wrong, ref)["max_rel_err"] == pytest.approx(0.5)
    broken_zero = {"kernel": jnp.ones(100), "bias": jnp.full(4, 0.5)}
    assert analysis.compare_gradients(broken_zero, ref)["max_zero_err"] == pytest.approx(0.1)
    assert result["norm_ref"] == pytest.approx(10.0)


@pytest.mark.parametrize("name,expected", [
    ("vgg_tiny", ["features.0", "features.2", "classifier.0"]),
    # The downsample's spikes are computed before the block's first unit (SEW's identity).
    ("sew_resnet_tiny", ["stem.conv_bn", "stages.0.0.unit1.conv_bn", "stages.0.0.unit2.conv_bn",
                         "stages.1.0.downsample.conv_bn", "stages.1.0.unit1.conv_bn",
                         "stages.1.0.unit2.conv_bn", "fc"]),
    ("resnet19_tiny", ["stem", "stages.0.0.conv1", "stages.0.0.conv2", "stages.1.0.conv1",
                       "stages.1.0.conv2", "stages.1.0.shortcut", "hidden", "fc"]),
])
def test_layers_group_each_conv_with_its_batchnorm_in_network_order(name, expected):
    net, params, stats = methods.split_model(models.create_model(name, image_size=8))
    groups = analysis.layer_groups(net, params, stats, (8, 8, 3))
    assert [layer for layer, _ in groups] == expected
    names = sorted(n for _, ns in groups for n in ns)
    assert names == sorted(n for n, _ in analysis.named_leaves(params))  # each exactly once
    first = dict(groups)[expected[0]]
    assert {n.rsplit(".", 2)[-2] for n in first} <= {"conv", "bn", "conv_bn"}


def test_hidden_summary_leaves_out_the_readout():
    layers = [{"name": "a", "cosine": 0.8, "norm_ratio": 0.5},
              {"name": "b", "cosine": 0.9, "norm_ratio": 0.7},
              {"name": "fc", "cosine": 1.0, "norm_ratio": 1.0}]
    h = analysis.hidden_summary(layers)
    assert h == {"layers": 2, "readout": "fc", "median_cosine": pytest.approx(0.85),
                 "min_cosine": 0.8, "median_norm_ratio": pytest.approx(0.6),
                 "min_norm_ratio": 0.5}


def test_undefined_figures_are_nan_in_tables_and_null_in_records():
    """One function gives both the host tables' figures and the logged records': two zero
    gradients agree, a zero one against a non-zero one has no cosine (NaN in a table, null
    in a JSON record)."""
    assert analysis.cosine_and_norm_ratio(0.0, 0.0, 0.0) == (1.0, 1.0)
    cosine, ratio = analysis.cosine_and_norm_ratio(0.0, 0.0, 3.0)
    assert math.isnan(cosine) and ratio == 0.0
    table = analysis.compare_gradients({"w": jnp.ones(3)}, {"w": jnp.zeros(3)})
    assert math.isnan(table["cosine"]) and math.isnan(table["norm_ratio"])
    record, = agreement.records_from_sums({"rate": np.array([[0.0], [3.0], [0.0]])},
                                          [("w", ["w"])], ["w"], step=0, T=2, step_mode="multi")
    assert record["cosine"] is None and record["layers"]["w"] == {"cosine": None,
                                                                   "norm_ratio": None}
    json.dumps(record, allow_nan=False)  # valid JSON


def test_device_sums_give_the_same_figures_as_the_host_comparison():
    net, params, stats = methods.split_model(models.create_model("vgg_tiny", image_size=8))
    batch = analysis.random_batch(jax.random.key(1), 4, 8, 3, 10)
    fn = jit_unoptimised(agreement.make_agreement_fn(net, ("rate",), T=4, step_mode="multi"))
    layers = analysis.layer_groups(net, params, stats, (8, 8, 3))
    record, = agreement.records_from_sums(
        jax.device_get(fn(params, stats, batch)), layers,
        [n for n, _ in analysis.named_leaves(params)], step=0, T=4, step_mode="multi")
    g_rate = grads_of("rate", net, params, stats, batch, T=4)[1]
    g_bptt = grads_of("bptt", net, params, stats, batch, T=4)[1]
    host = analysis.compare_gradients(g_rate, g_bptt, layers)
    assert record["cosine"] == pytest.approx(host["cosine"], abs=1e-6)
    assert record["cosine"] < 0.9999  # T=4: not exact, so the comparison means something
    for layer in host["per_layer"]:
        assert record["layers"][layer["name"]]["cosine"] == pytest.approx(layer["cosine"],
                                                                          abs=1e-5)
        assert record["layers"][layer["name"]]["norm_ratio"] == pytest.approx(
            layer["norm_ratio"], rel=1e-5)
    assert list(record["layers"]) == [layer["name"] for layer in host["per_layer"]]


# --------------------------------------------------------------------------- in training
def _agreement_records(workdir):
    with open(os.path.join(workdir, agreement.FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run without logging, and the same run with logging, interrupted at step 3 and
    resumed to 6 after a record from beyond the checkpoint was planted (a run killed after
    logging, before saving)."""
    root = tmp_path_factory.mktemp("agreement")
    quiet = lambda *_: None  # noqa: E731
    plain, logged = str(root / "plain"), str(root / "logged")
    train.train_and_evaluate(tiny_config(), plain, log=quiet)
    config = tiny_config(grad_agreement_every_steps=2, grad_agreement_methods=METHODS,
                         plots=True)
    train.train_and_evaluate(config, logged, log=quiet, interrupt_at_step=3)
    with open(os.path.join(logged, agreement.FILE), "a") as f:
        f.write(json.dumps({"step": 4, "method": "rate", "cosine": 0.0}) + "\n")
    train.train_and_evaluate(config, logged, log=quiet)
    return plain, logged


@pytest.mark.slow
def test_logging_agreement_leaves_the_run_bit_identical(runs):
    plain, logged = runs
    (params_plain, _), (params_logged, _) = _final_params(plain), _final_params(logged)
    chex.assert_trees_all_equal(params_logged, params_plain)
    _, _, state_plain = train.load_trained(tiny_config(), plain)
    _, _, state_logged = train.load_trained(
        tiny_config(grad_agreement_every_steps=2, grad_agreement_methods=METHODS), logged)
    chex.assert_trees_all_equal(state_logged["batch_stats"], state_plain["batch_stats"])
    record_plain, record_logged = (json.loads(open(os.path.join(d, "metrics.jsonl")).read())
                                   for d in (plain, logged))
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "firing_rates"):
        assert record_logged[key] == record_plain[key], key


@pytest.mark.slow
def test_resumed_logging_neither_duplicates_nor_loses_records(runs):
    _, logged = runs
    records = _agreement_records(logged)
    assert [(r["step"], r["method"]) for r in records] == [
        (step, m) for step in (0, 2, 4) for m in METHODS]
    assert all(r["cosine"] > 0.5 for r in records)  # the planted record is gone
    first = records[0]
    assert {k: first[k] for k in ("reference", "T", "step_mode")} == {
        "reference": "bptt", "T": 2, "step_mode": "multi"}
    assert list(first["layers"]) == ["features.0", "features.2", "classifier.0"]
    assert set(first["layers"]["features.0"]) == {"cosine", "norm_ratio"}
    # The readout's rate-BP gradient is exact at any T; the hidden layers' are not.
    rate = [r for r in records if r["method"] == "rate"]
    assert all(abs(r["layers"]["classifier.0"]["cosine"] - 1) < 1e-5 for r in rate)
    assert min(r["layers"]["features.0"]["cosine"] for r in rate) < 0.9999
    assert os.path.getsize(os.path.join(logged, agreement.PLOT_FILE)) > 0


@pytest.mark.parametrize("step_mode", [pytest.param("multi", marks=pytest.mark.slow), "single"])
def test_logged_agreement_is_exact_at_T1(tmp_path, step_mode):
    config = tiny_config(T=1, step_mode=step_mode, num_train_steps=2,
                         grad_agreement_every_steps=1,
                         grad_agreement_methods=METHODS + ("bptt",))
    train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    records = _agreement_records(str(tmp_path))
    assert len(records) == 2 * 4
    for r in records:
        figures = [r] + list(r["layers"].values())
        for f in figures:
            assert abs(f["cosine"] - 1) <= 1e-6 and abs(f["norm_ratio"] - 1) <= 1e-6, r


# --------------------------------------------------------------------------- the CLI
def _compare(*args):
    return subprocess.run([sys.executable, "experiments/compare_gradients.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_compare_gradients_on_a_trained_run(runs, tmp_path):
    _, logged = runs
    out = tmp_path / "grads.json"
    proc = _compare("--workdir", logged, "--batches", "2", "--methods", "rate", "sltt",
                    "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["args"]["workdir"] == logged and report["args"]["batches"] == 2
    rate, sltt = report["results"]
    assert (rate["method"], rate["T"], rate["step_mode"], rate["batches"]) == (
        "rate", 2, "multi", 2)
    assert [layer["name"] for layer in rate["per_layer"]] == [
        "features.0", "features.2", "classifier.0"]
    assert rate["hidden"]["readout"] == "classifier.0" and rate["hidden"]["layers"] == 2
    assert rate["norm_ref"] > 0 and all("norm" in p for p in rate["per_param"])
    assert 0.5 < rate["cosine"] < 1 - 1e-6 and sltt["cosine"] != rate["cosine"]
    assert "hidden cos med/min" in proc.stdout
    bad = _compare("--workdir", logged, "--model", "vgg_tiny")
    assert bad.returncode == 2 and "--model: taken from the run's config" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_low_agreement_names_the_first_layer_below_the_threshold():
    records = [{"step": 40, "method": "rate", "reference": "bptt",
                "layers": {"features.0": {"cosine": None}, "features.2": {"cosine": 0.62},
                           "classifier.0": {"cosine": 0.41}}}]
    message = agreement.low_agreement(records, 0.8)
    assert message.startswith("warning: at step 40 the gradient of rate agrees with bptt's "
                              "only to cosine 0.620 in layer features.2 "
                              "(grad_agreement_warn_cosine=0.8)")
    assert agreement.low_agreement(records, 0.4) is None
    assert agreement.low_agreement(records, 0.0) is None  # off


@pytest.mark.slow
def test_a_run_says_once_when_a_logged_cosine_falls_below_the_threshold(tmp_path, capsys):
    """At T=2 the hidden layers' rate-BP gradient is an approximation (cosine below 1),
    so a threshold of 1 is crossed at the first logging step, and said only then."""
    config = tiny_config(num_train_steps=2, grad_agreement_every_steps=1,
                         grad_agreement_warn_cosine=1.0)
    train.train_and_evaluate(config, str(tmp_path), log=lambda *_: None)
    warnings = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: at step 0 the gradient of rate agrees with "
                                  "bptt's only to cosine 0.")
    assert "in layer features.0 (grad_agreement_warn_cosine=1.0)" in warnings[0]
