"""Memory and time of one training step against T, per method and step mode.

    python experiments/benchmark.py --model resnet18 --batch 16 --image-size 32 \
        --T 1 2 4 8 16 --methods bptt bptt_remat rate --step-modes multi single \
        --repeats 3 --json bench.json --plot bench.png

For every (method, step mode, T): XLA's compiled memory statistics of the jitted gradient
step (temp_bytes, argument_bytes), compile time, and the median step time after a warm-up
(blocking on the result); plus the spike-mode forward alone (infer_s), the floor no
training method can beat. Ratios are taken within this one run: method/BPTT time and
memory at the same T and step mode, step/inference time (the physical lower bound is about
(T+3)/T for rate-BP and 3 for BPTT: one forward plus two backward passes' worth of work),
and memory at T over memory at T=1.
"""
from __future__ import annotations

import argparse
import json

import jax

import cli_errors
from ratebp_jax import analysis, methods, models
from ratebp_jax.layers import STEP_MODES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=["bptt", "bptt_remat", "rate"])
    p.add_argument("--step-modes", nargs="+", default=["multi", "single"])
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per step (median); 0: memory and compile time only")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


def run(args) -> list[dict]:
    cli_errors.check_choices("--methods", args.methods, list(methods.METHODS))
    cli_errors.check_choices("--step-modes", args.step_modes, STEP_MODES)
    if min(args.T) < 1 or args.batch < 1 or args.repeats < 0:
        raise ValueError("--T and --batch must be >= 1, --repeats >= 0")
    model = models.create_model(args.model, num_classes=args.num_classes,
                                image_size=args.image_size)
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(0), args.batch, args.image_size, 3,
                                  args.num_classes)
    rows = []
    for mode in args.step_modes:
        for T in args.T:
            infer = analysis.profile_inference(net, params, batch_stats, batch["image"], T=T,
                                               step_mode=mode, repeats=args.repeats)
            for method in args.methods:
                stats = analysis.profile_step(method, net, params, batch_stats, batch, T=T,
                                              step_mode=mode, repeats=args.repeats)
                rows.append({"method": method, "step_mode": mode, "T": T, **stats,
                             "infer_s": infer["infer_s"],
                             "infer_temp_bytes": infer["temp_bytes"]})
                print(f"  measured {method:<10} {mode:<6} T={T:<3} step {stats['step_s']}s "
                      f"temp {stats['temp_bytes'] / 2**20:.1f} MiB", flush=True)
    return add_ratios(rows)


def add_ratios(rows):
    def find(method, mode, T):
        return next((r for r in rows if (r["method"], r["step_mode"], r["T"]) ==
                     (method, mode, T)), None)
    def ratio(a, b):
        return a / b if a is not None and b else None

    for r in rows:
        bptt = find("bptt", r["step_mode"], r["T"]) or {}
        base = find(r["method"], r["step_mode"], min(x["T"] for x in rows))
        r["time_vs_bptt"] = ratio(r["step_s"], bptt.get("step_s"))
        r["temp_vs_bptt"] = ratio(r["temp_bytes"], bptt.get("temp_bytes"))
        r["step_over_infer"] = ratio(r["step_s"], r["infer_s"])
        r["temp_vs_first_T"] = ratio(r["temp_bytes"], base["temp_bytes"])
    return rows


def print_table(rows):
    print(f"{'method':<11}{'mode':<7}{'T':>3} {'temp MiB':>9} {'arg MiB':>8} {'compile':>8} "
          f"{'step s':>8} {'infer s':>8} {'t/bptt':>7} {'m/bptt':>7} {'step/inf':>8} "
          f"{'m/m(T0)':>8}")
    def fmt(x, digits=3):
        return f"{x:.{digits}f}" if x is not None else "-"

    for r in rows:
        print(f"{r['method']:<11}{r['step_mode']:<7}{r['T']:>3} {r['temp_bytes'] / 2**20:>9.2f} "
              f"{r['argument_bytes'] / 2**20:>8.2f} {r['compile_s']:>8.2f} "
              f"{fmt(r['step_s'], 4):>8} {fmt(r['infer_s'], 4):>8} {fmt(r['time_vs_bptt']):>7} "
              f"{fmt(r['temp_vs_bptt']):>7} {fmt(r['step_over_infer'], 2):>8} "
              f"{fmt(r['temp_vs_first_T'], 2):>8}")


def plot(rows, path):
    # The object API draws without pyplot's global backend, so notebooks keep inline plots.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_mem, ax_time = fig.subplots(1, 2)
    for method in dict.fromkeys(r["method"] for r in rows):
        for mode in dict.fromkeys(r["step_mode"] for r in rows):
            sel = [r for r in rows if r["method"] == method and r["step_mode"] == mode]
            style = "-" if mode == "multi" else "--"
            ax_mem.plot([r["T"] for r in sel], [r["temp_bytes"] / 2**20 for r in sel], style,
                        marker="o", label=f"{method} ({mode})")
            timed = [r for r in sel if r["step_s"] is not None]
            ax_time.plot([r["T"] for r in timed], [r["step_s"] for r in timed], style,
                         marker="o", label=f"{method} ({mode})")
    for mode in dict.fromkeys(r["step_mode"] for r in rows):
        sel = [r for r in rows if r["step_mode"] == mode and r["method"] == rows[0]["method"]
               and r["infer_s"] is not None]
        ax_time.plot([r["T"] for r in sel], [r["infer_s"] for r in sel], ":", color="grey",
                     label=f"inference ({mode})")
    ax_mem.set(xlabel="T", ylabel="XLA temp memory (MiB)", title="training-step memory",
               xscale="log", yscale="log")
    ax_time.set(xlabel="T", ylabel="step time (s)", title="training-step time", xscale="log")
    if any(r["step_s"] is not None for r in rows):
        ax_time.set_yscale("log")
    for ax in (ax_mem, ax_time):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    rows = run(args)
    print_table(rows)
    meta = {"model": args.model, "batch": args.batch, "image_size": args.image_size,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": meta, "results": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    cli_errors.run(main)
