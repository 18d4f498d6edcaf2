"""Compare rate-BP (or another method) gradients with BPTT's, per parameter and per layer.

    python experiments/compare_gradients.py --model resnet18 --image-size 32 --batch 8 \
        --T 1 2 4 --step-modes multi single --json grads.json [--dtype bfloat16]
    python experiments/compare_gradients.py --workdir runs/default-rate-multi-T4 \
        [--best] [--batches 4] [--methods rate sltt ottt]

Without ``--workdir`` it compares on random weights and an N(0, s^2) batch. With it, on a
trained run: the run's config, dataset and checkpoint (``train.load_trained``; the latest
one, or the best with ``--best``), on ``--batches`` real training batches without
augmentation, at the run's T and step mode unless ``--T``/``--step-modes`` say otherwise;
the figures are averaged over the batches, per parameter and per layer.

Convolutions and dots run at ``--precision`` (default ``highest``, full float32; see
``PRECISIONS``). For every (method, step mode, T) it computes the BPTT reference at the same
step mode, T and compute dtype, and prints the cosine similarity and norm ratio over all
parameters, the same two figures over the hidden layers (median and minimum; the readout,
exact for rate-BP at any T, left out), and the largest per-parameter relative error
``||g - g_bptt|| / max(||g_bptt||, 1e-3 ||G_bptt||)`` (``analysis.compare_gradients``). Parameters
whose BPTT gradient is under that floor, such as conv biases that feed a BatchNorm (their
true gradient is zero), are marked ``structurally_zero``: their error is rounding noise,
left out of ``max_rel_err`` and given as ``max_zero_err``, relative to the whole gradient's
norm. The JSON holds every figure per parameter and per layer, with absolute gradient norms
and the arguments.
"""
from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from ratebp_jax import analysis, cli, methods, models, neurons
from ratebp_jax.layers import STEP_MODES

RANDOM_DEFAULTS = {"T": [1, 2, 4], "step_modes": ["multi", "single"]}
# jax.default_matmul_precision's names. Full float32 is the default because JAX's default on
# NVIDIA GPUs is TF32: on an H200, rate-BP against BPTT at T=1 then differed by 2.5e-4, not
# ~1e-7 (docs/RESULTS.md, GPU section). CPUs compute float32 in full at any setting.
PRECISIONS = ("default", "high", "highest")
# Flags that describe the random model; with --workdir the run's config decides them.
MODEL_FLAGS = ("model", "batch", "image_size", "num_classes", "in_channels", "dtype", "reset",
               "learnable_leak", "rate_grad_scale", "input_scale", "seed")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None,
                   help="compare on this finished (or interrupted) run's checkpoint and "
                        "training data instead of random weights and data")
    p.add_argument("--best", action="store_true",
                   help="with --workdir: the best checkpoint instead of the latest")
    p.add_argument("--batches", type=int, default=4,
                   help="with --workdir: real training batches to average over")
    p.add_argument("--model", default=None,
                   help=f"one of {', '.join(models.MODELS)} (random mode; default "
                        f"resnet18_tiny)")
    p.add_argument("--batch", type=int, default=None,
                   help="images in the random batch (random mode; default 8)")
    p.add_argument("--image-size", type=int, default=None,
                   help="height and width of the images (random mode; default 32)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the classifier (random mode; default 10)")
    p.add_argument("--in-channels", type=int, default=None,
                   help="input channels, 2 for DVS (random mode; default 3)")
    p.add_argument("--dtype", default=None,
                   help=f"compute dtype of convolutions and dense layers, one of "
                        f"{', '.join(models.COMPUTE_DTYPES)} (random mode; default float32)")
    p.add_argument("--T", type=int, nargs="+", default=None,
                   help="simulation time steps to compare at (default: 1 2 4, or the run's "
                        "T with --workdir)")
    p.add_argument("--methods", nargs="+", default=["rate"],
                   help=f"methods compared with BPTT, of {', '.join(methods.METHODS)}")
    p.add_argument("--step-modes", nargs="+", default=None,
                   help=f"step modes, of {', '.join(STEP_MODES)} (default: both, or the "
                        f"run's with --workdir)")
    p.add_argument("--reset", default=None,
                   help=f"one of {', '.join(neurons.RESET_MODES)} (random mode; default soft)")
    p.add_argument("--learnable-leak", action="store_const", const=True, default=None,
                   help="every LIF layer learns its leak (PLIF); its gradient is compared per "
                        "layer too (random mode; default off)")
    p.add_argument("--rate-grad-scale", default=None,
                   help="exact (true rate-graph gradient) or reference (x 1/T, as the paper) "
                        "(random mode; default exact)")
    p.add_argument("--input-scale", type=float, default=None,
                   help="std of the random N(0, s^2) input images, > 0 (random mode; "
                        "default 1.0)")
    p.add_argument("--seed", type=int, default=None,
                   help="weights and batch, in [0, 2^32) (random mode; default 0)")
    p.add_argument("--precision", default="highest",
                   help=f"JAX's matmul precision for every convolution and dot, one of "
                        f"{', '.join(PRECISIONS)} (default highest: full float32, so that the "
                        f"figures describe the method and not a GPU's TF32 rounding)")
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


