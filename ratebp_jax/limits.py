"""Where rate-BP stops being BPTT: inputs whose information moves from the firing rate into
spike timing, and one measurement of both methods on each.

Rate-BP's gradient treats each neuron through its firing rate (docs/DESIGN.md section
2.2): the rate pass sees the time mean of the input, and a neuron's eligibility is its
response to a change of its mean input. So it can be exact only as far as the label is
carried by rates. The tasks here hold the network fixed and move the information:

* :func:`static_digits`: scikit-learn's 8x8 digits, each image (intensities in [0, 1])
  repeated at every step. Everything is in the rate; nothing changes in time.
* :func:`rate_coded_digits`: each pixel a Bernoulli spike train with the pixel's intensity
  as its probability per step. The rate carries the label, the timing is noise.
* :func:`temporal_order`: two channels each fire one pulse, one step apart, at the same
  pixels; the label says which channel fired first. Every class has the same rate in every
  input channel (one spike per pulse pixel, the same background noise), so a classifier
  of the input's rates is at chance by construction. The network's own dynamics can still
  turn order into rates (a leaky membrane sums a pulse and its successor unequally).

:func:`measure` trains BPTT and rate-BP on a task from the same initial weights and
reports their test accuracy, the same with each test sample's time steps shuffled
(:func:`shuffle_time`: how much the trained network uses time), and the agreement of
rate-BP's gradient with BPTT's (cosine and norm ratio, overall and per layer, in the
records' format of ``agreement``) at the initial weights and at the weights rate-BP
trained to. ``notebooks/06_where_rate_bp_breaks.ipynb`` runs it on these tasks;
``experiments/where_rate_bp_breaks.py`` also on N-MNIST event frames (docs/RESULTS.md,
"Where rate-BP stops being BPTT").

Inputs are ``[N, T, H, W, C]`` float32 (sample-major); batches are made time-major.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ratebp_jax import agreement, analysis, methods, models, train
from ratebp_jax.data import arrays

METHODS = ("bptt", "rate")


@dataclasses.dataclass(frozen=True)
class Task:
    """A classification task on spike-train inputs ``x_*`` ``[N, T, H, W, C]``, labels
    ``y_*`` ``[N]``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def T(self) -> int:
        return self.x_train.shape[1]


def _digits():
    images, labels = arrays.digits_images_and_labels()
    order = np.load(arrays.DIGITS_SPLIT).astype(np.intp)
    train_idx, test_idx = order[:arrays.DIGITS_TRAIN], order[arrays.DIGITS_TRAIN:]
    p = (np.clip(images, 0, 16) / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
    return p[train_idx], labels[train_idx], p[test_idx], labels[test_idx]


def static_digits(T: int) -> Task:
    """The digits, each image repeated at every one of the T steps."""
    p_train, y_train, p_test, y_test = _digits()
    repeat = lambda p: np.repeat(p[:, None], T, axis=1)  # noqa: E731
    return Task("static", repeat(p_train), y_train, repeat(p_test), y_test, 10)


def rate_coded_digits(T: int, seed: int = 0) -> Task:
    """The digits as Bernoulli spike trains: pixel intensity = spike probability per step."""
    p_train, y_train, p_test, y_test = _digits()
    rng = np.random.default_rng(seed)
    code = lambda p: (rng.random((len(p), T) + p.shape[1:]) < p[:, None]).astype(  # noqa: E731
        np.float32)
    return Task("rate code", code(p_train), y_train, code(p_test), y_test, 10)


def temporal_order(T: int, *, n_train: int = 1024, n_test: int = 512, size: int = 8,
                   pulse_fraction: float = 0.5, noise: float = 0.05, seed: int = 0) -> Task:
    """Two channels, A and B; in each sample a random half of the pixels (the same for both
    channels) pulse once in A and once in B, one step apart, at a random step. Label 0: A
    first; label 1: B first. Every other pixel and step of both channels spikes with
    probability ``noise``. Both classes have the same distribution of spike counts in every
    channel and pixel: the order is the only information."""
    if T < 2:
        raise ValueError(f"T={T}: the temporal-order task needs T >= 2")
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 2, n)
        x = (rng.random((n, T, size, size, 2)) < noise).astype(np.float32)
        pulse = rng.random((n, size, size)) < pulse_fraction
        t0 = rng.integers(0, T - 1, n)
        for i in range(n):
            first, second = (0, 1) if y[i] == 0 else (1, 0)
            x[i, :, pulse[i]] = 0.0  # a pulse pixel spikes only in its pulses
            x[i, t0[i], pulse[i], first] = 1.0
            x[i, t0[i] + 1, pulse[i], second] = 1.0
        return x, y

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    return Task("temporal order", x_train, y_train, x_test, y_test, 2)


