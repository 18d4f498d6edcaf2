"""A workdir belongs to one run: a different config is refused with every file untouched, a
bookkeeping change resumes, a finished run changes nothing, and the README's training
examples each leave their own record."""
import hashlib
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from ratebp_jax import train
from ratebp_jax.workdir import RunMismatch

from test_train import ROOT, tiny_config


def snapshot(workdir) -> dict:
    """Every file under ``workdir`` by relative path, with its bytes' hash."""
    out = {}
    for folder, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def quiet(*_):
    pass


def test_a_refused_rerun_leaves_every_file_byte_identical(tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_config(num_train_steps=2), workdir, log=quiet)
    before = snapshot(workdir)
    assert "config.json" in before and "summary.json" in before
    for change, named in (({"model": "resnet18_tiny"}, "model 'vgg_tiny' -> 'resnet18_tiny'"),
                          ({"T": 3, "lam": 0.5}, "T 2 -> 3; lam 0.2 -> 0.5"),
                          ({"num_train_steps": 4, "method": "bptt"}, "method 'rate' -> 'bptt'")):
        with pytest.raises(RunMismatch, match=re.escape(named)):
            train.train_and_evaluate(tiny_config(**{"num_train_steps": 2, **change}),
                                     workdir, log=quiet)
        assert snapshot(workdir) == before

    # A workdir written before config.json and summary.json existed: the checkpoint's tree,
    # read from its metadata, refuses the other model; it is not called corrupt.
    os.remove(tmp_path / "config.json")
    os.remove(tmp_path / "summary.json")
    before = snapshot(workdir)
    with pytest.raises(RunMismatch, match="checkpoint 2 holds a different model"):
        train.train_and_evaluate(tiny_config(num_train_steps=2, model="resnet18_tiny"),
                                 workdir, log=quiet)
    assert snapshot(workdir) == before
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_more_epochs_resume_and_a_finished_run_changes_nothing(tmp_path):
    workdir, logs = str(tmp_path), []
    config = tiny_config(num_train_steps=0, num_epochs=1, batch_size=256)
    first = train.train_and_evaluate(config, workdir, log=quiet)
    assert first["steps"] == 5 and not first.get("already_complete")
    before = snapshot(workdir)
    again = train.train_and_evaluate(config, workdir, log=logs.append)
    assert again["already_complete"] and again["steps"] == 5
    assert [line for line in logs if line.startswith("already complete:")], logs
    assert snapshot(workdir) == before

    config.num_epochs, config.progress_bar = 2, True  # bookkeeping: the run goes on
    logs.clear()
    longer = train.train_and_evaluate(config, workdir, log=logs.append)
    assert any("resumed from step 5" in line for line in logs), logs
    assert longer["steps"] == 10 and not longer.get("already_complete")
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [5, 10]
    assert json.load(open(tmp_path / "config.json"))["num_epochs"] == 2


def readme_training_commands():
    """The README's ``experiments/main.py`` command lines (continuations joined)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    return [line.split("&& ")[-1].strip() for line in text.splitlines()
            if re.search(r"\bpython3? experiments/main\.py", line)]


def needs_downloaded_data_or_hosts(args) -> bool:
    if "--distributed" in args:
        return True
    if "--config" in args:
        sys.path.insert(0, os.path.join(ROOT, "experiments"))  # configs import configs.default
        path = os.path.join(ROOT, args[args.index("--config") + 1])
        return runpy.run_path(path)["get_config"]().dataset != "digits"
    return False


@pytest.mark.slow
def test_the_readme_training_examples_each_leave_their_own_record(tmp_path):
    commands = [shlex.split(c)[2:] for c in readme_training_commands()]
    runnable = [args for args in commands if not needs_downloaded_data_or_hosts(args)]
    assert len(runnable) >= 2, commands  # the Quick start and the BPTT example
    for args in runnable:
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "experiments", "main.py"), *args,
             "--config.num_train_steps=2", "--config.progress_bar=false",
             "--config.plots=false"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert "resumed" not in proc.stdout and "already complete" not in proc.stdout
    summaries = [json.load(open(p)) for p in sorted((tmp_path / "runs").glob("*/summary.json"))]
    assert len(summaries) == len(runnable)
    assert all(s["steps"] == 2 and not s["interrupted"] for s in summaries)


def test_checkpoints_are_written_in_the_background_only_on_an_accelerator(monkeypatch):
    """On the CPU backend the host's cores are the device, so a background save would take
    them from the next steps (docs/RESULTS.md section 12); an accelerator frees them. The
    backend is set here, so that the test means the same on any machine."""
    import jax

    from ratebp_jax import workdir
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert not workdir.async_checkpoints()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert workdir.async_checkpoints()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not workdir.async_checkpoints()
