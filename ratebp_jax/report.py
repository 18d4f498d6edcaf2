"""Compare runs from their workdirs: one row per run, and test accuracy against epoch and
wall-clock time. ``experiments/report.py`` is the command line.

A workdir is read without locks while its run may still be writing: every file it reads is
either replaced atomically (``config.json``, ``summary.json``, ``run_state.json``) or
appended line by line (``metrics.jsonl``, whose torn last line ``workdir.read_jsonl``
leaves out).
"""
from __future__ import annotations

import os
import socket
import statistics
import time

from ratebp_jax import workdir as wd

COLUMNS = ("name", "model", "dataset", "method", "step_mode", "T", "compute_dtype", "steps",
           "final_acc", "best_acc", "wall_s", "images_per_s", "compile_s", "state")


class NotARun(ValueError):
    """A path that holds no run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_state(summary: dict | None, marker: dict | None, records: list[dict],
              workdir: str) -> str:
    """complete, interrupted at a step, stopped (non-finite), running, killed, or "running
    or killed" when the run's process is on another host and cannot be asked."""
    if summary is not None and not summary.get("interrupted"):
        return "complete"
    if marker is None:
        return "not started" if not records else "running or killed"
    if marker["state"] == "interrupted":
        return f"interrupted at step {marker['step']}"
    if marker["state"] == "stopped":
        return f"stopped at step {marker['step']} ({marker.get('reason', 'error')})"
    if marker.get("host") == socket.gethostname():
        return "running" if _alive(marker["pid"]) else "killed"
    path = os.path.join(workdir, wd.METRICS_FILE)
    last = os.path.getmtime(path) if os.path.exists(path) else marker["time"]
    return f"running or killed (last record {time.strftime('%Y-%m-%d %H:%M', time.localtime(last))})"


def read_run(workdir: str) -> dict:
    """The row of the run in ``workdir``, with its epoch records under ``"records"``.
    Raises NotARun for a path that holds no run."""
    config_path = os.path.join(workdir, wd.CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise NotARun(f"{workdir}: not a directory")
    if not os.path.exists(config_path):
        raise NotARun(f"{workdir}: not a run (no {wd.CONFIG_FILE})")
    config = wd.read_json(config_path)
    records = wd.read_jsonl(os.path.join(workdir, wd.METRICS_FILE))
    summary_path = os.path.join(workdir, wd.SUMMARY_FILE)
    summary = wd.read_json(summary_path) if os.path.exists(summary_path) else None
    state_path = os.path.join(workdir, wd.STATE_FILE)
    marker = wd.read_json(state_path) if os.path.exists(state_path) else None
    speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
    best = max((r["test_accuracy"] for r in records), default=None)
    return {
        "workdir": workdir, **{k: config.get(k) for k in COLUMNS[:7]},
        "steps": records[-1]["step"] if records else 0,
        "final_acc": records[-1]["test_accuracy"] if records else None, "best_acc": best,
        "wall_s": records[-1]["wall_s"] if records else None,
        "images_per_s": statistics.median(speeds) if speeds else None,
        "compile_s": sum(r.get("compile_s", 0.0) for r in records) or None,
        "state": run_state(summary, marker, records, workdir), "records": records,
    }


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1.5 else f"{value:.1f}"
    return str(value)


def table(rows: list[dict]) -> str:
    """The rows as an aligned text table, one line per run."""
    cells = [list(COLUMNS)] + [[_cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in cells)


def plot_runs(rows: list[dict], path: str) -> None:
    """Test accuracy against epoch and against wall-clock time, one line per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    by_epoch, by_time = fig.subplots(1, 2, sharey=True)
    for row in rows:
        label = f"{row['name']} {row['method']} T={row['T']} ({os.path.basename(row['workdir'])})"
        epochs = [r["epoch"] for r in row["records"]]
        accuracy = [r["test_accuracy"] for r in row["records"]]
        by_epoch.plot(epochs, accuracy, marker=".", label=label)
        by_time.plot([r["wall_s"] for r in row["records"]], accuracy, marker=".", label=label)
    by_epoch.set(xlabel="epoch", ylabel="test accuracy (spike mode)")
    by_time.set(xlabel="wall-clock time (s)")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=7)
    fig.tight_layout()
    wd.save_figure_atomic(fig, path)
