"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

One linear trainer (after big_vision / flax examples): config validation, data, model,
optimiser, data-parallel sharding, a jitted train step with donated state, spike-mode
evaluation, orbax checkpoints with automatic resume, and the workdir records
(``metrics.jsonl``, ``summary.json``, PNG plots). The gradient method is a config value
resolved once by ``methods.make_grad_fn``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ratebp_jax import data, methods, models, neurons
from ratebp_jax.layers import STEP_MODES

OPTIMIZERS = ("sgd", "adam")
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient stopped the run."""


# --------------------------------------------------------------------------- validation
def _allowed(field, value, allowed):
    if value not in allowed:
        raise ValueError(f"{field}={value!r}: allowed values are {', '.join(map(str, allowed))}")


def _positive(config, field, minimum=1, kind=int):
    value = config[field]
    if not isinstance(value, kind) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{field}={value!r}: must be {'an integer' if kind is int else 'a number'}"
                         f" >= {minimum}")


def neuron_config(config) -> neurons.NeuronConfig:
    return neurons.NeuronConfig(lam=config.lam, thresh=config.thresh, reset=config.reset,
                                v_reset=config.v_reset, surrogate=config.surrogate,
                                alpha=config.surrogate_alpha)


def validate_config(config) -> None:
    """Check every field before any compute; each failure names the field and what is allowed."""
    _allowed("model", config.model, list(models.MODELS))
    _allowed("dataset", config.dataset, list(data.LOADERS))
    _allowed("method", config.method, list(methods.METHODS))
    _allowed("step_mode", config.step_mode, STEP_MODES)
    _allowed("rate_grad_scale", config.rate_grad_scale, methods.RATE_GRAD_SCALES)
    _allowed("optimizer", config.optimizer, OPTIMIZERS)
    _allowed("nan_policy", config.nan_policy, NAN_POLICIES)
    for field in ("T", "batch_size", "eval_batch_size", "num_epochs"):
        _positive(config, field)
    for field in ("num_train_steps", "checkpoint_every_steps", "num_classes", "image_size"):
        _positive(config, field, minimum=0)
    _positive(config, "keep_checkpoints")
    if not config.learning_rate > 0:
        raise ValueError(f"learning_rate={config.learning_rate!r}: must be > 0")
    if not config.weight_decay >= 0:
        raise ValueError(f"weight_decay={config.weight_decay!r}: must be >= 0")
    neuron_config(config)  # raises on lam, thresh, reset, surrogate
    n = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % n:
            raise ValueError(f"{field}={config[field]}: must be divisible by the device count "
                             f"({n})")


# --------------------------------------------------------------------------- optimiser
def learning_rate_schedule(config, steps_per_epoch: int, num_epochs: int):
    """Cosine annealing to 0, stepped once per epoch like the reference's CosineAnnealingLR."""
    cosine = optax.cosine_decay_schedule(config.learning_rate, num_epochs)
    return lambda step: cosine(step // steps_per_epoch)


def create_optimizer(config, schedule) -> optax.GradientTransformation:
    """SGD with momentum or Adam; L2 weight decay (added to the gradient, as PyTorch does) on
    conv and linear kernels only, never on BatchNorm parameters or biases."""
    def kernels_only(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    if config.optimizer == "sgd":
        opt = optax.sgd(schedule, momentum=config.momentum)
    else:
        opt = optax.adam(schedule)
    return optax.chain(optax.add_decayed_weights(config.weight_decay, kernels_only), opt)


# --------------------------------------------------------------------------- steps
def make_train_step(grad_fn, tx, nan_policy: str):
    """``train_step(state, batch) -> (state, metrics)``, pure. With ``nan_policy="skip"``, a
    step whose loss or gradient is not finite leaves the state unchanged."""
    def train_step(state, batch):
        (loss, aux), grads = grad_fn(state["params"], state["batch_stats"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates),
               "batch_stats": aux["batch_stats"], "opt_state": opt_state,
               "step": state["step"] + 1}
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        if nan_policy == "skip":
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                               {**state, "step": state["step"] + 1})
        accuracy = jnp.mean(jnp.argmax(aux["logits"], -1) == batch["label"])
        return new, {"loss": loss, "accuracy": accuracy, "finite": finite}
    return train_step


def make_eval_step(net, T: int, step_mode: str):
    """``eval_step(params, batch_stats, batch) -> sums`` of loss, correct and count, plus the
    per-layer firing rates of the batch; spike mode over T steps, running BN statistics."""
    def eval_step(params, batch_stats, batch):
        logits, rates = methods.spike_inference(net, params, batch_stats, batch["image"],
                                                T=T, step_mode=step_mode)
        mask = batch["mask"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
                "count": jnp.sum(mask), "rates": rates}
    return eval_step


def evaluate(eval_step, state, dataset, batch_size, shard) -> dict:
    totals, rates, n_batches = None, None, 0
    for batch in dataset.eval_batches(batch_size):
        out = eval_step(state["params"], state["batch_stats"], shard(batch))
        sums = {k: float(out[k]) for k in ("loss", "correct", "count")}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
        batch_rates = {k: float(v) for k, v in out["rates"].items()}
        rates = batch_rates if rates is None else {k: rates[k] + batch_rates[k] for k in rates}
        n_batches += 1
    return {"test_loss": totals["loss"] / totals["count"],
            "test_accuracy": totals["correct"] / totals["count"],
            "firing_rates": {k: v / n_batches for k, v in rates.items()}}


# --------------------------------------------------------------------------- sharding
def data_parallel(mesh):
    """Shardings: state replicated; batches split on their batch axis over ``data``.

    Each process supplies its own slice of the global batch (multi-host after
    ``jax.distributed.initialize()``); with one process this is a plain device_put.
    """
    replicated = NamedSharding(mesh, P())

    def shard(batch):
        def put(x):
            batch_axis = 1 if x.ndim == 5 else 0  # event batches are [T, B, ...]
            spec = [None] * x.ndim
            spec[batch_axis] = "data"
            return jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec)), x)
        return jax.tree.map(put, batch)

    return replicated, shard


