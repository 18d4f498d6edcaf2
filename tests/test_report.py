"""experiments/report.py: a row per run, its state read from disk while runs may still
write, a figure, and one line for a path that holds no run."""
import json
import os
import subprocess
import sys

import pytest

from ratebp_jax import report, train
from ratebp_jax import workdir as wd

from test_train import ROOT, tiny_config


def record(epoch, accuracy):
    return {"epoch": epoch, "step": 5 * epoch, "test_accuracy": accuracy, "wall_s": 2.0 * epoch,
            "images_per_s": 100.0 * epoch, "compile_s": 3.0 if epoch == 1 else 0.0}


def fake_run(workdir, records, *, torn=False, marker=None, summary=None):
    os.makedirs(workdir)
    wd.write_json_atomic(os.path.join(workdir, wd.CONFIG_FILE),
                         {**wd.config_dict(tiny_config()), "data_fingerprint": None})
    with open(os.path.join(workdir, wd.METRICS_FILE), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        if torn:
            f.write(json.dumps(record(9, 0.5))[:20])  # a line being written
    if marker is not None:
        wd.write_json_atomic(os.path.join(workdir, wd.STATE_FILE), marker)
    if summary is not None:
        wd.write_json_atomic(os.path.join(workdir, wd.SUMMARY_FILE), summary)
    return str(workdir)


def marker(state, pid, host=None):
    import socket
    return {"state": state, "step": 5, "pid": pid, "host": host or socket.gethostname(),
            "time": 0.0}


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def runs(tmp_path):
    two = [record(1, 0.5), record(2, 0.75)]
    return {
        "complete": fake_run(tmp_path / "complete", two, summary={"interrupted": False},
                             marker=marker("running", dead_pid())),
        "interrupted": fake_run(tmp_path / "interrupted", two[:1],
                                marker=marker("interrupted", dead_pid())),
        "running": fake_run(tmp_path / "running", two, torn=True,
                            marker=marker("running", os.getpid())),
        "killed": fake_run(tmp_path / "killed", two, marker=marker("running", dead_pid())),
        "elsewhere": fake_run(tmp_path / "elsewhere", two,
                              marker=marker("running", 1, host="another-host")),
    }


def test_each_run_state_is_read_from_disk(runs):
    states = {name: report.read_run(path)["state"] for name, path in runs.items()}
    assert states["complete"] == "complete"
    assert states["interrupted"] == "interrupted at step 5"
    assert states["running"] == "running"
    assert states["killed"] == "killed"
    assert states["elsewhere"].startswith("running or killed (last record ")


def test_a_row_holds_the_figures_of_the_records(runs):
    row = report.read_run(runs["running"])  # the torn line being written is left out
    assert (row["steps"], row["final_acc"], row["best_acc"]) == (10, 0.75, 0.75)
    assert (row["wall_s"], row["images_per_s"], row["compile_s"]) == (4.0, 150.0, 3.0)
    assert (row["model"], row["method"], row["T"]) == ("vgg_tiny", "rate", 2)


@pytest.mark.slow
def test_the_command_reports_every_run_and_skips_what_is_not_one(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                          str(tmp_path / "*"), "--plot", str(tmp_path / "cmp.png"),
                          "--json", str(tmp_path / "rows.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["name", "model"] and len(lines) == 1 + len(runs)
    assert out.stderr.strip() == f"skipped {tmp_path / 'empty'}: not a run (no config.json)"
    assert os.path.getsize(tmp_path / "cmp.png") > 0
    assert len(json.load(open(tmp_path / "rows.json"))) == len(runs)


@pytest.mark.slow
def test_a_real_run_reads_as_complete_and_an_interrupted_one_as_interrupted(tmp_path):
    config = tiny_config(num_train_steps=4)
    train.train_and_evaluate(config, str(tmp_path / "a"), log=lambda *_: None)
    train.train_and_evaluate(config, str(tmp_path / "b"), log=lambda *_: None,
                             interrupt_at_step=2)
    assert report.read_run(str(tmp_path / "a"))["state"] == "complete"
    assert report.read_run(str(tmp_path / "b"))["state"] == "interrupted at step 2"


@pytest.mark.slow
def test_only_paths_that_are_not_runs_fail_the_command(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                          str(tmp_path / "nothing")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: RUN=")
