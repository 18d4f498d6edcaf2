"""A workdir belongs to one run: its config, its orbax checkpoints and its records.

The first run writes its whole config to ``config.json``. A rerun in the same workdir may
differ from it only in the fields of ``RERUN_FIELDS`` (bookkeeping and the schedule's
length); any other difference is refused before anything on disk is touched, so that a
changed ``--config.model`` can never overwrite, truncate or quarantine another run's
records. For the same reason a checkpoint whose tree does not fit the model is a config
mismatch, and only a checkpoint whose bytes cannot be read is moved aside as corrupt.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

import jax
import orbax.checkpoint as ocp

from ratebp_jax.data.fingerprint import fingerprint as data_fingerprint, short

# Fields a rerun may change: what is logged, kept or shown, where the same data lives (its
# fingerprint must not change), and how long the run goes on. Everything else defines the run.
RERUN_FIELDS = ("name", "num_epochs", "num_train_steps", "progress_bar", "log_every_steps",
                "plots", "tensorboard", "keep_checkpoints", "checkpoint_every_steps", "eval_batch_size",
                "nan_policy", "data_dir", "data_path", "data_workers",
                "grad_agreement_every_steps", "grad_agreement_methods",
                "grad_agreement_warn_cosine", "contract_errors_fatal")

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
FINGERPRINT_KEY = "data_fingerprint"  # in config.json, beside the config's fields
STATE_FILE = "run_state.json"  # running or stopped, by whom; summary.json marks completion


class RunMismatch(ValueError):
    """The workdir holds a different run; nothing was changed."""


def check_path(workdir: str) -> None:
    """``workdir`` must be a directory or not exist yet, and so must its ancestors."""
    path = os.path.abspath(workdir)
    while path and path != os.path.dirname(path):
        if os.path.exists(path) and not os.path.isdir(path):
            where = "is a file" if path == os.path.abspath(workdir) else f"lies in a file, {path!r}"
            raise FileExistsError(f"workdir={workdir!r}: {where}; give a directory")
        path = os.path.dirname(path)


def config_dict(config) -> dict:
    """The config as plain JSON values (tuples become lists, as they would on reading)."""
    return json.loads(json.dumps(config.to_dict()))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def check_same_run(workdir: str, config) -> None:
    """Refuse a config that differs from the workdir's ``config.json`` outside RERUN_FIELDS.

    Fields missing from an older ``config.json`` (added to the code since) are not
    compared; a workdir from before ``config.json`` is compared on its summary's fields.
    Raises RunMismatch naming every differing field with its old and new value.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        old = read_json(path)
    elif os.path.exists(os.path.join(workdir, SUMMARY_FILE)):  # a run from before config.json
        old = read_json(os.path.join(workdir, SUMMARY_FILE))
    else:
        return
    new = config_dict(config)
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new
               if k in old and k not in RERUN_FIELDS and old[k] != new[k]]
    if not changed and old.get(FINGERPRINT_KEY) is not None:
        now = data_fingerprint(config)
        if now is not None and now != old[FINGERPRINT_KEY]:
            changed = [f"the data: {short(old[FINGERPRINT_KEY])} -> {short(now)}"]
    if changed:
        raise RunMismatch(
            f"workdir={workdir!r} holds a different run ({'; '.join(changed)}); nothing was "
            f"changed. Use a new --workdir for this config (a rerun may change only "
            f"{', '.join(RERUN_FIELDS)})")


def write_config(workdir: str, config, fingerprint: dict | None) -> None:
    """``config.json``: the config's fields and the fingerprint of the data it trains on."""
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, CONFIG_FILE),
                          {**config_dict(config), FINGERPRINT_KEY: fingerprint})


def completed_summary(workdir: str, total_steps: int) -> dict | None:
    """The summary of a run in ``workdir`` that trained ``total_steps`` and wrote every
    artefact its summary lists, else None. The summary is a run's last write, so a run
    that crashed before it is resumed, and its last writes are made again."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    summary = read_json(path)
    if summary.get("interrupted") or summary.get("steps", -1) < total_steps:
        return None
    if not all(os.path.exists(os.path.join(workdir, f)) for f in summary.get("artefacts", [])):
        return None
    return summary


def mark_state(workdir: str, state: str, step: int, **details) -> None:
    """``run_state.json``: whether the run is ``running`` or how it stopped (``interrupted``,
    ``stopped``), at which step, and which process on which host runs it, so that a reader
    can tell a run that trains from one that was killed (see ``report.run_state``)."""
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, STATE_FILE),
                          {"state": state, "step": step, "pid": os.getpid(),
                           "host": socket.gethostname(), "time": time.time(), **details})


def last_checkpoint(workdir: str) -> int | None:
    """The newest committed step in ``workdir/checkpoints``, as a message about it must say."""
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def rerun_hint(workdir: str) -> str:
    """What rerunning the same command does, as the checkpoints on disk say."""
    step = last_checkpoint(workdir)
    if step is None:
        return "no checkpoint was written yet, so rerunning the same command starts from step 0"
    return f"rerun the same command to resume from the last checkpoint, step {step}"


# --------------------------------------------------------------------------- checkpoints
def async_checkpoints() -> bool:
    """Whether orbax writes checkpoints in the background while training goes on.

    Yes on an accelerator, where the host's cores are free to write while the device
    computes. Not on the CPU backend, whose "device" is those same cores: there the
    background write competes with the training steps it should overlap, and made them
    slower (docs/RESULTS.md, "The training loop against a bare loop"). Not with several
    processes either: two managers' asynchronous saves at the same step can deadlock in
    orbax's cross-process barriers (gloo, CPU)."""
    return jax.process_count() == 1 and jax.default_backend() != "cpu"


