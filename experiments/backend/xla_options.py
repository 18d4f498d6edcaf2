"""XLA:CPU backend options measured on spike inference and the rate-BP step.

    python experiments/backend/xla_options.py [--configs base ynn_no_conv ...] [--rounds 3] \
        [--model resnet18] [--batch 16] [--T 8] [--step-mode multi] [--repeats 3] [--json PATH]

XLA flags are read once per process, when the backend starts, so every configuration runs
in a subprocess of its own with ``XLA_FLAGS`` set (and ``RATEBP_JAX_NO_XLA_DEFAULTS=1``, so
that the package's own defaults do not mix in: every configuration is the bare backend plus
its flags). The configurations run in turn, ``--rounds`` times (ABC ABC ...), so that drift
of the machine touches them alike; each subprocess compiles spike inference and the rate
step and times them round robin. The summary gives, per configuration, the median over
rounds and the median, minimum and maximum of its per-round ratio to ``base`` (the round's
own base run). A flag this jaxlib does not know aborts its subprocess; that configuration
is reported as rejected.

Results: docs/RESULTS.md, "XLA:CPU backend options, and the rate pass at its floor".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from ratebp_jax import cli

# name -> XLA flags. The jaxlib's flags: strings libjax_common.so | grep -o "xla_cpu_[a-z_0-9]*".
CONFIGS = {
    "base": "",
    # YNNPACK (the default library for convolutions and dots in this jaxlib) off for
    # convolutions only: they go to XLA's Eigen convolution, dots stay in YNNPACK.
    "ynn_no_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "xnn_conv": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution "
                "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "eigen_one_thread": "--xla_cpu_multi_thread_eigen=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    "vector_width_128": "--xla_cpu_prefer_vector_width=128",
    "strict_dot_conv_math": "--xla_cpu_strict_dot_conv_math=true",
}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help=f"configurations to measure, of {', '.join(CONFIGS)} (base is always "
                        f"measured)")
    p.add_argument("--rounds", type=int, default=2, help="times each configuration is run")
    p.add_argument("--model", default="resnet18", help="a model name of ratebp_jax.models")
    p.add_argument("--batch", type=int, default=16, help="images per step, B")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    p.add_argument("--T", type=int, default=8, help="time steps")
    p.add_argument("--step-mode", default="multi", help="multi or single")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per program (median)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def validate(args):
    from ratebp_jax import models
    from ratebp_jax.layers import STEP_MODES
    cli.check_choices("--configs", args.configs, CONFIGS)
    cli.check_choices("--model", [args.model], models.MODELS)
    cli.check_choices("--step-mode", [args.step_mode], STEP_MODES)
    for flag in ("--rounds", "--batch", "--image-size", "--T", "--repeats"):
        cli.check_int(flag, getattr(args, flag[2:].replace("-", "_")))
    cli.check_output_path("--json", args.json)


def worker(args) -> dict:
    """In the subprocess: compile and time inference and the rate step under XLA_FLAGS."""
    import jax

    from ratebp_jax import analysis, methods, models, profiling
    model = models.create_model(args.model, image_size=args.image_size)
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(0), args.batch, args.image_size, 3, 10)
    programs = {
        "infer": profiling.inference_program(net, params, batch_stats, batch["image"], T=args.T,
                                             step_mode=args.step_mode),
        "rate": profiling.step_program("rate", net, params, batch_stats, batch, T=args.T,
                                       step_mode=args.step_mode)}
    compiled, stats = {}, {}
    for name, (fn, fn_args) in programs.items():
        compiled[name], stats[name] = profiling.compile_with_stats(fn, *fn_args)
    times = profiling.interleaved_medians(
        {name: (compiled[name], fn_args) for name, (_, fn_args) in programs.items()},
        repeats=args.repeats)
    return {"infer_s": times["infer"], "rate_s": times["rate"],
            "compile_s": sum(s["compile_s"] for s in stats.values()),
            "rate_temp_bytes": stats["rate"]["temp_bytes"]}


def run_config(args, name: str) -> dict:
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), CONFIGS[name]) if f)
    env = dict(os.environ, XLA_FLAGS=flags, RATEBP_JAX_NO_XLA_DEFAULTS="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
           "--batch", str(args.batch), "--image-size", str(args.image_size), "--T", str(args.T),
           "--step-mode", args.step_mode, "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"config": name, "flags": CONFIGS[name], "rejected": True,
                "error": proc.stderr.strip().splitlines()[-1:] or [""]}
    return {"config": name, "flags": CONFIGS[name], "rejected": False,
            **json.loads(proc.stdout.strip().splitlines()[-1])}


def summarise(runs: list[dict], configs: list[str], rounds: int) -> list[dict]:
    summary = []
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        if any(r["rejected"] for r in mine):
            summary.append({"config": name, "flags": CONFIGS[name], "rejected": True,
                            "error": mine[0].get("error")})
            continue
        row = {"config": name, "flags": CONFIGS[name], "rejected": False}
        for key in ("infer_s", "rate_s"):
            row[key] = float(np.median([r[key] for r in mine]))
            ratios = [r[key] / b[key] for r, b in zip(mine, [r for r in runs
                                                              if r["config"] == "base"])]
            row[key.replace("_s", "_vs_base")] = float(np.median(ratios))
            row[key.replace("_s", "_vs_base_range")] = [float(min(ratios)), float(max(ratios))]
        row["rate_over_infer"] = row["rate_s"] / row["infer_s"]
        row["compile_s"] = float(np.median([r["compile_s"] for r in mine]))
        row["rate_temp_bytes"] = mine[0]["rate_temp_bytes"]
        summary.append(row)
    return summary


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    configs = ["base"] + [c for c in args.configs if c != "base"]
    runs = []
    for round_ in range(args.rounds):
        for name in configs:
            runs.append({"round": round_, **run_config(args, name)})
            r = runs[-1]
            print(f"  round {round_} {name:<22} " + (
                f"rejected: {r['error']}" if r["rejected"] else
                f"infer {r['infer_s']:.3f} s  rate {r['rate_s']:.3f} s"), flush=True)
    summary = summarise(runs, configs, args.rounds)
    print(f"{'config':<22}{'infer s':>9}{'/base':>7}{'range':>14}{'rate s':>9}{'/base':>7}"
          f"{'range':>14}{'rate/inf':>9}")
    for s in summary:
        if s["rejected"]:
            print(f"{s['config']:<22} rejected: {s['error']}")
            continue
        print(f"{s['config']:<22}{s['infer_s']:9.3f}{s['infer_vs_base']:7.3f}"
              f"{'%.2f-%.2f' % tuple(s['infer_vs_base_range']):>14}{s['rate_s']:9.3f}"
              f"{s['rate_vs_base']:7.3f}{'%.2f-%.2f' % tuple(s['rate_vs_base_range']):>14}"
              f"{s['rate_over_infer']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "worker"},
                       "runs": runs, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
