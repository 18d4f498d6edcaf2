"""Every flag of every experiment script: a bad value ends with one line, ``error: ...``
naming the flag, exit status 2 and no traceback, before anything is computed or written.

The argparse scripts run in-process (``cli.run(module.main, argv)``). absl's FLAGS
are global, so import_reference's cases run in one subprocess that loops over them,
resetting the flags between cases, and reports each case's exit status, stderr and the
files it created.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ratebp_jax import cli, parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
VECTORS = os.path.join(ROOT, "tests", "data", "reference_vectors")
sys.path[:0] = [EXPERIMENTS, os.path.join(EXPERIMENTS, "backend")]  # the scripts tested
import accuracy_benchmark  # noqa: E402
import against_torch  # noqa: E402
import benchmark  # noqa: E402
import check_reference  # noqa: E402
import compare_gradients  # noqa: E402
import conv_throughput  # noqa: E402
import device_report  # noqa: E402
import loop_overhead  # noqa: E402
import pipeline_throughput  # noqa: E402
import pool_ties  # noqa: E402
import run_notebooks  # noqa: E402
import xla_options  # noqa: E402

SCRIPTS = {m.__name__: m for m in (accuracy_benchmark, against_torch, benchmark, check_reference,
                                   compare_gradients, conv_throughput, device_report,
                                   loop_overhead, pipeline_throughput, pool_ties,
                                   run_notebooks, xla_options)}

# A valid import_reference command line (see `inputs`); each case appends one bad flag.
IMPORT = ["--state-dict", "{tmp}/in/good.npz", "--workdir", "{tmp}/out/run", "--model",
          "vgg_tiny", "--image-size", "16"]


def imp(*args):
    return [*IMPORT, *args]


# (script, arguments, what the error line must contain: one fragment or a tuple of them).
# {tmp} is the folder `inputs` fills.
CASES = [
    ("compare_gradients", ["--model", "resnet18x"], ("--model='resnet18x'",
                                                     "did you mean 'resnet18'")),
    ("compare_gradients", ["--batch", "0"], "--batch=0: must be an integer >= 1"),
    ("compare_gradients", ["--batch", "eight"], "--batch"),
    ("compare_gradients", ["--image-size", "0"], "--image-size=0"),
    ("compare_gradients", ["--num-classes", "-1"], "--num-classes=-1"),
    ("compare_gradients", ["--in-channels", "0"], "--in-channels=0"),
    ("compare_gradients", ["--T", "2", "0"], "--T=0"),
    ("compare_gradients", ["--methods", "sgd"], "--methods='sgd'"),
    ("compare_gradients", ["--step-modes", "both"], "--step-modes='both'"),
    ("compare_gradients", ["--reset", "soft-ish"], "--reset='soft-ish'"),
    ("compare_gradients", ["--rate-grad-scale", "half"], "--rate-grad-scale='half'"),
    ("compare_gradients", ["--dtype", "float16"], "--dtype='float16': allowed values are"),
    ("compare_gradients", ["--input-scale", "nan"], "--input-scale=nan"),
    ("compare_gradients", ["--input-scale", "0"], "--input-scale=0.0: must be a finite number > 0"),
    ("compare_gradients", ["--input-scale", "inf"], "--input-scale=inf"),
    ("compare_gradients", ["--seed", "-1"], "--seed=-1"),
    ("compare_gradients", ["--seed", str(2**64)], f"--seed={2**64}"),
    ("compare_gradients", ["--json", "{tmp}"], ("--json=", "is a directory")),
    ("compare_gradients", ["--json", "{tmp}/missing/g.json"], ("--json=", "does not exist")),
    ("compare_gradients", ["--bogus"], "--bogus"),
    ("compare_gradients", ["--precision", "tf32"], ("--precision='tf32'", "highest")),
    ("benchmark", ["--model", "alexnet"], "--model='alexnet'"),
    ("benchmark", ["--batch", "0"], "--batch=0"),
    ("benchmark", ["--image-size", "-8"], "--image-size=-8"),
    ("benchmark", ["--num-classes", "0"], "--num-classes=0"),
    ("benchmark", ["--T", "0"], "--T=0"),
    ("benchmark", ["--methods", "adam"], "--methods='adam'"),
    ("benchmark", ["--step-modes", "scan"], "--step-modes='scan'"),
    ("benchmark", ["--dtype", "bf16"], ("--dtype='bf16'", "did you mean 'bfloat16'")),
    ("benchmark", ["--repeats", "-1"], "--repeats=-1: must be an integer >= 0"),
    ("benchmark", ["--pool-ties", "mean"], "--pool-ties='mean': allowed values are"),
    ("benchmark", ["--breakdown", "--methods", "bptt"], "--breakdown"),
    ("benchmark", ["--breakdown=yes"], "--breakdown"),
    ("benchmark", ["--json", "{tmp}"], "--json="),
    ("benchmark", ["--plot", "{tmp}/missing/b.png"], "--plot="),
    ("benchmark", ["--plot", "{tmp}/b.xyz"], ("--plot=", "unknown image format")),
    ("pool_ties", ["--model", "resnet18_tiny"], ("--model='resnet18_tiny'", "sew_resnet_tiny")),
    ("pool_ties", ["--rules", "split", "mean"], "--rules='mean': allowed values are"),
    ("pool_ties", ["--T", "0"], "--T=0: must be an integer >= 1"),
    ("pool_ties", ["--epochs", "0"], "--epochs=0"),
    ("pool_ties", ["--batches", "0"], "--batches=0"),
    ("pool_ties", ["--seeds", "0", "-1"], "--seeds=-1: must be an integer >= 0"),
    ("pool_ties", ["--root", "{tmp}/in/good.npz"], ("--root=", "is a file")),
    ("pool_ties", ["--json", "{tmp}/missing/p.json"], ("--json=", "does not exist")),
    ("accuracy_benchmark", ["--methods", "sgd"], "--methods='sgd'"),
    ("accuracy_benchmark", ["--step-modes", "both"], "--step-modes='both'"),
    ("accuracy_benchmark", ["--dtypes", "float32", "half"], "--dtypes='half'"),
    ("accuracy_benchmark", ["--leaks", "fixed", "plif"], "--leaks='plif'"),
    ("accuracy_benchmark", ["--seeds", "0", "-1"], "--seeds=-1"),
    ("accuracy_benchmark", ["--seeds", str(2**32)], f"--seeds={2**32}"),
    ("accuracy_benchmark", ["--num-epochs", "0"], "--num-epochs=0"),
    ("accuracy_benchmark", ["--num-train-steps", "-1"], "--num-train-steps=-1"),
    ("accuracy_benchmark", ["--T", "0"], "--T=0"),
    ("accuracy_benchmark", ["--T", "1.5"], "--T"),
    ("accuracy_benchmark", ["--json", "{tmp}/missing/a.json"], "--json="),
    ("check_reference", [], "FILE_OR_DIR"),
    ("check_reference", ["{tmp}/missing"], ("FILE_OR_DIR=", "no such file")),
    ("check_reference", ["{tmp}/out"], ("FILE_OR_DIR=", "no vector files")),
    ("check_reference", ["{tmp}/in/broken_seed0.json"], ("FILE_OR_DIR=", "not a reference")),
    ("check_reference", ["{tmp}/in/noarch_seed0.json"], ("FILE_OR_DIR=", "no \"arch\"")),
    ("check_reference", ["{tmp}/in/alexnet_seed0.json"], ("FILE_OR_DIR=", "keys_alexnet.txt")),
    ("check_reference", [VECTORS, "--json", "{tmp}"], "--json="),
    ("check_reference", [VECTORS, "--float64=yes"], "--float64"),
    ("pipeline_throughput", ["--batch", "0"], "--batch=0"),
    ("pipeline_throughput", ["--images", "10", "--batch", "20"], "--images=10: must be an "
                                                                 "integer >= --batch (20)"),
    ("pipeline_throughput", ["--images", "many"], "--images"),
    ("pipeline_throughput", ["--workers", "0", "-1"], "--workers=-1: must be an integer >= 0"),
    ("pipeline_throughput", ["--workers", "two"], "--workers"),
    ("pipeline_throughput", ["--workers"], "--workers"),
    ("pipeline_throughput", ["--json", "{tmp}"], ("--json=", "is a directory")),
    ("pipeline_throughput", ["--json", "{tmp}/missing/p.json"], ("--json=", "does not exist")),
    ("conv_throughput", ["--model", "resnet81"], ("--model='resnet81'", "did you mean")),
    ("conv_throughput", ["--batch", "0"], "--batch=0: must be an integer >= 1"),
    ("conv_throughput", ["--T", "0"], "--T=0: must be an integer >= 1"),
    ("conv_throughput", ["--T", "eight"], "--T"),
    ("conv_throughput", ["--image-size", "-8"], "--image-size=-8"),
    ("conv_throughput", ["--repeats", "0"], "--repeats=0: must be an integer >= 1"),
    ("conv_throughput", ["--peak-size", "8"], "--peak-size=8: must be an integer >= 16"),
    ("conv_throughput", ["--step-modes", "both"], "--step-modes='both'"),
    ("conv_throughput", ["--layouts", "NHCW"], ("--layouts='NHCW'", "did you mean 'NHWC'")),
    ("conv_throughput", ["--json", "{tmp}"], ("--json=", "is a directory")),
    ("conv_throughput", ["--json", "{tmp}/missing/c.json"], ("--json=", "does not exist")),
    ("xla_options", ["--configs", "fastmath"], ("--configs='fastmath'", "did you mean")),
    ("xla_options", ["--rounds", "0"], "--rounds=0: must be an integer >= 1"),
    ("xla_options", ["--model", "resnet81"], "--model='resnet81'"),
    ("xla_options", ["--step-mode", "both"], "--step-mode='both'"),
    ("xla_options", ["--T", "0"], "--T=0"),
    ("xla_options", ["--repeats", "two"], "--repeats"),
    ("xla_options", ["--json", "{tmp}/missing/x.json"], ("--json=", "does not exist")),
    ("against_torch", ["--batch", "0"], "--batch=0: must be an integer >= 1"),
    ("against_torch", ["--T", "x"], "--T: invalid int value"),
    ("against_torch", ["--torch-python", "{tmp}/no/python"], ("--torch-python=",
                                                              "no such executable")),
    ("against_torch", ["--json", "{tmp}"], ("--json=", "is a directory")),
    ("loop_overhead", ["--model", "vgg_tnyi"], ("--model='vgg_tnyi'", "did you mean")),
    ("loop_overhead", ["--epochs", "1"], "--epochs=1: must be an integer >= 2"),
    ("loop_overhead", ["--examples", "10"], "--examples=10: must be an integer >= 64"),
    ("loop_overhead", ["--rounds", "0"], "--rounds=0: must be an integer >= 1"),
    ("loop_overhead", ["--json", "{tmp}"], ("--json=", "is a directory")),
    ("device_report", [], "BENCH_JSON"),
    ("device_report", ["a.json", "--batch", "0"], "--batch=0: must be an integer >= 1"),
    ("device_report", ["a.json"], "--batch"),
    ("device_report", ["a.txt", "--batch", "4"], "BENCH_JSON='a.txt'"),
    ("device_report", ["a.json", "--batch", "4", "--json", "{tmp}/missing/d.json"],
     ("--json=", "does not exist")),
    ("run_notebooks", ["{tmp}/in/afile"], ("NOTEBOOK=", "not a notebook (*.ipynb)")),
    ("run_notebooks", ["{tmp}/in/good.ipynb", "{tmp}/in/missing.ipynb"], ("NOTEBOOK=",
                                                                         "no such file")),
    ("run_notebooks", ["{tmp}/in/broken.ipynb"], ("NOTEBOOK=", "not a readable notebook")),
    ("run_notebooks", ["{tmp}/in/dir.ipynb"], ("NOTEBOOK=", "is a directory")),
    ("run_notebooks", ["--timeout", "0"], "--timeout=0: must be an integer >= 1"),
    ("run_notebooks", ["--timeout", "soon"], "--timeout"),
    ("import_reference", [], "--state-dict, --workdir: required"),
    ("import_reference", ["--state-dict", "{tmp}/in/good.npz"], "--workdir: required"),
    ("import_reference", imp("--model=vgg_tiyn"), ("--model='vgg_tiyn'",
                                                   "did you mean 'vgg_tiny'")),
    ("import_reference", imp("--num-classes=0"), "--num-classes=0: must be an integer >= 1"),
    ("import_reference", imp("--num-classes=ten"), "--num-classes=ten"),
    ("import_reference", imp("--in-channels=0"), "--in-channels=0"),
    ("import_reference", imp("--image-size=-8"), "--image-size=-8"),
    ("import_reference", imp("--state-dict={tmp}/in/missing.npz"), ("--state-dict=",
                                                                    "no such file")),
    ("import_reference", imp("--state-dict={tmp}/in/truncated.npz"), ("--state-dict=",
                                                                      "not a .npz archive")),
    ("import_reference", imp("--state-dict={tmp}/in/text.npz"), ("--state-dict=",
                                                                 "not a .npz archive")),
    ("import_reference", imp("--state-dict={tmp}/in/empty.npz"), ("--state-dict=",
                                                                  "holds no tensors")),
    ("import_reference", imp("--state-dict={tmp}/in/garbage.pth"), "--state-dict="),
    ("import_reference", imp("--state-dict={tmp}/in/afile"), ("--state-dict=",
                                                              "unknown format")),
    ("import_reference", imp("--workdir={tmp}/in/afile"), ("workdir=", "is a file")),
    ("import_reference", imp("--workdir={tmp}/in/afile/run"), ("workdir=", "lies in a file")),
    ("import_reference", imp("--workdir={tmp}/in/used"), ("--workdir=",
                                                          "already holds checkpoints")),
    ("import_reference", imp("--config={tmp}/in/missing.py"), ("--config=", "no such file")),
    ("import_reference", imp("--config={tmp}/in/broken.py"), ("--config=", "cannot load it")),
    ("import_reference", imp(f"--config={EXPERIMENTS}/configs/default.py:x"), "--config="),
    ("import_reference", imp("--config.nope=1"), "config.nope: no such field"),
    ("import_reference", imp("--config.modle=vgg_tiny"), ("config.modle: no such field",
                                                          "did you mean 'model'")),
    ("import_reference", imp("--config.T=four"), "--config.T=four"),
    ("import_reference", imp("--config.T=0"), "config.T=0: must be an integer >= 1"),
    ("import_reference", imp("--config.lam=nan"), "config.lam=nan"),
    ("import_reference", imp("--config.T=2", f"--config={EXPERIMENTS}/configs/default.py"),
     "--config"),
    ("import_reference", IMPORT[:4] + ["--config.model=alexnet"], "config.model='alexnet'"),
    ("import_reference", imp("--bogus=1"), "'bogus'"),
]


def case_id(script, args):
    extra = args[len(IMPORT):] if args[:len(IMPORT)] == IMPORT else args
    return f"{script} {' '.join(extra)}".replace("{tmp}/", "").replace(ROOT + "/", "")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """{tmp}: in/ holds the input files, good and bad, out/ is empty (the workdir's parent)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "out").mkdir()
    d = tmp / "in"
    (d / "used" / "checkpoints" / "0").mkdir(parents=True)
    # vgg_tiny's state_dict at 16x16 (names and shapes only: no model needs building)
    keys = parity.read_keys(os.path.join(VECTORS, "keys_vgg_tiny.txt"))
    np.savez(d / "good.npz", **{name: np.zeros(shape, dtype) for name, shape, dtype, _ in keys})
    good = (d / "good.npz").read_bytes()
    (d / "truncated.npz").write_bytes(good[:len(good) // 2])
    (d / "text.npz").write_text("not an archive\n")
    np.savez(d / "empty.npz")
    (d / "garbage.pth").write_bytes(b"\x00not a torch file")
    (d / "afile").write_text("")
    (d / "broken.py").write_text("def get_config(:\n")
    (d / "broken_seed0.json").write_text("{")
    (d / "noarch_seed0.json").write_text("{}")
    (d / "alexnet_seed0.json").write_text('{"arch": "alexnet"}')
    (d / "good.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, '
                                  '"nbformat_minor": 5}')
    (d / "broken.ipynb").write_text("{")
    (d / "dir.ipynb").mkdir()
    return str(tmp)


RUNNER = textwrap.dedent("""
    import json, os, sys, tempfile
    experiments, cases_file, results_file, root = sys.argv[1:5]
    sys.path.insert(0, experiments)
    from absl import flags
    import import_reference

    def tree():
        return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}

    results = []
    for argv in json.load(open(cases_file)):
        argv = ["import_reference.py", *argv]
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # each parse of --config defines its overrides' flags
        flags.FLAGS.unparse_flags()
        sys.argv = argv  # ml_collections finds the --config.FIELD overrides in sys.argv
        before = tree()
        with tempfile.TemporaryFile("w+") as err:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(err.fileno(), 2)  # all of stderr, also what C++ code writes
            try:
                import_reference.run(argv)
                code = 0
            except SystemExit as e:
                code = e.code
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            err.seek(0)
            results.append({"code": code, "stderr": err.read(),
                            "created": sorted(tree() - before)})
    json.dump(results, open(results_file, "w"))
""")


@pytest.fixture(scope="module")
def import_reference_results(inputs):
    """``{case_id: {"code", "stderr", "created"}}`` for every import_reference case."""
    cases = [args for script, args, _ in CASES if script == "import_reference"]
    cases_file = os.path.join(inputs, "import_cases.json")
    results_file = os.path.join(inputs, "import_results.json")
    with open(cases_file, "w") as f:
        json.dump([[a.replace("{tmp}", inputs) for a in args] for args in cases], f)
    proc = subprocess.run([sys.executable, "-c", RUNNER, EXPERIMENTS, cases_file,
                           results_file, inputs],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(results_file) as f:
        results = json.load(f)
    return {case_id("import_reference", args): r for args, r in zip(cases, results)}


@pytest.mark.parametrize("script,args,fragments", CASES,
                         ids=[case_id(s, a) for s, a, _ in CASES])
def test_bad_flag_is_one_line_and_exit_2(script, args, fragments, inputs, request, capsys):
    if script == "import_reference":
        result = request.getfixturevalue("import_reference_results")[case_id(script, args)]
        code, err = result["code"], result["stderr"]
        assert result["created"] == [], "a refused run left files behind"
    else:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(SCRIPTS[script].main, [a.replace("{tmp}", inputs) for a in args])
        code, err = exit_info.value.code, capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in (fragments,) if isinstance(fragments, str) else fragments:
        assert fragment in lines[0]
