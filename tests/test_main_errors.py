"""Every config field and flag of ``experiments/main.py`` has a bad value here: each ends with
exit 2, one ``error:`` line on stderr naming the field, no traceback, and no workdir left
behind (everything is validated before anything is created)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (command-line arguments, a fragment the one error line must contain). "{s}" is a scratch
# folder holding the bad data files made below.
CASES = [
    # config fields, in the order of experiments/configs/default.py
    (["--config.name=a/b"], "name='a/b'"),
    (["--config.dataset=mnist"], "dataset='mnist': allowed values are"),
    (["--config.dataset=cifar10", "--config.data_dir={s}/none"],
     "data_dir='{s}/none': no such directory"),
    (["--config.dataset=cifar10_dvs", "--config.data_dir={s}/none"],
     "data_dir='{s}/none': no such directory"),
    (["--config.dataset=npz", "--config.data_path={s}/none.npz"],
     "data_path='{s}/none.npz': no such file"),
    (["--config.dataset=dvsgesture", "--config.data_dir={s}/none"],
     "data_dir='{s}/none': no such directory; dataset 'dvsgesture'"),
    (["--config.dataset=shd", "--config.data_dir={s}/none"],
     "data_dir='{s}/none': no such directory; dataset 'shd'"),
    (["--config.dataset=events_npz", "--config.data_path={s}/none"],
     "data_path='{s}/none': no such directory; dataset 'events_npz'"),
    (["--config.num_classes=-1"], "num_classes=-1: must be an integer >= 0"),
    (["--config.image_size=-8"], "image_size=-8: must be an integer >= 0"),
    (["--config.augment=maybe"], "--config.augment"),
    (["--config.augment_flip=3"], "--config.augment_flip"),
    (["--config.augment_crop_padding=-4"], "augment_crop_padding=-4"),
    (["--config.data_workers=-1"], "data_workers=-1: must be an integer >= 0"),
    (["--config.model=resnet50"], "model='resnet50': allowed values are"),
    # one's own model by import path (examples/ is found from the working directory, ROOT)
    (["--config.model=nopkg_xyz.mymodel:Net"],
     "model='nopkg_xyz.mymodel:Net': cannot import module 'nopkg_xyz.mymodel'"),
    (["--config.model=examples.my_snn:NoSuchNet"],
     "model='examples.my_snn:NoSuchNet': module 'examples.my_snn' has no attribute"),
    (["--config.model=ratebp_jax.layers:PHASES"],
     "model='ratebp_jax.layers:PHASES': not callable"),
    (["--config.model=ratebp_jax.layers:BatchNorm"],
     "model='ratebp_jax.layers:BatchNorm': does not take the model keywords"),
    (["--config.model=mypkg/my_snn.py:MySNN"], "must be package.module:Factory"),
    # the factory's own arguments
    (["--config.model=examples.my_snn:MySNN", "--config.model_kwargs={'widht': 8}"],
     "model_kwargs={'widht': 8}: model 'examples.my_snn:MySNN' takes no argument 'widht'; "
     "allowed values are width; did you mean 'width'?"),
    (["--config.model_kwargs={'depth': 3}"],
     "model 'vgg_small' takes no argument 'depth'; allowed values are spec, hidden"),
    (["--config.model_kwargs=8"], "--config.model_kwargs=8: Failed to parse '8'"),
    (["--config.model_kwargs={'num_classes': 3}"],
     "'num_classes' is one of the model keywords"),
    (["--config.model=examples.my_snn:MySNN", "--config.model_kwargs={'width': 'x'}"],
     "model_kwargs={'width': 'x'}: model 'examples.my_snn:MySNN' cannot be built with them"),
    (["--config.lam=1.5"], "lam=1.5: must be a finite number in [0.0, 1.0)"),
    (["--config.learnable_leak=maybe"], "--config.learnable_leak"),
    (["--config.learnable_leak=true", "--config.lam=0"],
     "lam=0.0: must be a finite number in (0.0, 1.0)"),
    (["--config.learnable_leak=true", "--config.method=ottt"],
     "method='ottt' with learnable_leak=True: OTTT's presynaptic traces decay by one fixed"),
    (["--config.thresh=-1"], "thresh=-1.0: must be a finite number > 0.0"),
    (["--config.thresh=inf"], "thresh=inf: must be a finite number > 0.0"),
    (["--config.reset=soft-ish"], "reset='soft-ish': allowed values are"),
    (["--config.v_reset=nan"], "v_reset=nan: must be a finite number"),
    (["--config.surrogate=relu"], "surrogate='relu'"),
    (["--config.surrogate_alpha=0"], "surrogate_alpha=0.0: must be a finite number > 0.0"),
    (["--config.compute_dtype=float16"], "compute_dtype='float16': allowed values are"),
    (["--config.pool_ties=mean"], "pool_ties='mean': allowed values are split, first"),
    (["--config.method=sgd"], "method='sgd': allowed values are"),
    (["--config.step_mode=both"], "step_mode='both': allowed values are"),
    (["--config.T=0"], "T=0: must be an integer >= 1"),
    (["--config.T=abc"], "--config.T=abc"),
    (["--config.rate_grad_scale=half"], "rate_grad_scale='half': allowed values are"),
    (["--config.optimizer=lbfgs"], "optimizer='lbfgs': allowed values are"),
    (["--config.learning_rate=nan"], "learning_rate=nan: must be a finite number > 0.0"),
    (["--config.momentum=1.5"], "momentum=1.5: must be a finite number in [0.0, 1.0)"),
    (["--config.weight_decay=-1e-4"], "weight_decay=-0.0001: must be a finite number >= 0.0"),
    (["--config.batch_size=0"], "batch_size=0: must be an integer >= 1"),
    (["--config.batch_size=5000"], "batch_size=5000: larger than the training set"),
    (["--config.eval_batch_size=0"], "eval_batch_size=0: must be an integer >= 1"),
    (["--config.num_epochs=0"], "num_epochs=0: must be an integer >= 1"),
    (["--config.num_train_steps=-1"], "num_train_steps=-1: must be an integer >= 0"),
    (["--config.seed=-1"], "seed=-1: must be an integer >= 0"),
    (["--config.checkpoint_every_steps=-2"], "checkpoint_every_steps=-2"),
    (["--config.keep_checkpoints=0"], "keep_checkpoints=0: must be an integer >= 1"),
    (["--config.progress_bar=sometimes"], "--config.progress_bar"),
    (["--config.log_every_steps=0"], "log_every_steps=0: must be an integer >= 1"),
    (["--config.plots=2"], "--config.plots"),
    (["--config.tensorboard=maybe"], "--config.tensorboard"),
    (["--config.nan_policy=ignore"], "nan_policy='ignore': allowed values are"),
    (["--config.grad_agreement_every_steps=-5"],
     "grad_agreement_every_steps=-5: must be an integer >= 0"),
    (["--config.grad_agreement_methods=('rate', 'bptt_fast')"],
     "grad_agreement_methods='bptt_fast': allowed values are bptt, "),
    (["--config.grad_agreement_methods=()"],
     "grad_agreement_methods=(): must be a non-empty list of method names"),
    (["--config.grad_agreement_warn_cosine=high"], "--config.grad_agreement_warn_cosine=high"),
    (["--config.contract_errors_fatal=maybe"], "--config.contract_errors_fatal"),
    # unknown fields and flags, the config file, the workdir
    (["--config.lerning_rate=0.1"], "config.lerning_rate: no such field; did you mean "
                                    "'learning_rate'?"),
    (["--config.augment.flip=1"], "config.augment.flip"),
    (["--lerning_rate=0.1"], "Unknown command line flag 'lerning_rate'"),
    (["--config", "{s}/none.py"], "--config='{s}/none.py': no such file"),
    (["--config", "{s}/broken.py"], "--config='{s}/broken.py': cannot load it"),
    (["--workdir", "{s}/a_file"], "workdir='{s}/a_file': is a file"),
    (["--workdir", "{s}/a_file/run"], "lies in a file"),
    # multi-process flags
    (["--process_id=1"], "--process_id=1: needs --distributed"),
    (["--distributed", "--num_processes=0"], "--num_processes=0: must be an integer >= 1"),
    (["--distributed", "--num_processes=2", "--process_id=2"],
     "--process_id=2: must be an integer >= 0 and <= 1"),
    (["--distributed", "--coordinator_address=localhost"],
     "--coordinator_address='localhost': must be host:port"),
    (["--distributed=maybe"], "--distributed"),
    # the researcher's own data
    (["--config.dataset=npz", "--config.data_path={s}/truncated.npz"],
     "data_path='{s}/truncated.npz': not an .npz archive"),
    (["--config.dataset=npz", "--config.data_path={s}/text.npz"],
     "data_path='{s}/text.npz': not an .npz archive"),
    (["--config.dataset=npz", "--config.data_path={s}/nchw.npz"],
     "channels-last [N, H, W, C]"),
    (["--config.dataset=npz", "--config.data_path={s}/from_one.npz"],
     "labels start at 1, not 0"),
    (["--config.dataset=npz", "--config.data_path={s}/float.npz"], "must be uint8"),
]


def _write_bad_files(scratch):
    rng = np.random.default_rng(0)

    def arrays(x_shape, low=0):
        return {"x_train": rng.integers(0, 256, (16, *x_shape), dtype=np.uint8),
                "y_train": np.arange(16) % 3 + low,
                "x_test": rng.integers(0, 256, (4, *x_shape), dtype=np.uint8),
                "y_test": np.arange(4) % 3 + low}

    np.savez(scratch / "good.npz", **arrays((8, 8, 3)))
    data = (scratch / "good.npz").read_bytes()
    (scratch / "truncated.npz").write_bytes(data[:len(data) // 2])
    (scratch / "text.npz").write_text("x_train,y_train\n1,2\n")
    np.savez(scratch / "nchw.npz", **arrays((3, 8, 8)))
    np.savez(scratch / "from_one.npz", **arrays((8, 8, 3), low=1))
    np.savez(scratch / "float.npz", **{**arrays((8, 8, 3)),
                                       "x_train": rng.random((16, 8, 8, 3))})
    (scratch / "broken.py").write_text("def get_config():\n    raise RuntimeError('boom')\n")
    (scratch / "a_file").write_text("not a directory\n")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("bad_input")
    _write_bad_files(scratch)
    cases = [[a.replace("{s}", str(scratch)) for a in args] for args, _ in CASES]
    (scratch / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "main_cases.py"),
                           str(scratch / "cases.json"), str(scratch)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(scratch), json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[" ".join(args) for args, _ in CASES])
def test_bad_field_or_flag_is_one_error_line_and_leaves_nothing(outcomes, index):
    scratch, results = outcomes
    result, fragment = results[index], CASES[index][1].replace("{s}", scratch)
    lines = result["stderr"].strip().splitlines()
    assert result["code"] == 2, result
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]
    assert not result["left"], "a refused run created its workdir"


def test_every_config_field_has_a_bad_value_in_the_table():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from configs import default
    covered = {arg.split("=")[0][len("--config."):] for args, _ in CASES for arg in args
               if arg.startswith("--config.")}
    assert set(default.get_config().keys()) <= covered
