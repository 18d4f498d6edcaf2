"""Memory and time of one training step against T, per method and step mode.

    python experiments/benchmark.py --model resnet18 --batch 16 --image-size 32 \
        --T 1 2 4 8 16 --methods bptt bptt_remat rate --step-modes multi single \
        --repeats 3 --json bench.json --plot bench.png [--dtype bfloat16]

For every (method, step mode, T): XLA's compiled memory statistics of the jitted gradient
step (temp_bytes, argument_bytes), compile time, and the median step time after a warm-up
(blocking on the result); plus the spike-mode forward alone (infer_s), the floor no
training method can beat. Ratios are taken within this one run: method/BPTT time and
memory at the same T and step mode, step/inference time (the physical lower bound is about
(T+2)/T for rate-BP, whose rate pass runs only the two backward convolutions of each
conv-BatchNorm layer, as ``layers.ConvBN`` takes its forward value from the spike pass;
and 3 for BPTT: one forward plus two backward passes' worth of work), and memory at T
over memory at T=1. All programs of one (step mode, T) are compiled first and
then timed round robin, so that drift of the machine touches them alike. ``--breakdown``
also times rate-BP's spike pass and rate pass on their own. ``--dtype bfloat16`` runs the
convolutions and dense layers in bfloat16 (``models.set_compute_dtype``); every row and
the table say which dtype they measured.
"""
from __future__ import annotations

import json
import os

import jax

from ratebp_jax import analysis, cli, methods, models, profiling
from ratebp_jax.layers import DEFAULT_POOL_TIES, POOL_TIES, STEP_MODES


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(models.MODELS)}")
    p.add_argument("--batch", type=int, default=16, help="images per training step")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the classifier")
    p.add_argument("--dtype", default="float32",
                   help=f"compute dtype of convolutions and dense layers, one of "
                        f"{', '.join(models.COMPUTE_DTYPES)}")
    p.add_argument("--pool-ties", default=DEFAULT_POOL_TIES,
                   help=f"max-pool tie rule (models with a max pool), one of "
                        f"{', '.join(POOL_TIES)}")
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                   help="simulation time steps to measure at")
    p.add_argument("--methods", nargs="+", default=["bptt", "bptt_remat", "rate"],
                   help=f"training methods, of {', '.join(methods.METHODS)}")
    p.add_argument("--step-modes", nargs="+", default=["multi", "single"],
                   help=f"step modes, of {', '.join(STEP_MODES)}")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per step (median); 0: memory and compile time only")
    p.add_argument("--breakdown", action="store_true",
                   help="also time rate-BP's spike pass and rate pass (forward and backward) "
                        "on their own, to show where its step time goes (needs rate in "
                        "--methods)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None,
                   help="draw memory and time against T into this image file (.png, .pdf, ...)")
    return p.parse_args(argv)


def validate(args):
    """Every flag, before anything is compiled or written; a bad one raises UsageError
    naming the flag, the value and what is allowed."""
    cli.check_choices("--model", [args.model], models.MODELS)
    for flag in ("--batch", "--image-size", "--num-classes"):
        cli.check_int(flag, getattr(args, flag[2:].replace("-", "_")))
    for T in args.T:
        cli.check_int("--T", T)
    cli.check_choices("--methods", args.methods, methods.METHODS)
    cli.check_choices("--step-modes", args.step_modes, STEP_MODES)
    cli.check_choices("--dtype", [args.dtype], models.COMPUTE_DTYPES)
    cli.check_choices("--pool-ties", [args.pool_ties], POOL_TIES)
    cli.check_int("--repeats", args.repeats, 0)
    if args.breakdown and "rate" not in args.methods:
        raise cli.UsageError(f"--breakdown: times rate-BP's passes, but --methods="
                                    f"{' '.join(args.methods)} has no rate")
    cli.check_output_path("--json", args.json)
    cli.check_output_path("--plot", args.plot)
    check_plot_format(args.plot)


def check_plot_format(path):
    """matplotlib refuses an unknown extension only when saving, after the whole run; a path
    without one becomes a PNG."""
    if path is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if ext and ext not in formats:
        raise cli.UsageError(f"--plot={path!r}: unknown image format {ext!r}; "
                             f"{cli.allowed_values(sorted(formats))}")


