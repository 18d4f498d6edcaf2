"""Compare rate-BP (or another method) gradients with BPTT's, on random data and weights.

    python experiments/compare_gradients.py --model resnet18 --image-size 32 --batch 8 \
        --T 1 2 4 --step-modes multi single --json grads.json [--dtype bfloat16]

For every (method, step mode, T) it computes the BPTT reference at the same step mode, T and
compute dtype, and prints the cosine similarity and norm ratio over all parameters and the
largest per-parameter relative error ``||g - g_bptt|| / ||g_bptt||``.
"""
from __future__ import annotations

import json
import math

import jax

import cli_errors
from ratebp_jax import analysis, methods, models, neurons
from ratebp_jax.layers import STEP_MODES


def parse_args(argv=None):
    p = cli_errors.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18_tiny", help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--batch", type=int, default=8, help="images in the random batch")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the classifier")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (2 for DVS)")
    p.add_argument("--dtype", default="float32",
                   help=f"compute dtype of convolutions and dense layers, one of "
                        f"{', '.join(models.COMPUTE_DTYPES)}")
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4],
                   help="simulation time steps to compare at")
    p.add_argument("--methods", nargs="+", default=["rate"],
                   help=f"methods compared with BPTT, of {', '.join(methods.METHODS)}")
    p.add_argument("--step-modes", nargs="+", default=["multi", "single"],
                   help=f"step modes, of {', '.join(STEP_MODES)}")
    p.add_argument("--reset", default="soft", help=f"one of {', '.join(neurons.RESET_MODES)}")
    p.add_argument("--rate-grad-scale", default="exact",
                   help="exact (true rate-graph gradient) or reference (x 1/T, as the paper)")
    p.add_argument("--input-scale", type=float, default=1.0,
                   help="std of the random N(0, s^2) input images, > 0")
    p.add_argument("--seed", type=int, default=0, help="weights and batch, in [0, 2^32)")
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


def validate(args):
    """Every flag, before a model is built or a file written; a bad one raises UsageError
    naming the flag, the value and what is allowed."""
    cli_errors.check_choices("--model", [args.model], models.MODELS)
    for flag in ("--batch", "--image-size", "--num-classes", "--in-channels"):
        cli_errors.check_int(flag, getattr(args, flag[2:].replace("-", "_")))
    for T in args.T:
        cli_errors.check_int("--T", T)
    cli_errors.check_choices("--methods", args.methods, methods.METHODS)
    cli_errors.check_choices("--step-modes", args.step_modes, STEP_MODES)
    cli_errors.check_choices("--reset", [args.reset], neurons.RESET_MODES)
    cli_errors.check_choices("--dtype", [args.dtype], models.COMPUTE_DTYPES)
    cli_errors.check_choices("--rate-grad-scale", [args.rate_grad_scale],
                             methods.RATE_GRAD_SCALES)
    cli_errors.check_float("--input-scale", args.input_scale, 0, low_open=True)
    cli_errors.check_int("--seed", args.seed, 0, 2**32 - 1)
    cli_errors.check_output_path("--json", args.json)


def compare(args) -> list[dict]:
    validate(args)
    model = models.create_model(args.model, num_classes=args.num_classes,
                                in_channels=args.in_channels, image_size=args.image_size,
                                neuron=neurons.NeuronConfig(reset=args.reset), seed=args.seed,
                                compute_dtype=args.dtype)
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
                                "reset": args.reset, "dtype": args.dtype, **stats})
    return results


def print_table(results):
    print(f"{'method':<8} {'step':<7} {'T':>3} {'dtype':>9}  {'cosine':>9} {'norm_ratio':>10} "
          f"{'max_rel_err':>11}  worst parameter")
    for r in results:
        worst = max(r["per_param"], key=lambda p: p["rel_err"])["name"]
        print(f"{r['method']:<8} {r['step_mode']:<7} {r['T']:>3} {r['dtype']:>9}  "
              f"{r['cosine']:>9.6f} "
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
