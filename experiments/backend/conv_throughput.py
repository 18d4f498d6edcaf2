"""GFLOP/s of every convolution shape of a model, forward and both gradients, against peak.

    python experiments/backend/conv_throughput.py [--model resnet18] [--batch 16] [--T 8]
        [--step-modes multi single] [--layouts NHWC NCHW] [--repeats 5] [--json PATH]
    python experiments/backend/conv_throughput.py --quick    # seconds: a tiny model at 8x8

The shapes are read from the model itself (one abstract forward at ``--image-size``), so
they are the convolutions it runs: for ResNet-18 (CIFAR) eleven distinct shapes, each with
its number of uses. Every shape is timed at the batch each step mode runs it at, ``T*B``
images in multi step mode (time folded into the batch) and ``B`` in single step mode, as
three programs: the forward, the input gradient and the kernel gradient. With the NHWC
layout, these are the project's own convolution (``convolution.conv_nhwc``: JAX's value and
input gradient, and ``convolution.kernel_grad``), the code the models run; NCHW/OIHW is
JAX's ``lax.conv_general_dilated`` and its transposes, for comparison. A shape's work is
``2 N Ho Wo k^2 Cin Cout`` FLOPs in each of the three programs. The whole network's
figure is its total FLOPs over the summed time of its uses. ``peak`` is the GFLOP/s of a
large float32 matmul measured in the same run, the machine's practical peak; every figure
also appears as a fraction of it. All programs of one (step mode, layout) are timed round
robin (``profiling.interleaved_medians``).

Results: docs/RESULTS.md, "XLA:CPU convolution throughput, ResNet-18 (CIFAR shape)".
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ratebp_jax import cli, convolution, models, profiling
from ratebp_jax.layers import STEP_MODES, Ctx

LAYOUTS = ("NHWC", "NCHW")
OPS = ("forward", "input_grad", "kernel_grad")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--batch", type=int, default=16, help="images per training step, B")
    p.add_argument("--T", type=int, default=8, help="time steps (multi mode runs T*B images)")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    p.add_argument("--step-modes", nargs="+", default=["multi", "single"],
                   help=f"batch sizes to time at: multi T*B, single B; of {', '.join(STEP_MODES)}")
    p.add_argument("--layouts", nargs="+", default=["NHWC"],
                   help=f"convolution layouts, of {', '.join(LAYOUTS)} (NHWC: the project's "
                        f"convolution)")
    p.add_argument("--peak-size", type=int, default=2048,
                   help="the peak is timed on a float32 matmul of this size (square)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per program (median)")
    p.add_argument("--quick", action="store_true",
                   help="a test-sized run: resnet18_tiny at 8x8, B=2, T=2, a 256 matmul, "
                        "1 repeat (overrides those flags)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.batch, args.T = "resnet18_tiny", 8, 2, 2
        args.peak_size, args.repeats = 256, 1
    return args


def validate(args):
    cli.check_choices("--model", [args.model], models.MODELS)
    for flag in ("--batch", "--T", "--image-size", "--repeats"):
        cli.check_int(flag, getattr(args, flag[2:].replace("-", "_")))
    cli.check_int("--peak-size", args.peak_size, 16)
    cli.check_choices("--step-modes", args.step_modes, STEP_MODES)
    cli.check_choices("--layouts", args.layouts, LAYOUTS)
    cli.check_output_path("--json", args.json)


# --------------------------------------------------------------------------- shapes
def conv_shapes(model_name: str, image_size: int) -> list[dict]:
    """The distinct convolutions of the model in order of first use: ``[{"H", "W", "cin",
    "cout", "kernel", "stride", "padding", "uses"}]`` (input size per image)."""
    model = models.create_model(model_name, image_size=image_size)
    seen = {}

    def recorder(conv):
        def record(x, w, window_strides, padding, *args, **kwargs):
            pad = (lax.padtype_to_pads(x.shape[1:3], w.shape[:2], window_strides, padding)
                   if isinstance(padding, str) else padding)
            key = (x.shape[1], x.shape[2], w.shape[2], w.shape[3], w.shape[0],
                   tuple(window_strides)[0], tuple(tuple(map(int, p)) for p in pad))
            seen[key] = seen.get(key, 0) + 1
            return conv(x, w, window_strides, padding, *args, **kwargs)
        return record

    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = recorder(module.conv_general_dilated)
    jax.eval_shape(lambda x: model(x, Ctx("spike", "multi", 1, train=False)),
                   jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return [{"H": h, "W": w, "cin": ci, "cout": co, "kernel": k, "stride": s,
             "padding": [list(p) for p in pad], "uses": n}
            for (h, w, ci, co, k, s, pad), n in seen.items()]


def flops(shape: dict, n: int) -> float:
    """Multiply-adds times two of one convolution of ``n`` images."""
    (plo, phi), _ = shape["padding"]
    ho = (shape["H"] + plo + phi - shape["kernel"]) // shape["stride"] + 1
    (qlo, qhi) = shape["padding"][1]
    wo = (shape["W"] + qlo + qhi - shape["kernel"]) // shape["stride"] + 1
    return 2.0 * n * ho * wo * shape["kernel"] ** 2 * shape["cin"] * shape["cout"]


# --------------------------------------------------------------------------- programs
def programs(shape: dict, n: int, layout: str, rng: np.random.Generator) -> dict:
    """``{op: (jitted fn, args)}`` for the three convolutions of ``shape`` at batch ``n``."""
    k, s = shape["kernel"], (shape["stride"],) * 2
    pad = tuple(tuple(p) for p in shape["padding"])
    x = rng.standard_normal((n, shape["H"], shape["W"], shape["cin"]), np.float32)
    w = (rng.standard_normal((k, k, shape["cin"], shape["cout"]), np.float32)
         / np.sqrt(k * k * shape["cin"]))
    if layout == "NHWC":
        def fwd(x, w):
            return convolution.conv_nhwc(x, w, s, pad)

        def kgrad(x, g):
            return convolution.kernel_grad(x, g, w.shape, s, pad)
    else:
        x, w = x.transpose(0, 3, 1, 2).copy(), w.transpose(3, 2, 0, 1).copy()

        def fwd(x, w):
            return lax.conv_general_dilated(x, w, s, pad,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

        def kgrad(x, g):
            return jax.vjp(lambda w_: fwd(x, w_), w)[1](g)[0]
    g = rng.standard_normal(jax.eval_shape(fwd, x, w).shape, np.float32)
    x, w, g = map(jnp.asarray, (x, w, g))

    def igrad(w, g):
        return jax.vjp(lambda x_: fwd(x_, w), x)[1](g)[0]
    return {"forward": (jax.jit(fwd), (x, w)), "input_grad": (jax.jit(igrad), (w, g)),
            "kernel_grad": (jax.jit(kgrad), (x, g))}


def peak_gflops(size: int, repeats: int) -> float:
    rng = np.random.default_rng(1)
    a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32)) for _ in range(2))
    matmul = jax.jit(jnp.dot)
    seconds = profiling.interleaved_medians({"matmul": (matmul, (a, b))}, repeats=repeats)
    return 2.0 * size ** 3 / seconds["matmul"] / 1e9


def measure(shapes, n: int, layout: str, repeats: int) -> list[dict]:
    """One row per shape and op: seconds and GFLOP/s at batch ``n``, timed round robin."""
    progs, rng = {}, np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        for op, prog in programs(shape, n, layout, rng).items():
            progs[(i, op)] = prog
    times = profiling.interleaved_medians(progs, repeats=repeats)
    return [{**shape, "batch": n, "layout": layout, "op": op, "seconds": times[(i, op)],
             "gflop": flops(shape, n) / 1e9,
             "gflops_per_s": flops(shape, n) / times[(i, op)] / 1e9}
            for i, shape in enumerate(shapes) for op in OPS]


def network_totals(rows: list[dict]) -> list[dict]:
    """Per (batch, layout, op): the network's FLOPs over its summed time, uses counted."""
    out = {}
    for r in rows:
        t = out.setdefault((r["step_mode"], r["batch"], r["layout"], r["op"]),
                           {"gflop": 0.0, "seconds": 0.0})
        t["gflop"] += r["gflop"] * r["uses"]
        t["seconds"] += r["seconds"] * r["uses"]
    return [{"step_mode": mode, "batch": n, "layout": layout, "op": op, **t,
             "gflops_per_s": t["gflop"] / t["seconds"]}
            for (mode, n, layout, op), t in out.items()]