RANDOM_MODEL_DEFAULTS = {"model": "resnet18_tiny", "batch": 8, "image_size": 32,
                         "num_classes": 10, "in_channels": 3, "dtype": "float32",
                         "reset": "soft", "learnable_leak": False, "rate_grad_scale": "exact",
                         "input_scale": 1.0,
                         "seed": 0}


def validate(args):
    """Every flag, before a model is built or a file written; a bad one raises UsageError
    naming the flag, the value and what is allowed. Fills in the defaults of the mode."""
    cli.check_int("--batches", args.batches)
    if args.workdir is not None:
        given = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if getattr(args, f) is not None]
        if given:
            raise cli.UsageError(f"{', '.join(given)}: taken from the run's config with "
                                        f"--workdir; leave {'them' if len(given) > 1 else 'it'}"
                                        f" out")
        if not os.path.isfile(os.path.join(args.workdir, "config.json")):
            raise cli.UsageError(f"--workdir={args.workdir!r}: no config.json there; "
                                        f"give the workdir of a training run")
        validate_common(args)
        cli.check_output_path("--json", args.json)
        return
    if args.best:
        raise cli.UsageError("--best: needs --workdir")
    for field, value in {**RANDOM_MODEL_DEFAULTS, **RANDOM_DEFAULTS}.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    cli.check_choices("--model", [args.model], models.MODELS)
    for flag in ("--batch", "--image-size", "--num-classes", "--in-channels"):
        cli.check_int(flag, getattr(args, flag[2:].replace("-", "_")))
    validate_common(args)
    cli.check_choices("--reset", [args.reset], neurons.RESET_MODES)
    cli.check_choices("--dtype", [args.dtype], models.COMPUTE_DTYPES)
    cli.check_choices("--rate-grad-scale", [args.rate_grad_scale],
                             methods.RATE_GRAD_SCALES)
    cli.check_number("--input-scale", args.input_scale, 0, low_open=True)
    cli.check_int("--seed", args.seed, 0, 2**32 - 1)
    cli.check_output_path("--json", args.json)


def compare(args) -> list[dict]:
    validate(args)
    if args.workdir is not None:
        return compare_on_run(args)
    model = models.create_model(args.model, num_classes=args.num_classes,
                                in_channels=args.in_channels, image_size=args.image_size,
                                neuron=neurons.NeuronConfig(reset=args.reset,
                                                            learnable_leak=args.learnable_leak),
                                seed=args.seed,
                                compute_dtype=args.dtype)
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(args.seed + 1), args.batch, args.image_size,
                                  args.in_channels, args.num_classes, scale=args.input_scale)
    layers = analysis.layer_groups(net, params, batch_stats, batch["image"].shape[1:])
    return compare_all(args, net, params, batch_stats, [batch], layers,
                       reset=args.reset, dtype=args.dtype,
                       rate_grad_scale=args.rate_grad_scale)


def compare_on_run(args) -> list[dict]:
    """The comparison on a trained run's checkpoint and its real training data."""
    from ratebp_jax import train
    config = load_run_config(args.workdir)
    dataset, net, state = train.load_trained(config, args.workdir, best=args.best,
                                             log=lambda message: None)
    params, batch_stats = state["params"], state["batch_stats"]
    args.T = args.T or [config.T]
    args.step_modes = args.step_modes or [config.step_mode]
    batches = real_batches(dataset, config.batch_size, args.batches, config.seed)
    layers = analysis.layer_groups(net, params, batch_stats, dataset.image_shape)
    return compare_all(args, net, params, batch_stats, batches, layers, reset=config.reset,
                       dtype=config.compute_dtype, rate_grad_scale=config.rate_grad_scale)


def load_run_config(workdir):
    """The run's config: the default config updated with the workdir's ``config.json``
    (fields added to the code since the run keep their defaults)."""
    from configs import default
    config = default.get_config()
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    recorded.pop("data_fingerprint", None)  # what the run trained on, not a config field
    config.update(recorded)
    return config


