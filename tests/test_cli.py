"""Command-line entry points: output format and one-line errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import UNOPTIMISED, xla_flags_plus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unoptimised_env():
    """This environment with LLVM at level 0, for a script that compiles many tiny programs
    and runs each a few times, and whose test reads compiled memory and the report's
    fields, not speed: the level changes how fast the code runs and its rounding
    (conftest.UNOPTIMISED), not buffer assignment (device_benchmark.sh --smoke: 58.7 ->
    28.5 s; benchmark.py below: 33.0 -> 16.8 s). Not for the training scripts, whose
    steps it slows more."""
    return dict(os.environ, XLA_FLAGS=xla_flags_plus(UNOPTIMISED))


def run_cli(script, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


@pytest.mark.slow
def test_compare_gradients_json_has_the_documented_fields(tmp_path):
    out = tmp_path / "g.json"
    proc = run_cli("compare_gradients.py", "--model", "vgg_tiny", "--image-size", "8",
                   "--batch", "4", "--T", "1", "3", "--step-modes", "multi",
                   "--json", str(out), env=unoptimised_env())
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [(r["method"], r["step_mode"], r["T"]) for r in results] == [
        ("rate", "multi", 1), ("rate", "multi", 3)]
    for r in results:
        assert {"method", "step_mode", "T", "reset", "cosine", "norm_ratio", "norm",
                "norm_ref", "max_rel_err", "max_zero_err", "per_param", "per_layer",
                "hidden"} <= r.keys()
        assert {"name", "cosine", "norm_ratio", "norm", "norm_ref", "rel_err",
                "structurally_zero"} <= r["per_param"][0].keys()
        assert r["max_rel_err"] == max(p["rel_err"] for p in r["per_param"]
                                       if not p["structurally_zero"])
        # vgg_tiny's conv biases feed BatchNorms: their true gradient is zero.
        assert {p["name"] for p in r["per_param"] if p["structurally_zero"]} == {
            "features.0.conv.bias", "features.2.conv.bias"}
    assert results[0]["max_rel_err"] < 1e-5 and results[0]["cosine"] > 1 - 1e-6
    assert results[0]["max_zero_err"] < 1e-6
    assert json.loads(out.read_text())["args"]["model"] == "vgg_tiny"
    assert json.loads(out.read_text())["args"]["precision"] == "highest"
    assert "cosine" in proc.stdout and "structurally zero" in proc.stdout


def test_compare_gradients_computes_at_the_precision_asked(monkeypatch):
    """The whole comparison runs under --precision (default highest), which JAX reads when
    it traces each convolution and dot."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    import compare_gradients
    seen = []
    monkeypatch.setattr(compare_gradients, "compare",
                        lambda args: seen.append(jax.config.jax_default_matmul_precision) or [])
    monkeypatch.setattr(compare_gradients, "print_table", lambda results: None)
    compare_gradients.main(["--precision", "high"])
    compare_gradients.main([])
    assert seen == ["high", "highest"]
    assert jax.config.jax_default_matmul_precision is None  # restored afterwards