def run(args) -> list[dict]:
    validate(args)
    model = models.create_model(args.model, num_classes=args.num_classes,
                                image_size=args.image_size, compute_dtype=args.dtype,
                                pool_ties=args.pool_ties)
    net, params, batch_stats = methods.split_model(model)
    batch = analysis.random_batch(jax.random.key(0), args.batch, args.image_size, 3,
                                  args.num_classes)
    rows = []
    for mode in args.step_modes:
        for T in args.T:
            rows += measure(args, net, params, batch_stats, batch, mode, T)
    return add_ratios(rows)


def measure(args, net, params, batch_stats, batch, mode, T) -> list[dict]:
    """Compile inference, every method (and with ``--breakdown`` rate-BP's two passes) at
    one (mode, T), then time them all round robin, so the ratios come from one run."""
    programs = {"infer": profiling.inference_program(net, params, batch_stats, batch["image"],
                                                     T=T, step_mode=mode)}
    for method in args.methods:
        programs[method] = profiling.step_program(method, net, params, batch_stats, batch,
                                                  T=T, step_mode=mode)
    if args.breakdown and "rate" in args.methods:
        programs.update(profiling.rate_phase_programs(net, params, batch_stats, batch, T=T,
                                                      step_mode=mode))
    compiled, stats = {}, {}
    for name, (fn, fn_args) in programs.items():
        compiled[name], stats[name] = profiling.compile_with_stats(fn, *fn_args)
    times = profiling.interleaved_medians(
        {name: (compiled[name], fn_args) for name, (_, fn_args) in programs.items()},
        repeats=args.repeats) if args.repeats else {}
    rows = []
    for method in args.methods:
        row = {"method": method, "step_mode": mode, "T": T, "dtype": args.dtype,
               **stats[method],
               "step_s": times.get(method), "infer_s": times.get("infer"),
               "infer_temp_bytes": stats["infer"]["temp_bytes"]}
        if method == "rate" and "spike_pass" in programs:
            row["spike_pass_s"] = times.get("spike_pass")
            row["rate_pass_s"] = times.get("rate_pass")
        rows.append(row)
        print(f"  measured {method:<10} {mode:<6} T={T:<3} {args.dtype} step {row['step_s']}s "
              f"temp {row['temp_bytes'] / 2**20:.1f} MiB", flush=True)
    return rows


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
        if "spike_pass_s" in r:
            r["spike_pass_over_infer"] = ratio(r["spike_pass_s"], r["infer_s"])
            r["rate_pass_over_infer"] = ratio(r["rate_pass_s"], r["infer_s"])
    return rows


def print_table(rows):
    print(f"{'method':<11}{'mode':<7}{'T':>3} {'dtype':>9} {'temp MiB':>9} {'arg MiB':>8} "
          f"{'compile':>8} "
          f"{'step s':>8} {'infer s':>8} {'t/bptt':>7} {'m/bptt':>7} {'step/inf':>8} "
          f"{'m/m(T0)':>8}")
    def fmt(x, digits=3):
        return f"{x:.{digits}f}" if x is not None else "-"

    for r in rows:
        print(f"{r['method']:<11}{r['step_mode']:<7}{r['T']:>3} {r['dtype']:>9} "
              f"{r['temp_bytes'] / 2**20:>9.2f} "
              f"{r['argument_bytes'] / 2**20:>8.2f} {r['compile_s']:>8.2f} "
              f"{fmt(r['step_s'], 4):>8} {fmt(r['infer_s'], 4):>8} {fmt(r['time_vs_bptt']):>7} "
              f"{fmt(r['temp_vs_bptt']):>7} {fmt(r['step_over_infer'], 2):>8} "
              f"{fmt(r['temp_vs_first_T'], 2):>8}")
    split = [r for r in rows if r.get("spike_pass_s") is not None]
    if split:
        print("\nrate-BP step by pass, over inference (floor: 1 for the spike pass, 2/T for "
              "the rate pass: two backward convolutions per layer)")
        for r in split:
            print(f"  {r['step_mode']:<7}T={r['T']:<3} spike pass "
                  f"{r['spike_pass_over_infer']:.3f}  rate pass {r['rate_pass_over_infer']:.3f}"
                  f" (2/T = {2 / r['T']:.3f})  whole step {r['step_over_infer']:.3f}")


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
            "dtype": args.dtype, "pool_ties": args.pool_ties,
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": meta, "results": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    cli.run(main)