def checkpoint_managers(workdir: str, keep: int, *, create: bool = True):
    """``latest`` (resume) and ``best`` (highest test accuracy) orbax managers. Orbax writes
    to a temporary directory and renames it on commit, so a killed run never leaves a
    half-written checkpoint that looks complete. The training run (``create=True``) also
    removes the temporary directories of a killed run; a reader must not, since a run may
    be writing them."""
    workdir = os.path.abspath(workdir)  # orbax needs absolute paths
    def manager(folder, max_to_keep):
        # The handler is named up front so that a fresh manager can read a checkpoint's
        # metadata (check_fits) before anything has been saved or restored through it.
        return ocp.CheckpointManager(
            os.path.join(workdir, folder), item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create,
                enable_async_checkpointing=async_checkpoints()))
    # best/ keeps the previous best too while a run trains: with asynchronous saves a new
    # best can commit before its latest checkpoint, and a crash then must find the previous
    # one (reconcile_best). prune_best leaves one when the run ends.
    return manager("checkpoints", keep), manager("best", 2)


def best_step(history: list[dict]) -> int | None:
    """The step of the first epoch with the highest test accuracy: the one a run saves to
    ``best/`` (a later epoch replaces it only when strictly better)."""
    best = None
    for record in history:
        if best is None or record["test_accuracy"] > best["test_accuracy"]:
            best = record
    return None if best is None else best["step"]


def prune_best(manager, history: list[dict]) -> int | None:
    """Remove every step from ``best/`` but the best epoch of ``history``; returns that step."""
    wanted = best_step(history)
    directory = os.fspath(manager.directory)
    stale = [int(d) for d in os.listdir(directory) if d.isdigit() and int(d) != wanted]
    if stale and jax.process_index() == 0:
        for step in stale:
            shutil.rmtree(os.path.join(directory, str(step)))
    _sync("prune_best")
    manager.reload()
    return wanted


def reconcile_best(manager, history: list[dict], state, restored_step: int | None) -> None:
    """Make ``best/`` hold exactly the best epoch of ``history`` (the records up to the
    restored checkpoint), whatever a crash left there.

    An epoch's end writes its metrics line, then the latest checkpoint, then (if better)
    the best one; with asynchronous saves the two checkpoints may commit in either order. So
    after a crash ``best/`` may hold a step past the restored one (its epoch is trained
    again and saved again), a half-deleted older step, or lack the restored step although
    its record is the best. The last case is the only one to write: the restored state is
    that epoch's state, bit for bit. An older best step is always there: the trainer waits
    for a best save before the next latest one starts, and ``best/`` keeps two steps while
    a run trains, so a new best that commits before its latest checkpoint leaves the
    previous best in place.
    """
    wanted = prune_best(manager, history)
    directory = os.fspath(manager.directory)
    if wanted is not None and wanted not in manager.all_steps():
        if wanted != restored_step:
            raise RuntimeError(f"{directory}: the best checkpoint, step {wanted}, is missing "
                               f"and is not the restored step {restored_step}")
        manager.save(wanted, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _leaf_signature(tree) -> dict[str, tuple]:
    """``{path: shape}`` with NNX ``.value`` attributes and list indices spelled as orbax
    stores them, so a live state and a checkpoint's metadata compare key by key."""
    def name(key):
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def check_fits(manager, step: int, state, workdir: str) -> None:
    """Raise RunMismatch when checkpoint ``step`` holds another tree than ``state``.

    Reads only the checkpoint's metadata; unreadable metadata propagates as the corrupt case.
    """
    stored = _leaf_signature(manager.item_metadata(step).tree)
    wanted = _leaf_signature(state)
    if stored != wanted:
        differ = sorted(set(stored.items()) ^ set(wanted.items()))
        raise RunMismatch(
            f"workdir={workdir!r}: checkpoint {step} holds a different model or state "
            f"({len(differ)} arrays differ, e.g. {differ[0][0]}); nothing was changed. Use a "
            f"new --workdir for this config")


def restore_latest(manager, state, log, workdir: str):
    """Restore the newest readable checkpoint into ``state``'s structure and shardings.

    A checkpoint of another model raises RunMismatch. A corrupt newest checkpoint is
    reported, moved aside to ``corrupt_checkpoints/`` (so that the resumed run can write
    that step again) and the previous one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            check_fits(manager, step, abstract, workdir)
            return manager.restore(step, args=ocp.args.StandardRestore(abstract)), step
        except RunMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            log(f"warning: checkpoint {step} is unreadable ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); moved aside, trying an older one")
            _quarantine(manager, step)
    return state, None


def _quarantine(manager, step):
    directory = os.fspath(manager.directory)
    aside = os.path.join(os.path.dirname(directory), "corrupt_checkpoints")
    if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        os.replace(os.path.join(directory, str(step)),
                   os.path.join(aside, f"{step}-{int(time.time())}"))
    manager.reload()


# --------------------------------------------------------------------------- records
def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of a JSONL file. A last line without its newline is a write that a crash
    cut short: it is left out (``truncate_jsonl`` then removes it). Any other unreadable
    line raises."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        complete = f.read().split("\n")[:-1]  # what follows the last newline is torn or ""
    return [json.loads(line) for line in complete if line.strip()]


def write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def save_figure_atomic(fig, path):
    """``fig`` as a PNG at ``path``, written under another name and renamed, so that a crash
    never leaves a truncated image."""
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def truncate_jsonl(path, step):
    """Drop records written after ``step`` (a run killed after logging, before saving)."""
    kept = [r for r in read_jsonl(path) if r["step"] <= step]
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, path)
    return kept