@pytest.mark.slow  # a process each; test_cli_errors.py runs every flag's error in-process
@pytest.mark.parametrize("args,message", [
    (["--model", "alexnet"], "model='alexnet'"),
    (["--T", "0"], "--T=0"),
    (["--methods", "sgd"], "--methods='sgd'"),
    (["--step-modes", "both"], "--step-modes='both'"),
    (["--reset", "soft-ish"], "reset='soft-ish'"),
])
def test_compare_gradients_bad_input_is_one_line_without_traceback(args, message):
    proc = run_cli("compare_gradients.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_benchmark_reports_ratios_and_flat_single_mode_rate_memory(tmp_path):
    out = tmp_path / "b.json"
    proc = run_cli("benchmark.py", "--model", "resnet18_tiny", "--image-size", "8",
                   "--batch", "4", "--T", "2", "8", "--step-modes", "single",
                   "--repeats", "1", "--breakdown", "--json", str(out),
                   "--plot", str(tmp_path / "b.png"), env=unoptimised_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["method"], r["T"]): r for r in json.loads(out.read_text())["results"]}
    for key in ("temp_bytes", "argument_bytes", "compile_s", "step_s", "infer_s",
                "time_vs_bptt", "temp_vs_bptt", "step_over_infer", "temp_vs_first_T"):
        assert key in rows["rate", 8]
    assert rows["bptt", 8]["time_vs_bptt"] == 1.0
    assert rows["rate", 8]["spike_pass_s"] > 0 and rows["rate", 8]["rate_pass_s"] > 0
    assert "spike_pass_s" not in rows["bptt", 8]
    assert rows["rate", 8]["temp_bytes"] <= 1.15 * rows["rate", 2]["temp_bytes"]
    assert rows["rate", 8]["temp_vs_bptt"] < 1.0
    assert (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.slow
def test_conv_throughput_quick_reports_every_shape_and_op_against_peak(tmp_path):
    out = tmp_path / "c.json"
    proc = run_cli("backend/conv_throughput.py", "--quick", "--step-modes", "multi",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "resnet18_tiny" and result["peak_gflops_per_s"] > 0
    # resnet18_tiny: stem, 4->4 (twice), 4->8 stride 2, 8->8 and the 1x1 shortcut
    assert [(s["cin"], s["cout"], s["kernel"], s["stride"], s["uses"])
            for s in result["shapes"]] == [(3, 4, 3, 1, 1), (4, 4, 3, 1, 2), (4, 8, 3, 2, 1),
                                           (8, 8, 3, 1, 1), (4, 8, 1, 2, 1)]
    rows = result["results"]
    assert len(rows) == 3 * len(result["shapes"])
    assert {r["op"] for r in rows} == {"forward", "input_grad", "kernel_grad"}
    for r in rows + result["network"]:
        assert r["batch"] == 4 and r["gflops_per_s"] > 0 and r["seconds"] > 0
        assert r["fraction_of_peak"] == r["gflops_per_s"] / result["peak_gflops_per_s"]
    # the stem at 8x8: 2 * 4 images * 64 positions * 9 * 3 * 4 FLOPs
    assert rows[0]["gflop"] * 1e9 == 2 * 4 * 64 * 9 * 3 * 4
    assert "whole network" in proc.stdout


@pytest.mark.slow
def test_accuracy_benchmark_runs_every_method_and_mode(tmp_path):
    out = tmp_path / "a.json"
    proc = run_cli("accuracy_benchmark.py", "--seeds", "0", "--num-train-steps", "3",
                   "--T", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert [(s["method"], s["step_mode"]) for s in summary] == [
        ("bptt", "multi"), ("bptt", "single"), ("rate", "multi"), ("rate", "single")]
    assert all(0.0 <= s["mean_accuracy"] <= 1.0 for s in summary)


@pytest.mark.slow
def test_device_benchmark_smoke_writes_every_program_in_both_modes_and_dtypes(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "experiments", "device_benchmark.sh"),
                           "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900,
                          env=dict(unoptimised_env(), PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "device_benchmark.json").read_text())
    rows = {(r["step_mode"], r["dtype"], r["program"]): r for r in result["results"]}
    assert set(rows) == {(mode, dtype, program) for mode in ("multi", "single")
                         for dtype in ("float32", "bfloat16")
                         for program in ("infer", "rate", "bptt", "bptt_remat")}
    assert all(r["images_per_s"] > 0 and r["temp_bytes"] > 0 for r in rows.values())
    assert "images/s" in proc.stdout and result["batch"] == 4


@pytest.mark.slow
def test_loop_overhead_reports_every_epoch_and_both_ratios(monkeypatch, tmp_path):
    """A tiny run of experiments/backend/loop_overhead.py: every timed epoch of both loops
    is recorded, and the two summary ratios are computed from them."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments", "backend"))
    import loop_overhead
    out = tmp_path / "loop.json"
    loop_overhead.main(["--examples", "128", "--epochs", "3", "--rounds", "2",
                        "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 2 and result["epochs_timed"] == 2
    for r in result["rounds"]:
        loop, bare = r["loop_epochs_steps_per_s"], r["bare_epochs_steps_per_s"]
        assert len(loop) == len(bare) == 2 and min(loop + bare) > 0
        assert r["loop_over_bare"] == pytest.approx(np.median(loop) / np.median(bare))
    assert result["loop_over_bare"] == pytest.approx(
        np.median([r["loop_over_bare"] for r in result["rounds"]]))
    best_loop = max(s for r in result["rounds"] for s in r["loop_epochs_steps_per_s"])
    best_bare = max(s for r in result["rounds"] for s in r["bare_epochs_steps_per_s"])
    assert result["best_loop_over_best_bare"] == pytest.approx(best_loop / best_bare)


FINALISER_CTRL_C = """
import signal, sys, time
from ratebp_jax import cli
if sys.argv[1] == "keep":
    cli.keep_ctrl_c()

class Finalised:
    def __del__(self):  # a Ctrl-C arrives while a finaliser runs
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):
            pass

try:
    Finalised()
    time.sleep(2)
    print("the Ctrl-C was lost")
except KeyboardInterrupt:
    print("the Ctrl-C stopped the run")
"""


@pytest.mark.parametrize("mode", ["default", "keep"])
def test_a_ctrl_c_raised_in_a_finaliser_is_not_lost(mode):
    """Python drops a KeyboardInterrupt raised inside a finaliser (as in JAX's
    garbage-collection callback) with a traceback; cli.keep_ctrl_c raises it again."""
    proc = subprocess.run([sys.executable, "-c", FINALISER_CTRL_C, mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    if mode == "default":  # the failure the hook exists for, shown to still happen
        assert "lost" in proc.stdout and "Exception ignored" in proc.stderr, proc
    else:
        assert proc.stdout.strip() == "the Ctrl-C stopped the run", proc
        assert proc.stderr == "", proc.stderr
