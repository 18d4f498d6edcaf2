"""Compare rate-BP (or another method) gradients with BPTT's, on random data and weights.

    python experiments/compare_gradients.py --model resnet18 --image-size 32 --batch 8 \
        --T 1 2 4 --step-modes multi single --json grads.json

For every (method, step mode, T) it computes the BPTT reference at the same step mode and T,
and prints the cosine similarity and norm ratio over all parameters and the largest
per-parameter relative error ``||g - g_bptt|| / ||g_bptt||``.
"""
from __future__ import annotations

import argparse
import json
import math

import jax

import cli_errors
from ratebp_jax import analysis, methods, models, neurons
from ratebp_jax.layers import STEP_MODES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18_tiny", help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--methods", nargs="+", default=["rate"])
    p.add_argument("--step-modes", nargs="+", default=["multi", "single"])
    p.add_argument("--reset", default="soft", help=f"one of {', '.join(neurons.RESET_MODES)}")
    p.add_argument("--rate-grad-scale", default="exact",
                   help="exact (true rate-graph gradient) or reference (x 1/T, as the paper)")
    p.add_argument("--input-scale", type=float, default=1.0,
                   help="std of the random N(0, s^2) input images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


def validate(args):
    for field in ("batch", "image_size", "num_classes", "in_channels"):
        if getattr(args, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')}={getattr(args, field)}: must be >= 1")
    for T in args.T:
        if T < 1:
            raise ValueError(f"--T={T}: every T must be >= 1")
    cli_errors.check_choices("--methods", args.methods, list(methods.METHODS))
    cli_errors.check_choices("--step-modes", args.step_modes, STEP_MODES)
    cli_errors.check_choices("--rate-grad-scale", [args.rate_grad_scale],
                             methods.RATE_GRAD_SCALES)


def compare(args) -> list[dict]:
    validate(args)
    model = models.create_model(args.model, num_classes=args.num_classes,
                                in_channels=args.in_channels, image_size=args.image_size,
                                neuron=neurons.NeuronConfig(reset=args.reset), seed=args.seed)
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(args.seed + 1), args.batch, args.image_size,
                                  args.in_channels, args.num_classes, scale=args.input_scale)
    results = []
    for step_mode in args.step_modes:
        for T in args.T:
            def grads(method):
                fn = methods.make_grad_fn(method, net, T=T, step_mode=step_mode,
                                          rate_grad_scale=args.rate_grad_scale)
                return jax.jit(fn)(params, batch_stats, batch)[1]

            g_bptt = grads("bptt")
            for method in args.methods:
                stats = analysis.compare_gradients(grads(method), g_bptt)
                results.append({"method": method, "step_mode": step_mode, "T": T,
                                "reset": args.reset, **stats})
    return results


def print_table(results):
    print(f"{'method':<8} {'step':<7} {'T':>3}  {'cosine':>9} {'norm_ratio':>10} "
          f"{'max_rel_err':>11}  worst parameter")
    for r in results:
        worst = max(r["per_param"], key=lambda p: p["rel_err"])["name"]
        print(f"{r['method']:<8} {r['step_mode']:<7} {r['T']:>3}  {r['cosine']:>9.6f} "
              f"{r['norm_ratio']:>10.6f} {r['max_rel_err']:>11.3e}  {worst}")


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
    results = compare(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe({"results": results}), f, indent=1)


if __name__ == "__main__":
    cli_errors.run(main)
