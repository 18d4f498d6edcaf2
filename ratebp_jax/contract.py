"""Does a model keep rate-BP's layer contract (docs/DESIGN.md section 4)? ``check_model``
says, and names each operation that breaks it.

Rate-BP's rate pass runs the network once on time means and takes every non-linear value
from a record of the spike pass (``layers.LIF``, ``layers.BatchNorm``, ``layers.MaxPool``).
Anything else that is not linear computes ``f(mean_t x_t)`` where the spike pass computed
``mean_t f(x_t)``. The two checks of DESIGN section 4.3 (rate-BP equals BPTT at T = 1; the
rate pass's logits are the spike pass's time mean) miss such an operation between two LIF
layers, where it changes only the gradient. So :func:`check_model` reads the rate pass's
traced program instead:

* It traces the rate pass (``jax.make_jaxpr``, on abstract values: no compute) and follows
  every value that depends on the network input through it, into nested programs (``jit``,
  ``custom_jvp_call``, ``custom_vjp_call``, ``scan``, ``cond``, ``while``, ``remat``). The
  contract layers are marked in the trace (``_wrap``), so what they compute inside
  is theirs; every other primitive on such a value must be linear. A non-linear one is an
  error when it lies after a LIF (between two LIF layers, or between the last one and the
  logits), and a warning before the first LIF, where it is harmless for a static image
  fed at every step. A ``max`` with a constant <= 0 on a LIF's output (a ReLU on spikes
  or rates, which are non-negative) is the identity there, and reported as harmless. A
  primitive the checker does not know is a warning.
* It counts the calls of every contract layer in one forward pass: more than one
  overwrites or adds to its records.
* With ``numeric=True`` (a model with values, not one from ``nnx.eval_shape``) it also runs
  the passes on a random batch: each LIF's rate-pass input must be the time mean of its
  spike-pass inputs and the rate pass's logits the time mean of the spike pass's, at T > 1;
  and rate-BP's gradient must equal BPTT's at T = 1 (DESIGN section 2.5).

The check runs on a copy of the model in float32 and never changes the model itself. While
it runs, the contract layers' ``__call__`` is wrapped (only for that copy's instances).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jex_core

from ratebp_jax import analysis, checks, layers, methods, models

SEVERITIES = ("error", "warning", "harmless")
CONTRACT_LAYERS = {layers.LIF: "LIF", layers.BatchNorm: "BatchNorm", layers.MaxPool: "MaxPool"}
# Relative difference allowed between values that a model keeping the contract computes
# equal up to float32 rounding (a valid model differs by about 1e-7).
RTOL = 1e-4
# The value checks' programs run once on a tiny batch, so compiling is nearly all their
# time; LLVM's optimisation level 0 halves it (it changes float rounding, not what is
# computed, far below RTOL).
_RUN_ONCE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One way the model breaks (or may break) the contract.

    severity: "error" (rate-BP's value or gradient is wrong), "warning" (it may be, see the
      message) or "harmless" (an operation that looks non-linear but is not, there).
    operation: the traced primitive (``reduce_window_max``, ``max``, ``tanh``...), or the
      check: "call count", "rate-pass value", "logits", "T=1 gradient", "no LIF", "no spikes".
    layer: the contract layers around it ("between LIF 'a' and LIF 'b'"), or "".
    source: the model's source line that made it (``file:line (function)``), or "".
    message: what it does to rate-BP, and the fix.
    """

    severity: str
    operation: str
    layer: str
    source: str
    message: str

    def __str__(self):
        where = ", ".join(w for w in (self.layer, self.source) if w)
        return f"{self.severity}: {self.operation}" + (f" ({where})" if where else "") + \
            f": {self.message}"