def real_batches(dataset, batch_size: int, count: int, seed: int) -> list[dict]:
    """The first ``count`` training batches of epoch 0 in the run's order, through the test
    transform (normalisation, no augmentation), so that the figures describe the data and
    not the augmentation's draws."""
    count = min(count, dataset.steps_per_epoch(batch_size))
    order = np.random.default_rng([seed, 0]).permutation(len(dataset.train))
    batches = []
    for i in range(count):
        images, labels = dataset.train[np.sort(order[i * batch_size:(i + 1) * batch_size])]
        batches.append({"image": dataset.test_transform(images, np.random.default_rng(0)),
                        "label": np.asarray(labels, np.int32)})
    return batches


def validate_common(args):
    """The flags both modes share (``--T`` and ``--step-modes`` may still be unset)."""
    for T in args.T or []:
        cli.check_int("--T", T)
    cli.check_choices("--methods", args.methods, methods.METHODS)
    cli.check_choices("--step-modes", args.step_modes or [], STEP_MODES)


def compare_all(args, net, params, batch_stats, batches, layers, **record) -> list[dict]:
    """Every (method, step mode, T) against BPTT, averaged over ``batches``."""
    results = []
    for step_mode in args.step_modes:
        for T in args.T:
            compiled = {}  # one jitted function per method, reused for every batch

            def grads(method, batch):
                if method not in compiled:
                    compiled[method] = jax.jit(methods.make_grad_fn(
                        method, net, T=T, step_mode=step_mode,
                        rate_grad_scale=record["rate_grad_scale"]))
                return compiled[method](params, batch_stats, batch)[1]

            references = [grads("bptt", batch) for batch in batches]
            for method in args.methods:
                stats = analysis.mean_comparison([
                    analysis.compare_gradients(grads(method, batch), g_bptt, layers)
                    for batch, g_bptt in zip(batches, references)])
                results.append({"method": method, "step_mode": step_mode, "T": T,
                                "batches": len(batches), **record, **stats})
    return results


def print_table(results):
    print(f"{'method':<8} {'step':<7} {'T':>3} {'dtype':>9}  {'cosine':>9} {'norm_ratio':>10} "
          f"{'hidden cos med/min':>19} {'hidden norm med/min':>20} {'max_rel_err':>11}  "
          f"worst parameter")
    for r in results:
        worst = max((p for p in r["per_param"] if not p["structurally_zero"]),
                    key=lambda p: p["rel_err"], default={"name": "-"})["name"]
        h = r["hidden"]
        print(f"{r['method']:<8} {r['step_mode']:<7} {r['T']:>3} {r['dtype']:>9}  "
              f"{r['cosine']:>9.6f} {r['norm_ratio']:>10.6f} "
              f"{_pair(h['median_cosine'], h['min_cosine']):>19} "
              f"{_pair(h['median_norm_ratio'], h['min_norm_ratio']):>20} "
              f"{r['max_rel_err']:>11.3e}  {worst}")
    zero = [p["name"] for p in results[0]["per_param"] if p["structurally_zero"]] if results else []
    if zero:
        worst_zero = max(r["max_zero_err"] for r in results)
        print(f"structurally zero (BPTT gradient under {analysis.REL_ERR_FLOOR:g} of the whole "
              f"gradient's norm; left out of max_rel_err): {len(zero)} parameters, e.g. "
              f"{', '.join(zero[:3])}; their largest error is {worst_zero:.1e} of the whole "
              f"gradient's norm (max_zero_err)")
    if results:
        print(f"hidden: {results[0]['hidden']['layers']} layers; readout "
              f"{results[0]['hidden']['readout']!r} left out")
    for r in results:
        leaks = [p for p in r["per_param"] if p["name"].endswith("leak_logit")]
        if leaks:  # one scalar per LIF layer: its ratio to BPTT's, signed
            print(f"{r['method']} {r['step_mode']} T={r['T']} learnable leaks, gradient / "
                  f"BPTT's: " + ", ".join(f"{p['name'].rpartition('.')[0]} "
                                          f"{p['cosine'] * p['norm_ratio']:+.3f}"
                                          for p in leaks))


def _pair(a, b):
    return "-" if a is None else f"{a:.4f}/{b:.4f}"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def main(argv=None):
    args = parse_args(argv)
    cli.check_choices("--precision", [args.precision], PRECISIONS)  # before it is set
    with jax.default_matmul_precision(args.precision):
        results = compare(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe({"args": vars(args), "results": results}), f, indent=1)


if __name__ == "__main__":
    cli.run(main)