def shuffle_time(x_NxT, seed: int = 0) -> np.ndarray:
    """``x`` with each sample's time steps in a random order of its own."""
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random(x_NxT.shape[:2]), axis=1)
    return np.take_along_axis(x_NxT, perm.reshape(perm.shape + (1,) * (x_NxT.ndim - 2)),
                              axis=1)


def _time_major(x_NxT):
    return jnp.swapaxes(jnp.asarray(x_NxT), 0, 1)


def _batch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """``[steps, batch_size]`` indices into ``n`` samples: epochs of random permutations."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[
        :steps * batch_size].reshape(steps, batch_size)


def measure(task: Task, *, model: str = "vgg_tiny", seeds=(0, 1, 2, 3, 4), steps: int = 120,
            batch_size: int = 64, learning_rate: float = 1e-2, agreement_batch: int = 128,
            log_every: int = 0, step_mode: str = "multi") -> dict:
    """Train BPTT and rate-BP on ``task`` and measure them, once per seed of ``seeds``
    (the initial weights and the batches; both methods start from the same weights). Adam,
    ``steps`` steps of ``batch_size``. The seeds run one after the other on programs
    compiled once: a ``jax.vmap`` over the seeds would make their convolutions grouped
    ones, which XLA:CPU runs several times slower.

    Returns ``{"task", "T", "seeds", "bptt": {...}, "rate": {...}, "agreement":
    [[records] per seed]}``. Per method, per seed: the test ``accuracy`` and
    ``shuffled_accuracy`` (each test sample's time steps in a random order,
    :func:`shuffle_time`); and ``train_s`` for all seeds, compilation included. The
    agreement records (``agreement.records_from_sums``: overall and per-layer ``cosine``
    and ``norm_ratio`` of rate-BP against BPTT, on the first ``agreement_batch`` training
    samples) are taken along the rate-BP run at step 0, every ``log_every`` steps (0:
    never) and at the end.
    """
    T = task.T
    image_shape = task.x_train.shape[2:]
    probe = {"image": _time_major(task.x_train[:agreement_batch]),
             "label": jnp.asarray(task.y_train[:agreement_batch])}
    x_test, x_shuffled = _time_major(task.x_test), _time_major(shuffle_time(task.x_test))
    result = {"task": task.name, "T": T, "seeds": list(seeds), "agreement": [],
              **{m: {"accuracy": [], "shuffled_accuracy": [], "train_s": 0.0}
                 for m in METHODS}}
    for seed in seeds:
        net, params, batch_stats = methods.split_model(models.create_model(
            model, num_classes=task.num_classes, in_channels=image_shape[-1],
            image_size=image_shape[0], seed=seed))
        programs = _programs(net, T, step_mode, learning_rate)
        layers = analysis.layer_groups(net, params, batch_stats, image_shape)
        names = [name for name, _ in analysis.named_leaves(params)]

        def agree(state, step):
            sums = jax.device_get(programs["agreement"](state["params"],
                                                        state["batch_stats"], probe))
            return agreement.records_from_sums(sums, layers, names, step=step, T=T,
                                               step_mode=step_mode)[0]

        for method in METHODS:
            state = {"params": params, "batch_stats": batch_stats,
                     "opt_state": programs["tx"].init(params),
                     "step": jnp.zeros((), jnp.int32), "epoch_sums": train.zero_sums()}
            state = jax.tree.map(jnp.array, state)  # copies: the step donates its input
            records = []
            start = time.perf_counter()
            for i, idx in enumerate(_batch_indices(len(task.x_train), steps, batch_size,
                                                   seed)):
                if method == "rate" and (i == 0 or (log_every and i % log_every == 0)):
                    records.append(agree(state, i))
                state, _ = programs[method](state, {"image": _time_major(task.x_train[idx]),
                                                    "label": jnp.asarray(task.y_train[idx])})
            jax.block_until_ready(state)
            result[method]["train_s"] += time.perf_counter() - start
            if method == "rate":
                result["agreement"].append(records + [agree(state, steps)])
            for key, x in (("accuracy", x_test), ("shuffled_accuracy", x_shuffled)):
                labels = programs["predict"](state["params"], state["batch_stats"], x)
                result[method][key].append(float(np.mean(np.asarray(labels) == task.y_test)))
    return result


_PROGRAMS: dict = {}


def _programs(net, T: int, step_mode: str, learning_rate: float) -> dict:
    """The jitted programs of :func:`measure`: a train step per method, the agreement
    sums and the test predictions, with the optimiser ``tx``. Kept per network graph, T,
    step mode and learning rate, so that seeds, and tasks of one input shape (the static
    and the rate-coded digits), compile them once."""
    key = (net.graphdef, T, step_mode, learning_rate)
    if key not in _PROGRAMS:
        tx = optax.adam(learning_rate)
        programs = {method: jax.jit(train.make_train_step(
            methods.make_grad_fn(method, net, T=T, step_mode=step_mode), tx, "stop"),
            donate_argnums=0) for method in METHODS}
        programs["tx"] = tx
        programs["agreement"] = jax.jit(agreement.make_agreement_fn(
            net, ("rate",), T=T, step_mode=step_mode))
        programs["predict"] = jax.jit(lambda p, s, x: jnp.argmax(
            methods.spike_inference(net, p, s, x, T=T, step_mode=step_mode)[0], -1))
        _PROGRAMS[key] = programs
    return _PROGRAMS[key]


def summarize(result: dict) -> dict:
    """The figures of one :func:`measure` result, as means over its seeds: each method's
    ``accuracy``, its range ``(min, max)``, and its ``shuffle_change`` (shuffled minus
    plain accuracy); rate-BP's ``cosine`` and ``norm_ratio`` with BPTT at the ``start`` and
    the ``end``, and ``worst_layer_cosine_end``, the lowest per-layer cosine at the end."""
    out = {"task": result["task"], "T": result["T"]}
    for method in METHODS:
        acc = np.array(result[method]["accuracy"])
        shuffled = np.array(result[method]["shuffled_accuracy"])
        out[method] = {"accuracy": float(acc.mean()), "range": (float(acc.min()),
                                                                float(acc.max())),
                       "shuffle_change": float((shuffled - acc).mean())}
    for when, index in (("start", 0), ("end", -1)):
        for key in ("cosine", "norm_ratio"):
            out[f"{key}_{when}"] = float(np.mean([r[index][key] for r in result["agreement"]]))
    out["worst_layer_cosine_end"] = float(np.mean([
        min(f["cosine"] for f in r[-1]["layers"].values()) for r in result["agreement"]]))
    return out


def table(summaries) -> str:
    """A markdown table of :func:`summarize`'s figures, one row per task and T."""
    rows = ["| input | T | BPTT accuracy | rate-BP accuracy | BPTT - rate-BP | shuffled: "
            "BPTT / rate-BP | cosine start -> end | norm ratio start -> end | lowest layer "
            "cosine, end |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        b, r = s["bptt"], s["rate"]
        rows.append(
            f"| {s['task']} | {s['T']} | {b['accuracy']:.3f} ({b['range'][0]:.3f}-"
            f"{b['range'][1]:.3f}) | {r['accuracy']:.3f} ({r['range'][0]:.3f}-"
            f"{r['range'][1]:.3f}) | {b['accuracy'] - r['accuracy']:+.3f} | "
            f"{b['shuffle_change']:+.3f} / {r['shuffle_change']:+.3f} | "
            f"{s['cosine_start']:.3f} -> {s['cosine_end']:.3f} | {s['norm_ratio_start']:.2f} "
            f"-> {s['norm_ratio_end']:.2f} | {s['worst_layer_cosine_end']:.3f} |")
    return "\n".join(rows)