def errors(findings) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def check_model(model: nnx.Module, *, image_shape, T: int = 4, step_mode: str = "multi",
                numeric: bool = True, batch_size: int = 2, seed: int = 0) -> list[Finding]:
    """Check that ``model`` keeps the layer contract of docs/DESIGN.md section 4 (see the
    module doc). Returns the findings, errors first; an empty list means none was found.

    image_shape: one input ``(H, W, C)``.
    T, step_mode: the run's; the structure is checked in ``step_mode``, the values at ``T``
      (which must be > 1 for the value checks to mean anything) and at T = 1.
    numeric: also run the value checks on a random sequence ``[T, batch_size, H, W, C]``
      (one program of four small passes, compiled at LLVM level 0); False traces only, at
      no compute, and is what an abstract model (``nnx.eval_shape``) allows.
    """
    checks.check_int("T", T, 1)
    checks.check_choice("step_mode", step_mode, layers.STEP_MODES)
    checks.check_int("batch_size", batch_size, 1)
    if numeric and any(isinstance(x, jax.ShapeDtypeStruct)
                       for x in jax.tree.leaves(nnx.state(model))):
        raise ValueError("numeric=True: the model has no values (nnx.eval_shape?); pass "
                         "numeric=False to check it by tracing only")
    copy = models.set_compute_dtype(nnx.clone(model), "float32")
    for path, module in nnx.iter_modules(copy):
        if isinstance(module, tuple(CONTRACT_LAYERS)):
            setattr(module, _PATH_ATTR, ".".join(map(str, path)))
    net, params, batch_stats = methods.split_model(copy)
    findings = []
    if not any(isinstance(m, layers.LIF) for _, m in nnx.iter_modules(copy)):
        findings.append(Finding("warning", "no LIF", "", "", "the model has no layers.LIF, "
                                "so rate-BP has no firing rate to record; its spiking "
                                "neurons must be layers.LIF (docs/DESIGN.md section 4.1)"))
    with _LOCK, _instrumented() as probe:
        traced, lif_after = _trace_and_walk(probe, net, params, batch_stats,
                                            tuple(image_shape), T, step_mode, batch_size)
        findings += traced
        if numeric:
            findings += _numeric_checks(probe, net, params, batch_stats, tuple(image_shape),
                                        T, step_mode, batch_size, seed, lif_after)
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


class ContractError(ValueError):
    """A model of one's own breaks the layer contract, and the config makes that fatal."""


def check_config_model(config, *, out=sys.stderr) -> list[Finding]:
    """``experiments/main.py``'s check, before anything is written: a model given by import
    path (not a zoo model, which keeps the contract) in a run that uses rate-BP (as its
    method, or in the agreement logging) is checked once, at the run's T and step mode on
    a batch of two, and its findings are written to ``out`` (by process 0).

    Loads the dataset for its input shape (the trainer loads it again). Raises
    :class:`ContractError` when ``config.contract_errors_fatal`` and a finding is an error.
    """
    checks.check_bool("contract_errors_fatal", config.contract_errors_fatal)
    uses_rate = config.method == "rate" or (config.grad_agreement_every_steps and "rate" in
                                            config.grad_agreement_methods)
    if config.model in models.ZOO or not uses_rate:
        return []
    from ratebp_jax import data, train  # the trainer's imports, needed on this path only
    dataset = data.load_dataset(config)
    model = train.create_model(config, dataset.image_shape, dataset.num_classes)
    findings = check_model(model, image_shape=dataset.image_shape, T=max(config.T, 2),
                           step_mode=config.step_mode)
    if findings and jax.process_index() == 0:
        print(f"warning: model {config.model!r} and rate-BP: contract.check_model found "
              "(docs/DESIGN.md section 4):", file=out)
        for finding in findings:
            print(f"  {finding}", file=out)
        out.flush()
    n = len(errors(findings))
    if n and config.contract_errors_fatal:
        raise ContractError(
            f"model={config.model!r}: breaks rate-BP's layer contract ({n} error"
            f"{'s' if n > 1 else ''}, listed above), and contract_errors_fatal is set; fix "
            "the model, or train it anyway with contract_errors_fatal=false")
    return findings


# --------------------------------------------------------------------------- instrumentation
_PATH_ATTR = "_contract_check_path"
_IN, _OUT = "contract-check-in", "contract-check-out"
_LOCK = threading.Lock()