def run(args) -> dict:
    validate(args)
    shapes = conv_shapes(args.model, args.image_size)
    start = time.perf_counter()
    peak = peak_gflops(args.peak_size, max(args.repeats, 3))
    rows = []
    for mode in args.step_modes:
        n = args.T * args.batch if mode == "multi" else args.batch
        for layout in args.layouts:
            rows += [{"step_mode": mode, **r} for r in measure(shapes, n, layout, args.repeats)]
            print(f"  measured {mode} (batch {n}) {layout}", flush=True)
    peak_after = peak_gflops(args.peak_size, max(args.repeats, 3))
    totals = network_totals(rows)
    for r in rows + totals:
        r["fraction_of_peak"] = r["gflops_per_s"] / max(peak, peak_after)
    return {"config": {"model": args.model, "batch": args.batch, "T": args.T,
                       "image_size": args.image_size, "repeats": args.repeats,
                       "peak_size": args.peak_size, "backend": jax.default_backend(),
                       "device": str(jax.devices()[0].device_kind)},
            "peak_gflops_per_s": max(peak, peak_after),
            "peak_gflops_per_s_before_after": [peak, peak_after],
            "seconds": time.perf_counter() - start, "shapes": shapes, "results": rows,
            "network": totals}


def print_table(result):
    print(f"peak (float32 matmul {result['config']['peak_size']}^2): "
          f"{result['peak_gflops_per_s']:.1f} GFLOP/s (before, after: "
          f"{', '.join(f'{p:.1f}' for p in result['peak_gflops_per_s_before_after'])})")
    print(f"{'mode':<7}{'N':>5} {'layout':<6} {'shape':<24}{'uses':>5} "
          + "".join(f"{op + ' GF/s':>18}" for op in OPS))
    by_key = {}
    for r in result["results"]:
        shape = (f"{r['H']}x{r['W']} {r['cin']}->{r['cout']} k{r['kernel']}s{r['stride']}")
        by_key.setdefault((r["step_mode"], r["batch"], r["layout"], shape, r["uses"]),
                          {})[r["op"]] = r
    for (mode, n, layout, shape, uses), ops in by_key.items():
        print(f"{mode:<7}{n:>5} {layout:<6} {shape:<24}{uses:>5} " + "".join(
            f"{ops[op]['gflops_per_s']:>10.1f} ({ops[op]['fraction_of_peak']:>4.0%})"
            for op in OPS))
    print("whole network (uses counted):")
    for t in result["network"]:
        print(f"  {t['step_mode']:<7}{t['batch']:>5} {t['layout']:<6} {t['op']:<12} "
              f"{t['gflop']:8.2f} GFLOP {t['seconds']:8.4f} s {t['gflops_per_s']:8.1f} GFLOP/s "
              f"({t['fraction_of_peak']:.0%} of peak)")


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
