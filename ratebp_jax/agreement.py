"""Gradient agreement with BPTT, logged while a network trains.

Every ``config.grad_agreement_every_steps`` steps, :class:`AgreementLogger` compares each
listed method's gradient with BPTT's on the batch, parameters and statistics the next train
step will use, in a program of its own whose results are thrown away (so logging changes
nothing in the run), and writes one line per method to ``grad_agreement.jsonl``::

    {"step", "method", "reference": "bptt", "T", "step_mode", "cosine", "norm_ratio",
     "layers": {LAYER: {"cosine", "norm_ratio"}}}

``step`` counts the updates before that batch; layers are in network order. Only three
numbers per parameter cross to the host: ``<g, g_bptt>``, ``|g|^2`` and ``|g_bptt|^2``.

With ``config.grad_agreement_warn_cosine`` above 0, the first layer cosine logged below it
is said once (:func:`low_agreement`): a sign that rate-BP is not following BPTT there.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ratebp_jax import analysis, checks, methods

FILE = "grad_agreement.jsonl"
PLOT_FILE = "grad_agreement.png"
REFERENCE = "bptt"


def make_agreement_fn(net, method_names, *, T: int, step_mode: str,
                      rate_grad_scale: str = "exact"):
    """``fn(params, batch_stats, batch) -> {method: [dot, norm2, norm2_ref] per parameter}``,
    each entry a ``[3, P]`` float32 array in ``jax.tree.leaves(params)`` order, comparing
    the method's gradient with BPTT's on the same inputs."""
    def grads(method, params, batch_stats, batch):
        fn = methods.make_grad_fn(method, net, T=T, step_mode=step_mode,
                                  rate_grad_scale=rate_grad_scale)
        return jax.tree.leaves(fn(params, batch_stats, batch)[1])

    def sums(g, g_ref):
        return jnp.stack([jnp.stack([jnp.vdot(a, b).astype(jnp.float32) for a, b in zip(g, g_ref)]),
                          jnp.stack([jnp.vdot(a, a).astype(jnp.float32) for a in g]),
                          jnp.stack([jnp.vdot(b, b).astype(jnp.float32) for b in g_ref])])

    def agreement(params, batch_stats, batch):
        g_ref = grads(REFERENCE, params, batch_stats, batch)
        return {m: sums(g_ref if m == REFERENCE else grads(m, params, batch_stats, batch),
                        g_ref) for m in method_names}
    return agreement


def _figures(dot, norm2, norm2_ref) -> dict:
    """``{"cosine", "norm_ratio"}`` of ``analysis.cosine_and_norm_ratio``, with null (None)
    for NaN, so that the record stays valid JSON."""
    cosine, ratio = analysis.cosine_and_norm_ratio(dot, norm2, norm2_ref)
    return {"cosine": _null_for_nan(cosine), "norm_ratio": _null_for_nan(ratio)}


def _null_for_nan(x: float):
    return None if math.isnan(x) else x


def records_from_sums(sums_by_method: dict, layers, param_names, *, step: int, T: int,
                      step_mode: str) -> list[dict]:
    """The JSON records of one logging step from :func:`make_agreement_fn`'s sums (on the
    host, as numpy). ``layers`` is ``[(layer, [parameter names])]`` in network order and
    ``param_names`` the names in ``jax.tree.leaves(params)`` order."""
    index = {name: i for i, name in enumerate(param_names)}
    records = []
    for method, sums in sums_by_method.items():  # in the order the caller listed them
        sums = np.asarray(sums, np.float64)
        layer_figures = {layer: _figures(*sums[:, [index[n] for n in names]].sum(1))
                         for layer, names in layers}
        records.append({"step": step, "method": method, "reference": REFERENCE, "T": T,
                        "step_mode": step_mode, **_figures(*sums.sum(1)),
                        "layers": layer_figures})
    return records


class AgreementLogger:
    """Computes and appends the agreement records of a training run (see module doc)."""

    def __init__(self, net, params, batch_stats, image_shape, config, workdir: str, *,
                 say=print):
        self.every = config.grad_agreement_every_steps
        self.warn_cosine = checks.check_number(
            "grad_agreement_warn_cosine", config.grad_agreement_warn_cosine, 0.0, 1.0)
        self.say = say  # where the one low-agreement warning goes
        self.T, self.step_mode = config.T, config.step_mode
        self.methods = tuple(dict.fromkeys(config.grad_agreement_methods))
        self.path = os.path.join(workdir, FILE)
        self.layers = analysis.layer_groups(net, params, batch_stats, image_shape)
        self.param_names = _leaf_names(params)
        self.fn = jax.jit(make_agreement_fn(net, self.methods,
                                            T=config.T, step_mode=config.step_mode,
                                            rate_grad_scale=config.rate_grad_scale))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def log(self, step: int, state, batch) -> list[dict]:
        """Compare at ``step`` on ``batch`` with ``state``'s parameters and statistics.
        Blocks until the figures are on the host, so the train step may then donate
        ``state``'s buffers."""
        sums = jax.device_get(self.fn(state["params"], state["batch_stats"], batch))
        sums = {method: sums[method] for method in self.methods}  # jit sorts dict keys
        records = records_from_sums(sums, self.layers, self.param_names, step=step, T=self.T,
                                    step_mode=self.step_mode)
        if jax.process_index() == 0:
            from ratebp_jax import workdir as wd
            for record in records:
                wd.append_jsonl(self.path, record)
            warning = low_agreement(records, self.warn_cosine)
            if warning:
                self.say(warning)
                self.warn_cosine = 0.0  # once per run
        return records


