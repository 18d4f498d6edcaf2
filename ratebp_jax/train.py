"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

One linear trainer (after big_vision / flax examples): config validation, data, model,
optimiser, data-parallel sharding, a jitted train step with donated state, spike-mode
evaluation, orbax checkpoints with automatic resume, and the workdir records
(``metrics.jsonl``, ``summary.json``, PNG plots). The gradient method is a config value
resolved once by ``methods.make_grad_fn``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ratebp_jax import agreement, checks, cli, data, methods, models, neurons, tracking
from ratebp_jax import workdir as wd
from ratebp_jax.data.fingerprint import fingerprint as data_fingerprint
from ratebp_jax.layers import POOL_TIES, STEP_MODES

OPTIMIZERS = ("sgd", "adam")
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient stopped the run."""


# --------------------------------------------------------------------------- validation
def _method_list(config, field):
    """A non-empty list (or tuple) of names from ``methods.METHODS``."""
    value = config[field]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{field}={value!r}: must be a non-empty list of method names; "
                         f"{checks.allowed_values(methods.METHODS)}")
    checks.check_choices(field, names, methods.METHODS)


def neuron_config(config) -> neurons.NeuronConfig:
    return neurons.NeuronConfig(lam=config.lam, thresh=config.thresh, reset=config.reset,
                                v_reset=config.v_reset, surrogate=config.surrogate,
                                alpha=config.surrogate_alpha,
                                learnable_leak=config.learnable_leak)


def validate_config(config, *, devices: bool = True) -> None:
    """Check every field's type, range and finiteness before anything runs or is written;
    each failure names the field, the value and what is allowed. ``devices=False`` skips
    the divisibility by the device count, which would start JAX's backend (before
    ``jax.distributed.initialize()`` it must not)."""
    if not isinstance(config.name, str) or not config.name or os.sep in config.name:
        raise ValueError(f"name={config.name!r}: must be a non-empty name without {os.sep!r}")
    for field in ("data_dir", "data_path"):
        if not isinstance(config[field], str):
            raise ValueError(f"{field}={config[field]!r}: must be a path (a string)")
    for field, allowed in (("dataset", data.LOADERS), ("compute_dtype", models.COMPUTE_DTYPES),
                           ("pool_ties", POOL_TIES), ("method", methods.METHODS),
                           ("step_mode", STEP_MODES),
                           ("rate_grad_scale", methods.RATE_GRAD_SCALES),
                           ("optimizer", OPTIMIZERS), ("nan_policy", NAN_POLICIES)):
        checks.check_choice(field, config[field], allowed)
    models.resolve(config.model)  # a zoo name, or package.module:Factory (imported here)
    models.check_model_kwargs(config.model, config.model_kwargs)
    for field in ("T", "batch_size", "eval_batch_size", "num_epochs", "keep_checkpoints",
                  "log_every_steps"):
        checks.check_int(field, config[field], 1)
    for field in ("num_train_steps", "checkpoint_every_steps", "num_classes", "image_size",
                  "seed", "augment_crop_padding", "data_workers", "grad_agreement_every_steps"):
        checks.check_int(field, config[field], 0)
    _method_list(config, "grad_agreement_methods")
    checks.check_number("grad_agreement_warn_cosine", config.grad_agreement_warn_cosine, 0.0, 1.0)
    for field in ("augment", "augment_flip", "progress_bar", "plots", "tensorboard"):
        checks.check_bool(field, config[field])
    checks.check_number("surrogate_alpha", config.surrogate_alpha, 0.0, low_open=True)
    checks.check_number("v_reset", config.v_reset)
    neuron_config(config)  # lam, thresh, reset and surrogate, checked by the neuron itself
    if config.learnable_leak:
        for field in ("method", "grad_agreement_methods"):
            names = [config[field]] if isinstance(config[field], str) else config[field]
            if "ottt" in names:
                raise ValueError(f"{field}={config[field]!r} with learnable_leak=True: "
                                 f"{methods.LEARNABLE_LEAK_OTTT}")
    checks.check_number("learning_rate", config.learning_rate, 0.0, low_open=True)
    checks.check_number("momentum", config.momentum, 0.0, 1.0, high_open=True)
    checks.check_number("weight_decay", config.weight_decay, 0.0)
    n = jax.device_count() if devices else 1
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % n:
            raise ValueError(f"{field}={config[field]}: must be divisible by the device count "
                             f"({n})")


def check_dataset(config, dataset) -> None:
    """What the config asks of the loaded dataset."""
    if dataset.time_steps is not None and dataset.time_steps != config.T:
        raise ValueError(f"T={config.T}: dataset {dataset.name!r} gives {dataset.time_steps} "
                         f"frames per sample; set T to match")
    if config.num_classes and dataset.num_classes > config.num_classes:
        raise ValueError(f"num_classes={config.num_classes}: dataset {dataset.name!r} has "
                         f"{dataset.num_classes} classes; allowed is 0 (the dataset's) or "
                         f">= {dataset.num_classes}")
    if dataset.steps_per_epoch(config.batch_size) < 1:
        raise ValueError(f"batch_size={config.batch_size}: larger than the training set "
                         f"({len(dataset.train)} examples)")


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
def zero_sums():
    """The epoch's running train sums, carried in the state (and so in every checkpoint):
    a run resumed mid-epoch records the whole epoch's train loss and accuracy."""
    return {"loss": jnp.zeros((), jnp.float32), "accuracy": jnp.zeros((), jnp.float32),
            "count": jnp.zeros((), jnp.int32)}