class _Probe:
    """What the wrapped contract layers do while a check runs: mark their input and output
    in the trace, count their calls (``calls``, while not None), and send each LIF's input
    and output to the host (``capture``)."""

    def __init__(self):
        self.serial = 0
        self.calls = None
        self.capture = False
        self.inputs = collections.defaultdict(dict)  # phase -> path -> time-mean input
        self.fired = {}  # path -> any spike in the spike pass

    def add_input(self, phase, path, step_mode, T, x):
        x = np.asarray(x, np.float64)
        if phase == "spike":
            # multi: one call on [T*B, ...]; single: one call per step, a share each
            x = x.reshape((T, -1) + x.shape[1:]).mean(0) if step_mode == "multi" else x / T
        sums = self.inputs[phase]
        sums[path] = sums[path] + x if path in sums else x

    def add_output(self, path, y):
        self.fired[path] = self.fired.get(path, False) or bool(np.any(np.asarray(y) != 0))


_PROBE: _Probe | None = None


def _wrap(original, kind):
    @functools.wraps(original)
    def call(self, x, ctx, *args, **kwargs):
        probe, path = _PROBE, getattr(self, _PATH_ATTR, None)
        if probe is None or path is None:  # not the copy under check
            return original(self, x, ctx, *args, **kwargs)
        if probe.calls is not None:
            probe.calls[path] += 1
        probe.serial += 1
        key = f"{kind}|{path}|{probe.serial}"
        if probe.capture and kind == "LIF":
            jax.debug.callback(functools.partial(probe.add_input, ctx.phase, path,
                                                 ctx.step_mode, ctx.T), x)
        y = original(self, checkpoint_name(x, f"{_IN}|{key}"), ctx, *args, **kwargs)
        if probe.capture and kind == "LIF" and ctx.phase == "spike":
            jax.debug.callback(functools.partial(probe.add_output, path), y)
        return checkpoint_name(y, f"{_OUT}|{key}")
    return call


@contextlib.contextmanager
def _instrumented():
    """The contract layers' ``__call__`` wrapped (:func:`_wrap`) while the block runs."""
    global _PROBE
    saved = {cls: cls.__dict__["__call__"] for cls in CONTRACT_LAYERS}
    for cls, kind in CONTRACT_LAYERS.items():
        cls.__call__ = _wrap(saved[cls], kind)
    _PROBE = _Probe()
    try:
        yield _PROBE
    finally:
        _PROBE = None
        for cls, original in saved.items():
            cls.__call__ = original


# --------------------------------------------------------------------------- the trace
def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _trace_and_walk(probe, net, params, batch_stats, image_shape, T, step_mode, batch):
    """Trace a spike pass (for the records' shapes) and the rate pass, each one forward
    call of the model, and walk the rate pass's program."""
    n_spike = T * batch if step_mode == "multi" else batch
    x_spike = jax.ShapeDtypeStruct((n_spike,) + image_shape, jnp.float32)
    x_rate = jax.ShapeDtypeStruct((batch,) + image_shape, jnp.float32)
    params, batch_stats = _abstract(params), _abstract(batch_stats)

    def spike(params, batch_stats, transient, x):
        model = net.merge(params, batch_stats, transient)
        model(x, layers.Ctx("spike", step_mode, T, train=True, record=True))
        after, _, new_stats = methods.split_model(model)
        return new_stats, after.transient

    def rate(params, batch_stats, records, x):
        model = net.merge(params, batch_stats, records)
        return model(x, layers.Ctx("rate", step_mode, T))

    calls = {}
    probe.calls = collections.Counter()
    new_stats, records = jax.eval_shape(spike, params, batch_stats,
                                        _abstract(net.transient), x_spike)
    calls["spike"], probe.calls = probe.calls, collections.Counter()
    closed = jax.make_jaxpr(rate)(params, new_stats, records, x_rate)
    calls["rate"], probe.calls = probe.calls, None
    walker = _Walker()
    inputs = [None] * (len(closed.jaxpr.invars) - 1) + [_Taint(frozenset(), False,
                                                               frozenset())]
    outputs = walker.walk(closed, inputs)
    return _call_findings(calls) + walker.findings(outputs), walker.lif_after


