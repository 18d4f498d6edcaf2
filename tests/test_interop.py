"""Reference compatibility: state_dict import/export and step-for-step parity."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from jax import enable_x64

from ratebp_jax import interop, models, parity

from conftest import UNOPTIMISED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(os.path.dirname(__file__), "data", "reference_vectors")
VECTORS_F64 = os.path.join(os.path.dirname(__file__), "data", "reference_vectors_f64")
FILES = sorted(os.path.basename(f) for f in glob.glob(os.path.join(VECTORS, "*_seed*.json")))

# The fast tier runs the smallest step; the others, ResNet-18 and VGG-SNN at full size among
# them, are marked slow.
FAST_FILE = "vgg_tiny_multi_rate_T1_soft_seed0.json"


@pytest.mark.parametrize("name", [
    name if name == FAST_FILE else pytest.param(name, marks=pytest.mark.slow) for name in FILES])
def test_step_matches_the_reference_in_float32_and_float64(name):
    """One file of each set (``data/reference_vectors``, float32, and
    ``data/reference_vectors_f64``, the same step run by the reference in float64).

    * Float64 against float64, where no membrane sits on a rounding tie: the worst
      deviation is at most 1e-5 and the loss agrees to 1e-6.
    * Float32 against float32 matches (loss 1e-5, worst deviation 1e-3), except where a
      membrane sits on the threshold within float32 rounding. Which files have such a tie
      depends on the CPU's float32 arithmetic: on the machine these vectors were first
      checked on, one spike of 524,288 in ResNet-18's layer1.0 (multi step, T=4) flips
      and BatchNorm amplifies it; on an AMD EPYC three VGG-SNN steps flip a spike too. A
      tie is recognised by its cause: our float32 loss then differs from our float64 loss
      (rounding alone moved a spike), and our float64 step matches the float32 reference
      (loss to 1e-6).

    The two files describe the same step (checked), so our float64 step runs once for
    both, and one model (``parity.reference_model``) serves both dtypes; a file per test,
    so that the test workers share them. The float64 step is compiled at LLVM level 0:
    its convolutions are library matrix products (``convolution.conv_as_dots``), so the
    level changes only the speed of its elementwise code and its float64 rounding (no
    FMA; ``conftest.UNOPTIMISED``), far below the 1e-5 compared; ResNet-18's float64
    steps then compile in 6.6-9.4 s against 17.8-18.1 s and run 0.2-1.1 s longer. (Not
    the float32 step: its convolutions inside a time scan ran 47 times slower at level 0.)"""
    vec32, keys = parity.load_vector(os.path.join(VECTORS, name))
    vec64, _ = parity.load_vector(os.path.join(VECTORS_F64, name))
    assert parity.step_config(vec32) == parity.step_config(vec64)
    model = parity.reference_model(vec32, keys)  # the same weights, cast to each dtype
    with enable_x64():
        ours64 = parity.run_reference_step(vec64, keys, np.float64, UNOPTIMISED, model=model)
    exact = parity.compare(vec64, keys, ours64, np.float64)
    assert exact["pass"] and exact["worst_dev"] <= 1e-5, exact
    assert exact["loss_rel_err"] <= 1e-6, exact

    result = parity.compare(vec32, keys, parity.run_reference_step(vec32, keys, model=model))
    if result["pass"]:
        assert result["loss_rel_err"] <= 1e-5 and result["worst_dev"] <= 1e-3
        return
    exact_vs_float32 = parity.compare(vec32, keys, ours64, np.float64)
    assert exact_vs_float32["pass"] and exact_vs_float32["loss_rel_err"] <= 1e-6, (
        exact_vs_float32)
    own_rounding = abs(result["loss"] - exact["loss"]) / abs(exact["loss"])
    assert own_rounding > parity.LOSS_RTOL, (
        f"float32 misses the reference ({result}) although it agrees with our float64 step: "
        f"not a rounding tie")


@pytest.mark.slow
def test_check_reference_float64_cli_reports_every_file(tmp_path):
    """The script's ``--float64`` path end to end, on the smallest files."""
    out = tmp_path / "f64.json"
    files = sorted(glob.glob(os.path.join(VECTORS_F64, "vgg_tiny_*T1*_seed*.json")))
    proc = subprocess.run([sys.executable, "experiments/check_reference.py", *files,
                           "--float64", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(files) == 3
    assert all(r["worst_dev"] <= 1e-5 and r["loss_rel_err"] <= 1e-6 for r in results)


def test_vector_set_covers_the_issue_matrix():
    archs = {f.split("_multi")[0].split("_single")[0] for f in FILES}
    assert archs == {"resnet18", "vggsnn_cifar", "vgg_tiny"}
    assert {"soft", "soft_nodetach", "hard"} <= {f.split("_T")[1].split("_", 1)[1]
                                                 .rsplit("_seed", 1)[0] for f in FILES}
    assert len(FILES) == 21


ZOO = [("resnet18", 10, 3, 32), ("resnet19", 10, 3, 32), ("vgg11", 10, 3, 32),
       ("vgg13", 10, 3, 32), ("vggsnn_cifar", 10, 3, 32), ("vggsnn_dvs", 10, 2, 48),
       ("sew_resnet34", 1000, 3, 224), ("preact_resnet34", 1000, 3, 224)]


@pytest.mark.parametrize("name,num_classes,in_channels,size", ZOO)
def test_import_then_export_is_bit_exact_at_real_size(name, num_classes, in_channels, size):
    """The model is built abstractly (the import gives every entry its value), which skips
    compiling and running the real-size initialisers; the shapes it asks for are checked
    against a built model's export in the next test."""
    model = nnx.eval_shape(lambda: models.create_model(
        name, num_classes=num_classes, in_channels=in_channels, image_size=size))
    shapes = interop.reference_shapes(model)
    rng = np.random.default_rng(0)
    state_dict = {k: (rng.integers(0, 1000, s).astype(np.int64) if k.endswith("tracked")
                      else rng.standard_normal(s).astype(np.float32))
                  for k, s in shapes.items()}
    interop.import_state_dict(model, state_dict)
    exported = interop.export_state_dict(model)
    assert list(exported) == list(state_dict)
    for k in state_dict:
        assert exported[k].dtype == state_dict[k].dtype, k
        np.testing.assert_array_equal(exported[k], state_dict[k], err_msg=k)


@pytest.mark.slow
def test_reference_key_names_match_the_reference_files():
    for arch, size in (("resnet18", 32), ("vggsnn_cifar", 32), ("vgg_tiny", 16)):
        keys = parity.read_keys(os.path.join(VECTORS, f"keys_{arch}.txt"))
        model = models.create_model(arch, image_size=size)
        exported = interop.export_state_dict(model)
        assert {k: v.shape for k, v in exported.items()} == {n: s for n, s, _, _ in keys}
        assert list(interop.reference_shapes(model).items()) == [
            (k, v.shape) for k, v in exported.items()]


def test_import_reports_unknown_missing_and_misshaped_keys_by_name():
    model = models.create_model("vgg_tiny", image_size=16)
    sd = interop.export_state_dict(model)
    sd["feature.9.weight"] = np.zeros(3)
    del sd["classifier.0.bias"]
    sd["feature.0.weight"] = np.zeros((8, 3, 5, 5), np.float32)
    with pytest.raises(ValueError) as err:
        interop.import_state_dict(model, sd)
    message = str(err.value)
    assert "missing keys: classifier.0.bias" in message
    assert "unknown keys: feature.9.weight" in message
    assert "feature.0.weight: shape [8, 3, 5, 5]" in message


def test_vgg_flatten_order_follows_nchw(tmp_path):
    """A classifier weight that reads one NCHW position maps to the same NHWC position."""
    model = models.create_model("vggsnn_cifar")
    sd = interop.export_state_dict(model)
    w = np.zeros_like(sd["classifier.0.weight"])
    c, h, wd = 5, 1, 2  # channel 5, row 1, column 2 of the 512x3x3 map
    w[0, c * 9 + h * 3 + wd] = 1.0
    sd["classifier.0.weight"] = w
    interop.import_state_dict(model, sd)
    kernel = np.asarray(model.classifier[0].kernel[...])
    assert kernel[(h * 3 + wd) * 512 + c, 0] == 1.0 and kernel.sum() == 1.0
    np.savez(tmp_path / "sd.npz", **sd)
    loaded = interop.load_state_dict_file(str(tmp_path / "sd.npz"))
    np.testing.assert_array_equal(loaded["classifier.0.weight"], w)


@pytest.mark.slow
def test_import_cli_writes_a_checkpoint_that_training_resumes(tmp_path):
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    from ratebp_jax import train
    sys.path.insert(0, os.path.join(os.path.dirname(VECTORS), "..", "..", "experiments"))
    from configs import default

    source = models.create_model("vgg_tiny", in_channels=1, image_size=8, seed=123)
    sd = interop.export_state_dict(source)
    np.savez(tmp_path / "ref.npz", **sd)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.join(root, "experiments", "import_reference.py"),
         "--model", "vgg_tiny", "--state-dict", str(tmp_path / "ref.npz"), "--workdir",
         str(tmp_path / "run"), "--in-channels", "1", "--image-size", "8"],
        capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with ocp.CheckpointManager(str(tmp_path / "run" / "checkpoints")) as manager:
        restored = manager.restore(0, args=ocp.args.StandardRestore())
    model = models.create_model("vgg_tiny", in_channels=1, image_size=8)
    interop.import_state_dict(model, sd)
    np.testing.assert_array_equal(restored["params"]["features"]["0"]["conv"]["kernel"]["value"],
                                  np.asarray(model.features[0].conv.kernel[...]))
    config = default.get_config()
    config.model, config.num_train_steps, config.progress_bar, config.plots = \
        "vgg_tiny", 1, False, False
    logs = []
    summary = train.train_and_evaluate(config, str(tmp_path / "run"), log=logs.append)
    assert any("resumed from step 0" in line for line in logs) and summary["steps"] == 1


# --------------------------------------------------------------------------- checkpoint files
class FakeTensor:
    """What torch.load gives for a tensor, as far as unpack_checkpoint cares."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def numpy(self):
        return self.value


WEIGHTS = {"feature.0.weight": np.arange(6.0).reshape(2, 3),
           "feature.1.num_batches_tracked": np.array(5)}
OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}


def tensors(prefix=""):
    return {prefix + k: FakeTensor(v) for k, v in WEIGHTS.items()}


@pytest.mark.parametrize("checkpoint,recorded", [
    # the reference's model_weights.pth of a DDP run
    ({"best_acc": 94.5, "best_epoch": 199, "best_net": tensors("module."),
      "optimizer": OPTIMIZER}, {"best_acc": 94.5, "best_epoch": 199}),
    ({"epoch": np.int64(3), "state_dict": tensors(), "optimizer": OPTIMIZER}, {"epoch": 3}),
    ({"model": tensors("module."), "optimizer": OPTIMIZER}, {}),
    ({**tensors(), "version": 2, "note": "not a tensor"}, {}),
    (dict(WEIGHTS), {}),
], ids=["reference_best_net_ddp", "state_dict", "model", "bare_tensors", "bare_arrays"])
def test_unpack_checkpoint_finds_the_state_dict_without_torch(checkpoint, recorded):
    state_dict, metadata = interop.unpack_checkpoint(checkpoint, "state_dict='f.pth'")
    assert list(state_dict) == list(WEIGHTS)
    for k, v in WEIGHTS.items():
        assert isinstance(state_dict[k], np.ndarray)
        np.testing.assert_array_equal(state_dict[k], v)
    assert metadata == recorded
    assert all(type(v) in (int, float) for v in metadata.values())


def test_unpack_checkpoint_without_tensors_names_the_file_and_its_keys():
    with pytest.raises(ValueError, match=r"state_dict='f.pth': holds no tensors "
                                         r"\(keys: best_acc, best_epoch, optimizer\)"):
        interop.unpack_checkpoint({"best_acc": 90.0, "best_epoch": 3, "optimizer": OPTIMIZER},
                                  "state_dict='f.pth'")


def test_reference_training_checkpoint_pth_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    keys = parity.read_keys(os.path.join(VECTORS, "keys_vgg_tiny.txt"))
    rng = np.random.default_rng(0)
    sd = {name: rng.standard_normal(shape).astype(dtype) for name, shape, dtype, _ in keys}
    path = str(tmp_path / "model_weights.pth")
    torch.save({"best_acc": 93.25, "best_epoch": 7, "optimizer": {"state": {}},
                "best_net": {f"module.{k}": torch.from_numpy(v) for k, v in sd.items()}}, path)
    loaded, recorded = interop.load_reference_file(path)
    assert recorded == {"best_acc": 93.25, "best_epoch": 7}
    assert list(loaded) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)