def make_train_step(grad_fn, tx, nan_policy: str):
    """``train_step(state, batch) -> (state, metrics)``, pure. With ``nan_policy="skip"``, a
    step whose loss or gradient is not finite leaves the parameters, optimiser and BN state
    unchanged. Non-finite steps never enter the epoch sums."""
    def train_step(state, batch):
        (loss, aux), grads = grad_fn(state["params"], state["batch_stats"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
        accuracy = jnp.mean(jnp.argmax(aux["logits"], -1) == batch["label"])
        sums = state["epoch_sums"]
        sums = {"loss": sums["loss"] + jnp.where(finite, loss, 0.0),
                "accuracy": sums["accuracy"] + jnp.where(finite, accuracy, 0.0),
                "count": sums["count"] + finite.astype(jnp.int32)}
        new = {"params": optax.apply_updates(state["params"], updates),
               "batch_stats": aux["batch_stats"], "opt_state": opt_state,
               "step": state["step"] + 1, "epoch_sums": sums}
        if nan_policy == "skip":
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new,
                               {**state, "step": new["step"], "epoch_sums": sums})
        count = jnp.maximum(sums["count"], 1)
        return new, {"loss": loss, "accuracy": accuracy, "finite": finite,
                     "epoch_loss": sums["loss"] / count,
                     "epoch_accuracy": sums["accuracy"] / count}
    return train_step


def on_leaves(step_fn, treedef):
    """``step_fn(state, batch)`` as a function of the state's leaves: ``(leaves, batch) ->
    (new leaves, metrics)``, with ``treedef`` the state's structure.

    jit flattens its arguments and unflattens its results at every call. For the NNX
    ``State``s and ``Variable``s of the state that runs Python for every node; for a list
    of arrays it stays in jit's C++ path, which matters for small steps (docs/RESULTS.md,
    "The training loop against a bare loop"). The trainer carries the leaves and builds
    the state only to save, evaluate or log it."""
    def step(leaves, batch):
        state, metrics = step_fn(jax.tree.unflatten(treedef, leaves), batch)
        new_leaves, new_treedef = jax.tree.flatten(state)
        if new_treedef != treedef:  # checked once, when jit traces
            raise ValueError(f"the step returned a state of another structure: "
                             f"{new_treedef} instead of {treedef}")
        return new_leaves, metrics
    return step


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
    for batch in dataset.eval_batches(batch_size, jax.process_index(), jax.process_count()):
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
    ``jax.distributed.initialize()``; the loaders read only that slice). With one process
    the batch is the global one, and it is transferred by a jitted identity with the
    batch shardings: jit's C++ argument path moves a host batch several times faster than
    ``jax.device_put``'s Python dispatch, which the loop would pay every step
    (docs/RESULTS.md, "The training loop against a bare loop"). One identity is compiled
    per batch structure (train batches, evaluation batches with their mask).
    """
    replicated = NamedSharding(mesh, P())

    def sharding(x):
        # event batches are [T, B, H, W, C], feature sequences [T, B, F]
        batch_axis = 1 if x.ndim in (3, 5) else 0
        spec = [None] * x.ndim
        spec[batch_axis] = "data"
        return NamedSharding(mesh, P(*spec))

    transfers = {}

    def shard(batch):
        if jax.process_count() > 1:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding(x), x), batch)
        leaves, treedef = jax.tree.flatten(batch)
        key = (treedef, tuple(x.ndim for x in leaves))
        if key not in transfers:
            shardings = jax.tree.map(sharding, batch)
            transfers[key] = jax.jit(lambda b: b, in_shardings=(shardings,),
                                     out_shardings=shardings)
        return transfers[key](batch)

    return replicated, shard


# --------------------------------------------------------------------------- state
def create_model(config, image_shape, num_classes) -> nnx.Module:
    """The config's model for inputs of ``image_shape``: (H, W, C) images, or (F,) feature
    vectors, which a factory gets as a 1x1 image of F channels."""
    return models.create_model(
        config.model, num_classes=config.num_classes or num_classes,
        in_channels=image_shape[-1],
        image_size=image_shape[0] if len(image_shape) == 3 else 1,
        neuron=neuron_config(config), seed=config.seed, compute_dtype=config.compute_dtype,
        pool_ties=config.pool_ties, model_kwargs=config.model_kwargs)


def create_state(config, image_shape, num_classes, tx, model=None):
    """Model and optimiser state as the plain pytree {params, batch_stats, opt_state, step,
    epoch_sums}.
    ``model`` (e.g. with imported weights) replaces a freshly initialised one."""
    model = model or create_model(config, image_shape, num_classes)
    net, params, batch_stats = methods.split_model(model)
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32), "epoch_sums": zero_sums()}
    return net, state


def load_trained(config, workdir: str, *, best: bool = False, log=print):
    """``(dataset, net, state)`` of a run of ``config`` in ``workdir``, for analysis.

    ``state`` is the latest checkpoint, or with ``best=True`` the one with the highest test
    accuracy, as the plain pytree of :func:`create_state`. Raises FileNotFoundError when the
    run has no such checkpoint.
    """
    validate_config(config)
    workdir = os.path.abspath(workdir)
    kind = "best" if best else "checkpoints"
    if not os.path.isdir(os.path.join(workdir, kind)):
        raise FileNotFoundError(f"workdir={workdir!r}: no readable checkpoint in {kind}/")
    wd.check_same_run(workdir, config)
    dataset = data.load_dataset(config)
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch,
                                                         config.num_epochs))
    net, state = create_state(config, dataset.image_shape, dataset.num_classes, tx)
    latest, best_manager = wd.checkpoint_managers(workdir, config.keep_checkpoints,
                                                  create=False)
    state, step = wd.restore_latest(best_manager if best else latest, state, log, workdir)
    if step is None:
        raise FileNotFoundError(f"workdir={workdir!r}: no readable checkpoint in {kind}/")
    return dataset, net, state


# --------------------------------------------------------------------------- records
def plot_curves(history, workdir):
    """``curves.png`` (loss and accuracy per epoch) and ``firing_rates.png`` (every LIF
    layer's mean firing rate over the epochs, as a layer x epoch map in which a dead or
    saturated layer shows as it appears). Drawn at every epoch's end."""
    # The object API draws without pyplot's global backend, so notebooks keep inline plots.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # Fixed margins: tight_layout would lay the figure out by drawing it once more, which
    # doubles the cost of a drawing made at every epoch.
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.91, wspace=0.22)
    wd.save_figure_atomic(fig, os.path.join(workdir, "curves.png"))

    layers = list(history[-1]["firing_rates"])
    rates = [[r["firing_rates"].get(layer, float("nan")) for r in history] for layer in layers]
    width, height = min(12, 5.5 + 0.25 * len(epochs)), 1.8 + 0.3 * len(layers)
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    image = ax.imshow(rates, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      extent=(epochs[0] - 0.5, epochs[-1] + 0.5, len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", title="firing rate per LIF layer")
    fig.colorbar(image, ax=ax, label="rate (0 dead, 1 saturated)")
    label_inches = 0.3 + 0.06 * max(len(layer) for layer in layers)  # 7-point tick labels
    fig.subplots_adjust(left=min(0.5, label_inches / width), right=0.97,
                        bottom=0.6 / height, top=1 - 0.35 / height)
    wd.save_figure_atomic(fig, os.path.join(workdir, "firing_rates.png"))


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """What stays fixed while a run trains: its config and workdir, data, schedule, compiled
    programs and checkpoint managers."""
    config: Any
    workdir: str
    log: Callable
    dataset: Any
    fingerprint: dict | None
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    schedule: Callable
    net: Any
    treedef: Any
    train_step: Callable
    eval_step: Callable
    shard: Callable
    replicated: Any
    latest: Any = None
    best: Any = None
    agreement: Any = None
    tracker: Any = None
    figures: Any = None

    @property
    def writes_records(self) -> bool:
        return jax.process_index() == 0


@dataclasses.dataclass
class Progress:
    """What training changes: the state (as its leaves, see ``on_leaves``), the next step,
    the epoch records so far, and whether the run was asked to stop."""
    leaves: list
    step: int
    history: list
    wall_before: float
    started: float = dataclasses.field(default_factory=time.time)
    compiled: bool = False
    interrupted: bool = False


def train_and_evaluate(config, workdir: str, *, log=print,
                       interrupt_at_step: int | None = None) -> dict[str, Any]:
    """Train ``config`` in ``workdir``, resuming from its latest checkpoint. Returns the summary.

    Everything is validated before the workdir is touched: a bad config, bad data, or a
    workdir that holds another run or was trained on other data (``workdir.RunMismatch``)
    raise with nothing written. A run that already wrote every artefact returns its summary
    with ``already_complete`` set and changes nothing. SIGTERM or Ctrl-C (a cluster's
    preemption notice, a user) or reaching ``interrupt_at_step`` checkpoints at the next step
    and returns early with ``summary["interrupted"] = True``; rerunning resumes exactly there.
    A crash at any write resumes too (docs/DESIGN.md section 7).
    """
    run, state, done = set_up_run(config, workdir, log)
    if done is not None:
        log(f"already complete: {os.path.abspath(workdir)} trained {done['steps']} steps "
            f"(final test accuracy {done['final_test_accuracy']:.4f}); nothing was changed")
        return {**done, "already_complete": True}
    progress = open_workdir(run, state)
    stop = _StopRequest(log)
    # One iterator over all remaining steps, across epochs. Its whole state is the next step
    # (each batch is a pure function of its step), which the checkpoint holds as "step".
    batches = data.train_iterator(
        run.dataset, batch_size=config.batch_size, seed=config.seed,
        total_steps=run.total_steps, start_step=progress.step,
        process_index=jax.process_index(), process_count=jax.process_count(),
        workers=config.data_workers)
    try:
        device_batches = on_device(batches, run.shard)
        while progress.step < run.total_steps and not progress.interrupted:
            timing = train_epoch(run, progress, device_batches, stop, interrupt_at_step)
            if timing is not None:
                close_epoch(run, progress, timing)
    except NonFiniteError as e:
        _wait_for_saves(run)
        wd.mark_state(run.workdir, "stopped", progress.step, reason="non-finite loss")
        raise NonFiniteError(f"{e}. {_checkpoint_kept(run.workdir)}; set nan_policy='skip' "
                             f"to skip such batches") from None
    except KeyboardInterrupt:  # a second Ctrl-C
        _wait_for_saves(run)
        wd.mark_state(run.workdir, "stopped", progress.step, reason="Ctrl-C")
        raise
    finally:
        batches.close()  # stops the data workers
        # Let a pending async save finish even when a step raised: it is the last good one.
        _wait_for_saves(run)
        stop.restore()
    if progress.interrupted:
        wd.mark_state(run.workdir, "interrupted", progress.step)
        log(f"interrupted at step {progress.step}: checkpoint written; rerun the same command "
            f"to resume")
        return summarize(run, progress, artefacts=[])
    return finish_run(run, progress)


def set_up_run(config, workdir: str, log):
    """``(run, initial state, None)``, or ``(None, None, summary)`` of a run that is already
    complete, which returns before building the model or compiling anything. Validates the
    config, the workdir and the data; writes nothing."""
    validate_config(config)
    workdir = os.path.abspath(workdir)
    wd.check_path(workdir)
    wd.check_same_run(workdir, config)  # the data's fingerprint included
    fingerprint = data_fingerprint(config)
    dataset = data.load_dataset(config)
    check_dataset(config, dataset)
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    done = wd.completed_summary(workdir, total_steps)
    if done is not None:  # nothing to build for a run that only says it is complete
        return None, None, done
    schedule = learning_rate_schedule(config, steps_per_epoch, num_epochs)
    tx = create_optimizer(config, schedule)
    net, state = create_state(config, dataset.image_shape, dataset.num_classes, tx)
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated, shard = data_parallel(mesh)
    state = jax.device_put(state, replicated)
    grad_fn = methods.make_grad_fn(config.method, net, T=config.T, step_mode=config.step_mode,
                                   rate_grad_scale=config.rate_grad_scale)
    treedef = jax.tree.structure(state)
    train_step = jax.jit(on_leaves(make_train_step(grad_fn, tx, config.nan_policy), treedef),
                         out_shardings=(replicated, replicated), donate_argnums=0)
    run = Run(config, workdir, log, dataset, fingerprint, steps_per_epoch, total_steps,
              num_epochs, schedule, net, treedef, train_step,
              jax.jit(make_eval_step(net, config.T, config.step_mode)), shard, replicated)
    return run, state, None


def open_workdir(run: Run, state) -> Progress:
    """Restore the latest checkpoint, and bring every record to it: metrics and agreement
    records after it are dropped (they are made again), and ``best/`` holds the best epoch
    up to it. Then ``config.json`` records the config and the data's fingerprint."""
    config = run.config
    os.makedirs(run.workdir, exist_ok=True)
    run.latest, run.best = wd.checkpoint_managers(run.workdir, config.keep_checkpoints)
    state, restored = wd.restore_latest(run.latest, state, run.log, run.workdir)
    metrics_path = os.path.join(run.workdir, wd.METRICS_FILE)
    if restored is not None:
        history = wd.truncate_jsonl(metrics_path, restored)
    else:
        history = []
        if os.path.exists(metrics_path) and run.writes_records:
            os.remove(metrics_path)
    run.agreement = _agreement_logger(config, run.net, state, run.dataset, run.workdir,
                                      restored)
    wd.reconcile_best(run.best, history, state, restored)
    run.tracker = tracking.open_tracker(run.workdir, config, restored)
    run.figures = _Figures() if config.plots and run.writes_records else None
    wd.write_config(run.workdir, config, run.fingerprint)
    wd.mark_state(run.workdir, "running", restored or 0)
    if restored is not None:
        run.log(f"resumed from step {restored} in {run.workdir}")
    return Progress(jax.tree.leaves(state), int(state["step"]), history,
                    wall_before=history[-1]["wall_s"] if history else 0.0)


def train_epoch(run: Run, progress: Progress, batches, stop, interrupt_at_step):
    """Train from ``progress.step`` to the end of its epoch. Returns the epoch's timing, or
    None when a stop request ended it early, after a checkpoint at that step.

    The host reads the steps' metrics back every ``log_every_steps`` steps, and before a
    save, so that a non-finite step is found before it is checkpointed. In between, the
    device runs ahead without waiting for Python, and the newest step stays unread so that
    the device computes it while the host prepares the next batch.
    """
    config = run.config
    epoch, start = divmod(progress.step, run.steps_per_epoch)
    end = min(run.steps_per_epoch, run.total_steps - epoch * run.steps_per_epoch)
    if start == 0:
        state = jax.tree.unflatten(run.treedef, progress.leaves)
        state = {**state, "epoch_sums": jax.device_put(zero_sums(), run.replicated)}
        progress.leaves = jax.tree.leaves(state)
    bar = _progress_bar(config, epoch, run.num_epochs, start, end)
    say = bar.write if bar is not None else run.log
    clock = _EpochClock(config.batch_size)
    pending, mid_epoch = [], False
    for _, batch in zip(range(start, end), batches):
        if run.agreement is not None and run.agreement.due(progress.step):
            # before train_step donates the leaves
            records = run.agreement.log(
                progress.step, jax.tree.unflatten(run.treedef, progress.leaves), batch)
            if run.tracker is not None:
                run.tracker.agreement(records)
        progress.leaves, metrics = run.train_step(progress.leaves, batch)
        clock.stepped(metrics, first=not progress.compiled)
        progress.compiled = True
        pending.append((progress.step, metrics))
        progress.step += 1
        progress.interrupted = stop.requested() or progress.step == interrupt_at_step
        every = config.checkpoint_every_steps
        mid_epoch = progress.step < epoch * run.steps_per_epoch + end
        if mid_epoch and (progress.interrupted or (every and progress.step % every == 0)):
            read_metrics(run, pending, bar, say)
            pending = []
            save_latest(run, progress.step, jax.tree.unflatten(run.treedef, progress.leaves))
            if progress.interrupted:
                break
        elif len(pending) > config.log_every_steps:
            read_metrics(run, pending[:-1], bar, say)
            pending = pending[-1:]
        if bar is not None:
            bar.update(1)
    read_metrics(run, pending, bar, say)
    if bar is not None:
        bar.close()
    return None if progress.interrupted and mid_epoch else clock.timing()


def close_epoch(run: Run, progress: Progress, timing: dict) -> None:
    """Evaluate the epoch, record it, and checkpoint it: the metrics line, then the latest
    checkpoint, then the best one when the epoch is the best so far (the order that
    ``workdir.reconcile_best`` relies on)."""
    state = jax.tree.unflatten(run.treedef, progress.leaves)
    sums = jax.device_get(state["epoch_sums"])
    count = max(int(sums["count"]), 1)
    record = {"epoch": progress.step // run.steps_per_epoch
              + (progress.step % run.steps_per_epoch > 0), "step": progress.step,
              "train_loss": float(sums["loss"]) / count,
              "train_accuracy": float(sums["accuracy"]) / count,
              **evaluate(run.eval_step, state, run.dataset, run.config.eval_batch_size,
                         run.shard),
              "learning_rate": float(run.schedule(progress.step - 1)), **timing,
              "wall_s": progress.wall_before + time.time() - progress.started}
    progress.history.append(record)
    if run.writes_records:
        wd.append_jsonl(os.path.join(run.workdir, wd.METRICS_FILE), record)
    if run.figures is not None:
        run.figures.draw(progress.history, run.workdir)
    if run.tracker is not None:
        run.tracker.epoch(record)
    speed = (f"{record['images_per_s']:.0f} img/s" if record["images_per_s"] is not None
             else "no timed steps")
    compiled = f", compile {record['compile_s']:.1f} s" if record["compile_s"] else ""
    run.log(f"epoch {record['epoch']}/{run.num_epochs} step {progress.step}: train loss "
            f"{record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | test loss "
            f"{record['test_loss']:.4f} acc {record['test_accuracy']:.4f} | {speed}{compiled}")
    save_latest(run, progress.step, state)
    if wd.best_step(progress.history) == progress.step:
        run.best.save(progress.step, args=ocp.args.StandardSave(state), force=True)


def save_latest(run: Run, step: int, state) -> None:
    """Checkpoint ``state`` as the latest. The events so far are flushed, and a best save
    still in flight is waited for, first: a committed latest checkpoint implies that every
    event and best checkpoint before it is on disk."""
    if run.tracker is not None:
        run.tracker.flush()
    run.best.wait_until_finished()
    run.latest.save(step, args=ocp.args.StandardSave(state), force=True)


def finish_run(run: Run, progress: Progress) -> dict[str, Any]:
    """Leave one checkpoint in ``best/``, draw the figures, then write ``summary.json``
    last: a summary on disk means every artefact it lists exists
    (``workdir.completed_summary``)."""
    wd.prune_best(run.best, progress.history)
    artefacts = [wd.CONFIG_FILE, wd.METRICS_FILE] if progress.history else [wd.CONFIG_FILE]
    if run.writes_records and run.config.plots and progress.history:
        _Figures.ensure(run.figures, progress.history, run.workdir)
        artefacts += ["curves.png", "firing_rates.png"]
    if run.writes_records and run.config.plots and run.agreement is not None:
        records = wd.read_jsonl(run.agreement.path)
        if records:
            agreement.plot_agreement(records, os.path.join(run.workdir, agreement.PLOT_FILE))
            artefacts.append(agreement.PLOT_FILE)
    summary = summarize(run, progress, artefacts)
    if run.writes_records:
        wd.write_json_atomic(os.path.join(run.workdir, wd.SUMMARY_FILE), summary)
    return summary


def summarize(run: Run, progress: Progress, artefacts: list[str]) -> dict[str, Any]:
    config, history = run.config, progress.history
    best = wd.best_step(history)
    return {
        "name": config.name, "model": config.model, "dataset": config.dataset,
        "method": config.method, "step_mode": config.step_mode, "T": config.T,
        "rate_grad_scale": config.rate_grad_scale, "steps": progress.step,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "best_test_accuracy": next((r["test_accuracy"] for r in history if r["step"] == best),
                                   None),
        "wall_time_s": history[-1]["wall_s"] if history else 0.0,
        "devices": jax.device_count(), "processes": jax.process_count(),
        "interrupted": progress.interrupted, "artefacts": artefacts,
    }


def _wait_for_saves(run: Run) -> None:
    """Let the saves and drawings in flight finish, and close the event files."""
    for manager in (run.latest, run.best):
        if manager is not None:
            manager.wait_until_finished()
    if run.tracker is not None:
        run.tracker.close()
        run.tracker = None
    if run.figures is not None:
        run.figures.wait()


class _Figures:
    """Draws ``plot_curves`` at an epoch's end on one background thread, at most one drawing
    in flight, so that the next epoch trains while matplotlib lays out text and ticks. Each
    figure is written atomically, so a crash at any moment leaves whole figures."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "figures")
        self._pending, self._drawn = None, 0

    def draw(self, history: list[dict], workdir: str) -> None:
        self.wait()
        self._pending = self._pool.submit(plot_curves, list(history), workdir)
        self._drawn = len(history)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a drawing's error is raised here

    @staticmethod
    def ensure(figures, history: list[dict], workdir: str) -> None:
        """The figures of the whole ``history`` on disk, drawing them unless already drawn."""
        if figures is not None:
            figures.wait()
            if figures._drawn == len(history):
                return
        plot_curves(history, workdir)


def _checkpoint_kept(workdir: str) -> str:
    step = wd.last_checkpoint(workdir)
    if step is None:
        return "No checkpoint was written yet, so a rerun starts from step 0"
    return f"The last good checkpoint, step {step}, is kept"


def _agreement_logger(config, net, state, dataset, workdir, restored_step):
    """The run's :class:`agreement.AgreementLogger`, or None when logging is off. Its
    records after the restored step are dropped (they are logged again), and a run that
    starts afresh starts a fresh file."""
    if not config.grad_agreement_every_steps:
        return None
    logger = agreement.AgreementLogger(net, state["params"], state["batch_stats"],
                                       dataset.image_shape, config, workdir)
    if os.path.exists(logger.path) and jax.process_index() == 0:
        if restored_step is None:
            os.remove(logger.path)
        else:
            wd.truncate_jsonl(logger.path, restored_step - 1)
    return logger


class _EpochClock:
    """An epoch's timing. The process's first step compiles the train step, so its time is
    reported as ``compile_s`` (compilation plus that one step) and left out of images/s."""

    def __init__(self, batch_size: int):
        self.batch_size, self.start = batch_size, time.time()
        self.timed_from, self.timed_images, self.compile_s = self.start, 0, 0.0

    def stepped(self, metrics, *, first: bool) -> None:
        if first:
            jax.block_until_ready(metrics)
            self.timed_from = time.time()
            self.compile_s = self.timed_from - self.start
        else:
            self.timed_images += self.batch_size

    def timing(self) -> dict:
        now = time.time()
        speed = self.timed_images / (now - self.timed_from) if self.timed_images else None
        return {"seconds": now - self.start, "images_per_s": speed,
                "compile_s": self.compile_s}


class _StopRequest:
    """SIGTERM (a cluster's preemption notice) or a first Ctrl-C ask the loop to checkpoint
    and return at the next step; a second Ctrl-C stops at once (KeyboardInterrupt), losing
    the steps since the last checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log):
        self._set, self._log, self._previous = False, log, {}
        self._previous_hook = sys.unraisablehook
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            cli.keep_ctrl_c()  # a second Ctrl-C raised inside a finaliser is not dropped

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self._set:
            raise KeyboardInterrupt
        self._set = True
        if signum == signal.SIGINT:
            self._log("interrupt: checkpointing at the next step (Ctrl-C again stops at once)")

    def requested(self) -> bool:
        return self._set

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = self._previous_hook


def on_device(batches, shard, ahead: int = 1):
    """Yield ``shard(batch)`` with the next ``ahead`` batches already transferred, so that
    each step's data is on the devices when the step starts (transfers are asynchronous).
    Written by hand: Flax's ``prefetch_to_device`` is for pmap, not ``jax.sharding``."""
    queue = collections.deque()
    for batch in batches:
        queue.append(shard(batch))
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


def read_metrics(run: Run, pending, bar, say) -> None:
    """Read the pending steps' metrics back in one transfer and check them in order: a
    non-finite step raises NonFiniteError (or is reported, with ``nan_policy="skip"``).
    The finite steps' mean loss and accuracy go to TensorBoard at the step they reach, and
    the bar shows the epoch's running means."""
    if not pending:
        return
    fetched = jax.device_get([metrics for _, metrics in pending])
    for (step, _), metrics in zip(pending, fetched):
        if metrics["finite"]:
            continue
        if run.config.nan_policy == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at step {step + 1} "
                                 f"(loss={metrics['loss']}); stopped")
        say(f"warning: skipped step {step + 1}: non-finite loss or gradient")
    finite = [m for m in fetched if m["finite"]]
    if run.tracker is not None and finite:
        run.tracker.train(pending[-1][0] + 1, sum(float(m["loss"]) for m in finite) / len(finite),
                          sum(float(m["accuracy"]) for m in finite) / len(finite))
    if bar is not None:
        bar.set_postfix(loss=f"{fetched[-1]['epoch_loss']:.3f}",
                        acc=f"{fetched[-1]['epoch_accuracy']:.3f}")


def _progress_bar(config, epoch, num_epochs, start, total):
    """A tqdm bar for the epoch, on process 0, when output goes to a terminal or a notebook
    (in a log file a bar's redraws would bloat it; the epoch's line remains)."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    if not config.progress_bar or not interactive or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{num_epochs}",
                leave=False, dynamic_ncols=True, unit="img", unit_scale=config.batch_size)