def _call_findings(calls) -> list[Finding]:
    counts = {}
    for phase in ("spike", "rate"):
        for path, n in calls[phase].items():
            if n > 1:
                counts.setdefault(path, []).append(f"{n} times in the {phase} pass")
    return [Finding("error", "call count", f"'{path}'", "",
                    f"called {' and '.join(times)}, in one forward call of the model; each "
                    "contract layer must be called once per forward pass (once per time "
                    "step in single step mode), since a second call overwrites or adds to "
                    "its records: give each use an instance of its own (docs/DESIGN.md "
                    "section 4.1)")
            for path, times in counts.items()]


@dataclasses.dataclass(frozen=True)
class _Taint:
    """What the checker knows of a value computed from the network input.

    after: the LIF layers (paths) it comes from; empty before the first LIF.
    nonneg: known to be >= 0 (a LIF's output, sums and positive multiples of such).
    flags: the non-linear operations (indices into ``_Walker.ops``) it passed through
      since the last LIF.
    inside: the contract layer call whose internals it is, or None.
    """

    after: frozenset
    nonneg: bool
    flags: frozenset
    inside: str | None = None


def _join(taints, nonneg=None):
    taints = [t for t in taints if t is not None]
    if not taints:
        return None
    inside = next((t.inside for t in taints if t.inside is not None), None)
    return _Taint(frozenset().union(*(t.after for t in taints)),
                  all(t.nonneg for t in taints) if nonneg is None else nonneg,
                  frozenset().union(*(t.flags for t in taints)), inside)


# Primitives that are linear in every operand that depends on the input (given that the
# other operands do not), and keep a non-negative value non-negative.
_LINEAR = frozenset({
    "add", "add_any", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims",
    "copy", "copy_p", "slice", "dynamic_slice", "dynamic_update_slice", "gather", "rev",
    "concatenate", "reduce_sum", "reduce_window_sum", "cumsum", "stop_gradient",
    "reduce_precision", "optimization_barrier", "sharding_constraint", "device_put",
    "split", "mesh_cast", "reshard", "pvary", "scatter-add", "scatter_add", "name"})
_SIGNED_LINEAR = frozenset({"sub", "neg", "pad", "select_n", "convert_element_type", "real",
                            "imag", "conj", "complex"})
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
_COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})
_NONLINEAR = frozenset({
    "max", "min", "reduce_max", "reduce_min", "argmax", "argmin", "reduce_window_max",
    "reduce_window_min", "reduce_window", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "square", "abs", "sign",
    "floor", "ceil", "round", "erf", "erfc", "erf_inv", "sin", "cos", "tan", "asin", "acos",
    "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "reduce_prod", "cumprod",
    "cummax", "cummin", "cumlogsumexp", "sort", "clamp", "rem", "div", "top_k", "and", "or",
    "not", "xor", "reduce_and", "reduce_or", "reduce_xor", "is_finite", "nextafter", "lgamma",
    "digamma", "population_count", "select_and_scatter_add", "random_bits"}) | _COMPARISONS
# Nested programs whose inputs and outputs are the equation's, one for one.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat2": "jaxpr", "checkpoint": "jaxpr", "shard_map": "jaxpr"}
# The fix a finding suggests, for the first of these primitives among its operations.
_ADVICE = {
    "reduce_window_max": "use layers.MaxPool, which records the pooled spikes' time mean",
    "rsqrt": "an nnx.BatchNorm or a normalisation of one's own? use layers.BatchNorm",
    "max": "drop the ReLU (a LIF's output needs none) or apply it directly to a LIF's "
           "output, where it is the identity",
    "mul": "a product of two spike trains (SEW's AND) or a gate has no rate-pass form; use "
           "an addition",
}


@dataclasses.dataclass
class _Op:
    primitive: str
    source: str
    note: str
    after: set
    reaches: set = dataclasses.field(default_factory=set)
    harmless: bool = False
    unknown: bool = False