def low_agreement(records: list[dict], threshold: float) -> str | None:
    """A warning naming the first layer (in network order) whose cosine with BPTT in
    ``records`` (one logging step's) is below ``threshold``, or None; 0 is off."""
    for record in records:
        for layer, figures in record["layers"].items():
            cosine = figures["cosine"]
            if threshold and cosine is not None and cosine < threshold:
                return (f"warning: at step {record['step']} the gradient of {record['method']} "
                        f"agrees with {record['reference']}'s only to cosine {cosine:.3f} in "
                        f"layer {layer} (grad_agreement_warn_cosine={threshold}). The "
                        "network may carry information in spike timing, which rate-BP does "
                        "not see (docs/RESULTS.md, 'Where rate-BP stops being BPTT'), or "
                        "break the layer contract (ratebp_jax.contract); said once")
    return None


def _leaf_names(params) -> list[str]:
    """Dotted names in ``jax.tree.leaves`` order (``analysis.named_leaves`` is path order;
    the two agree for NNX states, which this checks)."""
    names = [name for name, _ in analysis.named_leaves(params)]
    if len(names) != len(jax.tree.leaves(params)):
        raise ValueError("params: cannot name every leaf")
    return names


def plot_agreement(records: list[dict], path: str) -> None:
    """Cosine with BPTT against step: one panel per method, all on one y-axis so that methods
    compare at a glance, one line per layer coloured by its depth (input dark, output
    light; the colour bar names the layers), the overall cosine dashed in black."""
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    from ratebp_jax import workdir as wd

    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    fig = Figure(figsize=(5.5 * len(by_method) + 1, 3.8))
    axes = fig.subplots(1, len(by_method), squeeze=False, sharey=True)[0]
    cmap = matplotlib.colormaps["viridis"]
    for ax, (method, rs) in zip(axes, by_method.items()):
        rs = sorted(rs, key=lambda r: r["step"])
        steps = [r["step"] for r in rs]
        layers = list(rs[0]["layers"])
        norm = colors.Normalize(0, max(len(layers) - 1, 1))
        for depth, layer in enumerate(layers):
            ax.plot(steps, [_nan(r["layers"][layer]["cosine"]) for r in rs],
                    color=cmap(norm(depth)), lw=1.2)
        ax.plot(steps, [_nan(r["cosine"]) for r in rs], "k--", lw=1.5, label="all parameters")
        ax.set(xlabel="training step", ylabel=f"cosine with {REFERENCE}",
               title=f"{method} vs {REFERENCE} (T={rs[0]['T']}, {rs[0]['step_mode']})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax)
        every = max(1, len(layers) // 24)  # at most about 24 names per bar
        bar.set_ticks(range(0, len(layers), every), labels=layers[::every], fontsize=6)
        bar.set_label("layer", fontsize=7)
    fig.tight_layout()
    wd.save_figure_atomic(fig, path)


def _nan(x):
    return float("nan") if x is None else x