def local_slice(batch, global_batch: int):
    """This process's part of a global batch."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    per = global_batch // n

    def take(x):
        axis = 1 if x.ndim == 5 else 0
        return np.take(x, np.arange(i * per, (i + 1) * per), axis=axis)
    return jax.tree.map(take, batch)


# --------------------------------------------------------------------------- state
def create_model(config, image_shape, num_classes) -> nnx.Module:
    """The config's model for inputs of ``image_shape`` (H, W, C)."""
    return models.create_model(
        config.model, num_classes=config.num_classes or num_classes,
        in_channels=image_shape[-1], image_size=image_shape[0],
        neuron=neuron_config(config), seed=config.seed)


def create_state(config, image_shape, num_classes, tx, model=None):
    """Model and optimiser state as the plain pytree {params, batch_stats, opt_state, step}.
    ``model`` (e.g. with imported weights) replaces a freshly initialised one."""
    model = model or create_model(config, image_shape, num_classes)
    net, params, batch_stats = methods.split_model(model)
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    return net, state


def checkpoint_managers(workdir, keep: int):
    """``latest`` (resume) and ``best`` (highest test accuracy) orbax managers. Orbax writes
    to a temporary directory and renames it on commit, so a killed run never leaves a
    half-written checkpoint that looks complete."""
    workdir = os.path.abspath(workdir)  # orbax needs absolute paths
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    latest = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=opts)
    best = ocp.CheckpointManager(os.path.join(workdir, "best"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    return latest, best


def restore_latest(manager, state, log):
    """Restore the newest readable checkpoint into ``state``'s structure and shardings.

    A corrupt newest checkpoint is reported, moved aside to ``corrupt_checkpoints/`` (so
    that the resumed run can write that step again) and the previous one is tried."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
            log(f"warning: checkpoint {step} is unreadable ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); moved aside, trying an older one")
            _quarantine(manager, step)
            continue
        return restored, step
    return state, None


def load_trained(config, workdir: str, *, best: bool = False, log=print):
    """``(dataset, net, state)`` of a run of ``config`` in ``workdir``, for analysis.

    ``state`` is the latest checkpoint, or with ``best=True`` the one with the highest test
    accuracy, as the plain pytree of :func:`create_state`. Raises FileNotFoundError when the
    run has no such checkpoint.
    """
    validate_config(config)
    dataset = data.load_dataset(config)
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch,
                                                         config.num_epochs))
    net, state = create_state(config, dataset.image_shape, dataset.num_classes, tx)
    latest, best_manager = checkpoint_managers(workdir, config.keep_checkpoints)
    state, step = restore_latest(best_manager if best else latest, state, log)
    if step is None:
        kind = "best" if best else "checkpoints"
        raise FileNotFoundError(f"workdir={workdir!r}: no readable checkpoint in {kind}/")
    return dataset, net, state


def _quarantine(manager, step):
    directory = os.fspath(manager.directory)
    aside = os.path.join(os.path.dirname(directory), "corrupt_checkpoints")
    if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        os.replace(os.path.join(directory, str(step)),
                   os.path.join(aside, f"{step}-{int(time.time())}"))
    manager.reload()


# --------------------------------------------------------------------------- records
def _append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_json_atomic(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _truncate_metrics(path, step):
    """Drop records written after ``step`` (a run killed after logging, before saving)."""
    kept = [r for r in _read_jsonl(path) if r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept


def plot_curves(history, workdir):
    """``curves.png`` (loss and accuracy per epoch) and ``firing_rates.png`` (last epoch)."""
    # The object API draws without pyplot's global backend, so notebooks keep inline plots.
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train")
    ax_acc.plot(epochs, [r["test_accuracy"] for r in history], label="test (spike mode)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "curves.png"), dpi=100)

    rates = history[-1]["firing_rates"]
    fig = Figure(figsize=(max(4, 0.4 * len(rates) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(rates)), list(rates.values()))
    ax.set_xticks(range(len(rates)), list(rates), rotation=70, fontsize=7)
    ax.set(ylabel="mean firing rate", title=f"firing rates, epoch {history[-1]['epoch']}")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "firing_rates.png"), dpi=100)


# --------------------------------------------------------------------------- main loop
def train_and_evaluate(config, workdir: str, *, log=print,
                       interrupt_at_step: int | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint. Returns the summary.

    SIGTERM (a cluster's preemption notice) or reaching ``interrupt_at_step`` checkpoints at
    the next step boundary and returns early with ``summary["interrupted"] = True``;
    rerunning resumes exactly there.
    """
    validate_config(config)
    workdir = os.path.abspath(workdir)
    dataset = data.load_dataset(config)
    if dataset.time_steps is not None and dataset.time_steps != config.T:
        raise ValueError(f"T={config.T}: dataset {dataset.name!r} gives {dataset.time_steps} "
                         f"frames per sample; set T to match")
    if config.num_classes and dataset.num_classes > config.num_classes:
        raise ValueError(f"num_classes={config.num_classes}: dataset {dataset.name!r} has "
                         f"{dataset.num_classes} classes; allowed is 0 (the dataset's) or "
                         f">= {dataset.num_classes}")
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={config.batch_size}: larger than the training set "
                         f"({len(dataset.train)} examples)")
    total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    schedule = learning_rate_schedule(config, steps_per_epoch, num_epochs)
    tx = create_optimizer(config, schedule)
    net, state = create_state(config, dataset.image_shape, dataset.num_classes, tx)

    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated, shard = data_parallel(mesh)
    state = jax.device_put(state, replicated)
    grad_fn = methods.make_grad_fn(config.method, net, T=config.T, step_mode=config.step_mode,
                                   rate_grad_scale=config.rate_grad_scale)
    train_step = jax.jit(make_train_step(grad_fn, tx, config.nan_policy),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(net, config.T, config.step_mode))

    os.makedirs(workdir, exist_ok=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    latest, best_manager = checkpoint_managers(workdir, config.keep_checkpoints)
    state, restored_step = restore_latest(latest, state, log)
    step = int(state["step"])
    history = _truncate_metrics(metrics_path, step) if restored_step is not None else []
    if restored_step is None and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if restored_step is not None:
        log(f"resumed from step {step} in {workdir}")
    best_accuracy = max((r["test_accuracy"] for r in history), default=-1.0)

    start_time = time.time()
    wall_before = history[-1]["wall_s"] if history else 0.0
    preempted = _PreemptionFlag()
    interrupted = False
    try:
        while step < total_steps and not interrupted:
            epoch = step // steps_per_epoch
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            start_in_epoch = step - epoch * steps_per_epoch
            batches = data.prefetch(dataset.train_batches(
                epoch=epoch, batch_size=config.batch_size, seed=config.seed,
                start_step=start_in_epoch))
            bar = _progress(config, epoch, num_epochs, start_in_epoch, epoch_steps)
            sums = {"loss": 0.0, "accuracy": 0.0, "count": 0}
            t_epoch, images_seen, pending = time.time(), 0, None
            for i, batch in zip(range(start_in_epoch, epoch_steps), batches):
                batch = shard(local_slice(batch, config.batch_size))
                state, metrics = train_step(state, batch)
                # Fetch the previous step's metrics now: the device never waits on the host.
                if pending is not None:
                    _consume(pending, sums, bar, config)
                pending = (step, metrics)
                step += 1
                images_seen += config.batch_size
                interrupted = preempted.is_set() or step == interrupt_at_step
                # At an epoch's end the epoch is evaluated and checkpointed as usual first.
                mid_epoch = step % steps_per_epoch != 0 and step < total_steps
                if mid_epoch and (interrupted or (config.checkpoint_every_steps and
                                                  step % config.checkpoint_every_steps == 0)):
                    _consume(pending, sums, bar, config)
                    pending = None
                    latest.save(step, args=ocp.args.StandardSave(state), force=True)
                    if interrupted:
                        break
                if bar is not None:
                    bar.update(1)
                if bar is not None and sums["count"]:  # metrics arrive one step late
                    bar.set_postfix(loss=f"{sums['loss'] / max(sums['count'], 1):.3f}",
                                    acc=f"{sums['accuracy'] / max(sums['count'], 1):.3f}",
                                    img_s=f"{images_seen / (time.time() - t_epoch):.0f}")
            if pending is not None:
                _consume(pending, sums, bar, config)
            if bar is not None:
                bar.close()
            if interrupted and mid_epoch:
                break
            seconds = time.time() - t_epoch
            record = {"epoch": epoch + 1, "step": step,
                      "train_loss": sums["loss"] / max(sums["count"], 1),
                      "train_accuracy": sums["accuracy"] / max(sums["count"], 1),
                      **evaluate(eval_step, state, dataset, config.eval_batch_size, shard),
                      "learning_rate": float(schedule(step - 1)), "seconds": seconds,
                      "images_per_s": images_seen / seconds,
                      "wall_s": wall_before + time.time() - start_time}
            history.append(record)
            if jax.process_index() == 0:
                _append_jsonl(metrics_path, record)
            log(f"epoch {record['epoch']}/{num_epochs} step {step}: train loss "
                f"{record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | test loss "
                f"{record['test_loss']:.4f} acc {record['test_accuracy']:.4f} | "
                f"{record['images_per_s']:.0f} img/s")
            if record["test_accuracy"] > best_accuracy:
                best_accuracy = record["test_accuracy"]
                best_manager.save(step, args=ocp.args.StandardSave(state), force=True)
            latest.save(step, args=ocp.args.StandardSave(state), force=True)
    finally:
        # Let a pending async save finish even when a step raised: it is the last good one.
        latest.wait_until_finished()
        best_manager.wait_until_finished()
        preempted.restore()
    if interrupted:
        log(f"interrupted at step {step}: checkpoint written; rerun to resume")

    summary = {
        "name": config.name, "model": config.model, "dataset": config.dataset,
        "method": config.method, "step_mode": config.step_mode, "T": config.T,
        "rate_grad_scale": config.rate_grad_scale, "steps": step,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_test_accuracy": best_accuracy if history else None,
        "wall_time_s": history[-1]["wall_s"] if history else 0.0,
        "devices": jax.device_count(), "interrupted": interrupted,
    }
    if jax.process_index() == 0 and not interrupted:
        _write_json_atomic(os.path.join(workdir, "summary.json"), summary)
        if config.plots and history:
            plot_curves(history, workdir)
    return summary


class _PreemptionFlag:
    """Set by SIGTERM while training; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self._set = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _consume(pending, sums, bar, config):
    step, metrics = pending
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
        if config.nan_policy == "stop":
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step + 1} (loss={metrics['loss']}); "
                f"stopped. The last good checkpoint is kept; set nan_policy='skip' to skip "
                f"such batches")
        if bar is not None:
            bar.write(f"warning: skipped step {step + 1}: non-finite loss or gradient")
        return
    sums["loss"] += float(metrics["loss"])
    sums["accuracy"] += float(metrics["accuracy"])
    sums["count"] += 1


def _progress(config, epoch, num_epochs, start, total):
    if not config.progress_bar or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{num_epochs}",
                leave=False, dynamic_ncols=True)