class _Walker:
    """Follows the values computed from the network input through a traced program."""

    def __init__(self):
        self.ops: list[_Op] = []
        self.index: dict = {}
        self.calls: dict = {}  # contract call key -> (kind, path, input taint)
        self.lif_after: dict = {}  # LIF path -> the LIF layers its input comes from
        # The source line of the nested call being walked: a library function traced once
        # and cached (jax.nn.relu, jnp.where) keeps only its own frames inside.
        self.outer_source = ""

    def _flag(self, eqn, taint, note="", *, harmless=False, unknown=False) -> frozenset:
        source = _source(eqn) or self.outer_source
        key = (eqn.primitive.name, source, note, harmless)
        if key not in self.index:
            self.index[key] = len(self.ops)
            self.ops.append(_Op(eqn.primitive.name, source, note, set(), harmless=harmless,
                                unknown=unknown))
        i = self.index[key]
        self.ops[i].after |= taint.after
        return frozenset({i})

    def walk(self, closed, in_taints, in_values=None):
        """Taints of ``closed``'s outputs (a ClosedJaxpr or Jaxpr) from its inputs'."""
        jaxpr = getattr(closed, "jaxpr", closed)
        consts = getattr(closed, "consts", ())
        env, values = {}, {}
        for v, c in zip(jaxpr.constvars, consts):
            values[v] = c
        for v, t, c in zip(jaxpr.invars, in_taints, in_values or [None] * len(in_taints)):
            env[v] = t
            if c is not None:
                values[v] = c

        def taint(v):
            return None if isinstance(v, jex_core.Literal) else env.get(v)

        def value(v):
            return v.val if isinstance(v, jex_core.Literal) else values.get(v)

        for eqn in jaxpr.eqns:
            ins = [taint(v) for v in eqn.invars]
            outs = self._eqn(eqn, ins, [value(v) for v in eqn.invars])
            for v, t in zip(eqn.outvars, outs):
                env[v] = t
            if all(t is None for t in ins) and eqn.primitive.name in (
                    "convert_element_type", "broadcast_in_dim", "reshape", "copy"):
                known = value(eqn.invars[0])  # a constant's sign survives these
                if known is not None:
                    values[eqn.outvars[0]] = known
        return [taint(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, ins, values):
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if all(t is None for t in ins):
            return [None] * n_out
        if name == "name" and str(eqn.params["name"]).startswith((_IN, _OUT)):
            return [self._marker(eqn.params["name"], ins[0])]
        joined = _join(ins)
        if joined.inside is not None:  # inside a contract layer: its own business
            return [joined] * n_out
        nested = eqn.params.get(_CALLS.get(name))
        if nested is not None and len(getattr(nested, "jaxpr", nested).invars) == len(ins):
            outer, self.outer_source = self.outer_source, _source(eqn) or self.outer_source
            try:
                outs = self.walk(nested, ins, values)
            finally:
                self.outer_source = outer
            if name.startswith("custom_vjp"):  # the value may be a record; the gradient
                # flows from every input through the rule, so keep what they carry
                outs = [t if t is not None else _join(ins, nonneg=False) for t in outs]
            return outs
        if name == "scan":
            return self._scan(eqn, ins, values)
        if name == "cond":
            return self._cond(eqn, ins, values)
        if name == "while":
            return self._while(eqn, ins, values)
        tainted = [t for t in ins if t is not None]
        if name in _LINEAR:
            return [joined] * n_out
        if name in _SIGNED_LINEAR:
            if name == "select_n" and ins[0] is not None:
                flags = self._flag(eqn, joined, "on a condition computed from activations")
                return [dataclasses.replace(joined, nonneg=False,
                                            flags=joined.flags | flags)] * n_out
            if name == "convert_element_type" and jnp.issubdtype(
                    eqn.invars[0].aval.dtype, jnp.inexact) and not jnp.issubdtype(
                    eqn.params["new_dtype"], jnp.inexact):  # rounds to an integer
                flags = self._flag(eqn, joined, f"to {eqn.params['new_dtype']}")
                return [dataclasses.replace(joined, nonneg=False, flags=joined.flags | flags)]
            keeps_sign = name in ("select_n", "convert_element_type", "pad")
            nonneg = joined.nonneg and keeps_sign and all(
                _known_sign(values[i], ">=") for i, t in enumerate(ins) if t is None
                and not (name == "select_n" and i == 0))
            return [dataclasses.replace(joined, nonneg=nonneg)] * n_out
        if name in _BILINEAR and len(tainted) == 1:
            other = [values[i] for i, t in enumerate(ins) if t is None]
            nonneg = joined.nonneg and name == "mul" and _known_sign(other[0], ">")
            return [dataclasses.replace(joined, nonneg=nonneg)] * n_out
        if name == "div" and ins[1] is None:
            return [dataclasses.replace(joined,
                                        nonneg=joined.nonneg and _known_sign(values[1], ">"))]
        if name == "integer_pow" and eqn.params.get("y") == 1:
            return [joined]
        if name == "max" and len(tainted) == 1 and joined.nonneg and _known_sign(
                values[1 if ins[0] is not None else 0], "<="):
            self._flag(eqn, joined, harmless=True)
            return [joined]
        if name in _NONLINEAR or name in _BILINEAR:
            note = ("of two activations" if name in _BILINEAR or name == "div" and ins[1]
                    is not None else "")
            flags = self._flag(eqn, joined, note)
        else:
            flags = self._flag(eqn, joined, unknown=True)
        return [dataclasses.replace(joined, nonneg=False, flags=joined.flags | flags)] * n_out

    def _marker(self, label, t):
        end, kind, path, serial = label.split("|")
        if end == _IN:
            self.calls[serial] = (kind, path, t)
            if kind == "LIF":
                self.lif_after[path] = t.after if t is not None else frozenset()
            for i in (t.flags if t is not None and kind == "LIF" else ()):
                self.ops[i].reaches.add(path)
            return _Taint(frozenset(), False, frozenset(), inside=serial)
        kind, path, t_in = self.calls[serial]
        if kind == "LIF":
            return _Taint(frozenset({path}), True, frozenset())
        if t_in is None:
            return None
        return dataclasses.replace(t_in, nonneg=t_in.nonneg and kind == "MaxPool")

    def _fixed_point(self, body, consts, carry, xs, values, n_carry):
        """Walk a loop body until the carry's taints stop changing."""
        for _ in range(8):
            outs = self.walk(body, consts + carry + xs, values)
            new = [_join([a, b]) for a, b in zip(carry, outs[:n_carry])]
            if new == carry:
                return outs
            carry = new
        return outs

    def _scan(self, eqn, ins, values):
        c, n = eqn.params["num_consts"], eqn.params["num_carry"]
        outs = self._fixed_point(eqn.params["jaxpr"], ins[:c], ins[c:c + n], ins[c + n:],
                                 values, n)
        return [_join([a, b]) for a, b in zip(ins[c:c + n], outs[:n])] + outs[n:]

    def _cond(self, eqn, ins, values):
        flags = frozenset()
        if ins[0] is not None:
            flags = ins[0].flags | self._flag(eqn, ins[0],
                                              "on a condition computed from activations")
        branches = [self.walk(b, ins[1:], values[1:]) for b in eqn.params["branches"]]
        outs = [_join(ts) for ts in zip(*branches)]
        if flags:
            outs = [dataclasses.replace(t or ins[0], nonneg=False,
                                        flags=(t or ins[0]).flags | flags) for t in outs]
        return outs

    def _while(self, eqn, ins, values):
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        carry = ins[nc + nb:]
        outs = self._fixed_point(eqn.params["body_jaxpr"], ins[nc:nc + nb], carry, [],
                                 values[nc:], len(carry))
        carry = [_join([a, b]) for a, b in zip(carry, outs)]
        pred = self.walk(eqn.params["cond_jaxpr"], ins[:nc] + carry)[0]
        if pred is not None and pred.inside is None:
            flags = pred.flags | self._flag(eqn, pred,
                                            "on a condition computed from activations")
            carry = [dataclasses.replace(t or pred, nonneg=False, flags=(t or pred).flags
                                         | flags) for t in carry]
        return carry

    def findings(self, outputs) -> list[Finding]:
        """One finding per source line and place, for the operations that reach a LIF or
        the model's output (an unused value breaks nothing)."""
        to_output = set().union(*(t.flags for t in outputs if t is not None))
        groups: dict = {}
        for i, op in enumerate(self.ops):
            if op.harmless:
                kind = "harmless"
            elif not op.reaches and i not in to_output:
                continue
            elif op.unknown:
                kind = "unknown"
            else:
                kind = "between" if op.after and op.reaches else "after" if op.after else \
                    "before"
            where = _after(op.after) if kind == "harmless" else _where(op)
            line = op.source.split(_THROUGH)[0]  # one finding for, say, an nnx.BatchNorm
            groups.setdefault((kind, where, line), []).append(op)
        return [_group_finding(kind, where, ops[0].source, ops)
                for (kind, where, _), ops in groups.items()]


def _group_finding(kind, where, source, ops) -> Finding:
    names = ", ".join(dict.fromkeys(op.primitive for op in ops))
    what = ", ".join(dict.fromkeys(op.primitive + (f" {op.note}" if op.note else "")
                                   for op in ops))
    present = {op.primitive for op in ops}
    advice = next((f" Fix: {text}." for name, text in _ADVICE.items() if name in present), "")
    plural = "are" if len(ops) > 1 else "is"
    if kind == "harmless":
        return Finding("harmless", names, where, source,
                       f"{what} with a constant <= 0 on a LIF's output: spikes and rates are "
                       "non-negative, so it is the identity there")
    if kind == "unknown":
        return Finding("warning", names, where, source,
                       f"the checker does not know whether {what} {plural} linear in the "
                       "activations. Harmless if so (a reshape, a linear map); otherwise it "
                       "breaks the rate pass as any non-linear operation between layers "
                       "does (docs/DESIGN.md section 4.3)")
    if kind == "before":
        return Finding("warning", names, where, source,
                       f"{what} {plural} not linear, on values computed from the network "
                       "input before any LIF. Harmless when the input is a static image fed "
                       "at every step: the rate pass's input is then that image. On a "
                       "sequence input (event frames) the rate pass applies it to the "
                       "input's time mean instead of to each step, which changes the "
                       f"gradient of the layers before the first LIF.{advice}")
    if kind == "between":
        return Finding("error", names, where, source,
                       f"{what} {plural} not linear: the rate pass applies it to firing "
                       "rates, f(mean x), where the spike pass applied it at each step, "
                       "mean f(x). The next LIF's eligibility is a derivative with respect "
                       "to the time mean of its input, so rate-BP's gradient is wrong there, "
                       f"while the logits show nothing (docs/DESIGN.md section 4.3).{advice}")
    return Finding("error", names, where, source,
                   f"{what} {plural} not linear and after the last LIF: the rate pass's "
                   "logits are not the time mean of the spike pass's, so rate-BP's loss and "
                   f"gradient are both wrong (docs/DESIGN.md section 4.3).{advice}")


def _known_sign(value, relation: str) -> bool:
    if value is None:
        return False
    value = np.asarray(value)
    if value.dtype == bool or not np.issubdtype(value.dtype, np.number):
        return False
    return bool({"<=": np.all(value <= 0), ">=": np.all(value >= 0),
                 ">": np.all(value > 0)}[relation])


def _names(paths) -> str:
    return " and ".join(f"'{p}'" for p in sorted(paths))


def _after(paths) -> str:
    return f"after LIF {_names(paths)}" if paths else ""


def _where(op: _Op) -> str:
    if op.reaches and op.after:
        return f"between LIF {_names(op.after)} and LIF {_names(op.reaches)}"
    if op.reaches:
        return f"before LIF {_names(op.reaches)}"
    if op.after:
        return f"after LIF {_names(op.after)}, the last before the output"
    return ""


# Frames of these packages are library code, not the model's: a finding names the
# innermost frame outside them (and the library frame it went through, if any).
def _package_dirs():
    dirs = []
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "chex", "ml_collections"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.append(os.path.dirname(module.__file__) + os.sep)
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    return tuple(dirs), here, os.path.join(here, "models") + os.sep


_THROUGH = ", through "


def _source(eqn) -> str:
    frames = getattr(eqn.source_info.traceback, "frames", None) or []
    libraries, package, zoo = _package_dirs()
    via = None
    for frame in frames:  # innermost first
        path = frame.file_name
        if path.startswith(libraries) or path.startswith("<frozen") or os.path.basename(
                os.path.dirname(path)).startswith("python3"):
            if not path.startswith(os.path.dirname(jax.__file__)) and via is None \
                    and path.startswith(libraries):
                via = frame
            continue
        if path.startswith(package) and not path.startswith(zoo):
            continue
        text = f"{_short(path)}:{frame.line_num} ({frame.function_name})"
        if via is not None:
            text += f"{_THROUGH}{_short(via.file_name)}:{via.line_num} ({via.function_name})"
        return text
    return ""


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


# --------------------------------------------------------------------------- values
def _numeric_checks(probe, net, params, batch_stats, image_shape, T, step_mode, batch, seed,
                    lif_after):
    """The spike and rate passes at T on a random sequence, comparing each LIF's input and
    the logits; rate-BP's and BPTT's gradients at T = 1 on its first step.

    The input changes from step to step: on a static image, spike trains driven by
    constant currents are so regular that, say, a max pooling of them nearly commutes with
    the time mean, and the value check would see nothing."""
    key_x, key_y = jax.random.split(jax.random.key(seed))
    with jax.threefry_partitionable(False):
        x = 2.0 * jax.random.normal(key_x, (T, batch) + image_shape)
    num_classes = jax.eval_shape(
        lambda p, s: net.merge(p, s)(x[0], layers.Ctx("spike", step_mode, 1, train=False)),
        params, batch_stats).shape[-1]
    labels = jax.random.randint(key_y, (batch,), 0, num_classes)

    def passes(params, batch_stats, x, labels):
        probe.capture = True  # the wrapped layers read this while they are traced
        logits_spike, new_stats, records = methods.spike_pass(
            net, params, batch_stats, x, T=T, step_mode=step_mode)
        logits_rate = methods.rate_pass(net, params, new_stats, records,
                                        methods.time_mean(x, T), T=T, step_mode=step_mode)
        probe.capture = False
        batch = {"image": x[0], "label": labels}
        grads = [methods.make_grad_fn(m, net, T=1, step_mode=step_mode)(
            params, batch_stats, batch)[1] for m in ("rate", "bptt")]
        return logits_spike, logits_rate, grads

    try:
        logits_spike, logits_rate, (g_rate, g_bptt) = jax.jit(
            passes, compiler_options=_RUN_ONCE)(params, batch_stats, x, labels)
        jax.effects_barrier()
    finally:
        probe.capture = False
    findings = []
    spike_in, rate_in = probe.inputs["spike"], probe.inputs["rate"]
    for path in spike_in:
        diff = _rel_diff(rate_in.get(path, np.nan), spike_in[path])
        if not diff <= RTOL:
            first = not lif_after.get(path)
            findings.append(Finding(
                "warning" if first else "error", "rate-pass value", f"LIF '{path}'", "",
                f"at T={T}, on a random input sequence, this LIF's rate-pass input differs "
                f"from the time mean of its spike-pass inputs by {diff:.2g} (relative): "
                "something before it is not linear" + (
                    ". No LIF comes before it, so this is harmless for a static image fed "
                    "at every step" if first else
                    ", so rate-BP's gradient there is wrong") + " (docs/DESIGN.md section "
                "2.3)"))
    diff = _rel_diff(np.asarray(logits_rate), np.asarray(logits_spike))
    if diff > RTOL:
        findings.append(Finding(
            "error", "logits", "", "",
            f"at T={T} the rate pass's logits differ from the time mean of the spike "
            f"pass's by {diff:.2g} (relative): a non-linear operation, a neuron of one's "
            "own or an nnx.BatchNorm after the last LIF (docs/DESIGN.md section 4.3)"))
    comparison = analysis.compare_gradients(g_rate, g_bptt)
    if not comparison["max_rel_err"] <= RTOL:
        findings.append(Finding(
            "error", "T=1 gradient", "", "",
            f"at T=1, where the two are equal for a model that keeps the contract, rate-BP's "
            f"gradient differs from BPTT's by {comparison['max_rel_err']:.2g} (largest "
            "relative error of a parameter): a neuron or BatchNorm not from ratebp_jax.layers, "
            "a stochastic layer such as dropout, or a layer that acts differently in the two "
            "phases (docs/DESIGN.md sections 2.5 and 4)"))
    if probe.fired and not any(probe.fired.values()):
        findings.append(Finding(
            "warning", "no spikes", "", "",
            "no LIF fired on the random batch, so the value checks compared zeros and say "
            "nothing; the traced program was still checked"))
    return findings


def _rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0),
                                                            1e-6))
