"""Test accuracy of rate-BP against BPTT on the embedded digits, over seeds, same budget.

    python experiments/accuracy_benchmark.py --seeds 0 1 2 --json acc.json
    python experiments/accuracy_benchmark.py --methods rate --step-modes multi \
        --dtypes float32 bfloat16
    python experiments/accuracy_benchmark.py --step-modes multi --leaks fixed learnable

Trains the default config (a small spiking CNN, T=4) once per (method, step mode, compute
dtype, leak, seed) with identical hyperparameters and epochs, and reports the mean and
standard deviation of the final test accuracy and the mean wall time per method, step mode,
dtype and leak. With a learnable leak (``learnable_leak``) each run also reports every LIF
layer's learned decay ``lam``.
"""
from __future__ import annotations

import json
import tempfile

import jax
import numpy as np

from configs import default
from ratebp_jax import analysis, cli, methods, models, train
from ratebp_jax.layers import STEP_MODES


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["bptt", "rate"],
                   help=f"training methods, of {', '.join(methods.METHODS)}")
    p.add_argument("--step-modes", nargs="+", default=["multi", "single"],
                   help=f"step modes, of {', '.join(STEP_MODES)}")
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   help=f"compute dtypes of convolutions and dense layers, of "
                        f"{', '.join(models.COMPUTE_DTYPES)}")
    p.add_argument("--leaks", nargs="+", default=["fixed"],
                   help=f"the neurons' leak, of {', '.join(LEAKS)} (PLIF's lam = sigmoid(w))")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one run per seed, each in [0, 2^32)")
    p.add_argument("--num-epochs", type=int, default=None,
                   help=">= 1 (default: the config's)")
    p.add_argument("--num-train-steps", type=int, default=0, help="> 0 overrides epochs")
    p.add_argument("--T", type=int, default=None, help=">= 1 (default: the config's)")
    p.add_argument("--json", default=None, help="write the runs and the summary here")
    return p.parse_args(argv)


def validate(args):
    """Every flag, before the first run trains or a file is written; a bad one raises
    UsageError naming the flag, the value and what is allowed."""
    cli.check_choices("--methods", args.methods, methods.METHODS)
    cli.check_choices("--step-modes", args.step_modes, STEP_MODES)
    cli.check_choices("--dtypes", args.dtypes, models.COMPUTE_DTYPES)
    cli.check_choices("--leaks", args.leaks, LEAKS)
    for seed in args.seeds:
        cli.check_int("--seeds", seed, 0, 2**32 - 1)
    if args.num_epochs is not None:
        cli.check_int("--num-epochs", args.num_epochs)
    cli.check_int("--num-train-steps", args.num_train_steps, 0)
    if args.T is not None:
        cli.check_int("--T", args.T)
    cli.check_output_path("--json", args.json)


LEAKS = ("fixed", "learnable")


def make_config(args, method, mode, dtype, leak, seed):
    """The default config with this run's method, step mode, compute dtype, leak and seed
    and the flags' overrides."""
    c = default.get_config()
    c.method, c.step_mode, c.compute_dtype, c.seed = method, mode, dtype, seed
    c.learnable_leak = leak == "learnable"
    c.progress_bar, c.plots = False, False
    if args.num_epochs is not None:
        c.num_epochs = args.num_epochs
    if args.T is not None:
        c.T = args.T
    c.num_train_steps = args.num_train_steps
    return c


def run(args) -> dict:
    validate(args)
    plan = [(method, mode, dtype, leak, seed) for method in args.methods
            for mode in args.step_modes for dtype in args.dtypes for leak in args.leaks
            for seed in args.seeds]
    configs = [make_config(args, *key) for key in plan]
    for c in configs:  # a config the flags make invalid fails now, not after some runs
        train.validate_config(c)
    runs = []
    for (method, mode, dtype, leak, seed), c in zip(plan, configs):
        with tempfile.TemporaryDirectory() as workdir:
            s = train.train_and_evaluate(c, workdir, log=lambda *_: None)
            leaks = learned_leaks(c, workdir) if c.learnable_leak else {}
        runs.append({"method": method, "step_mode": mode, "dtype": dtype, "leak": leak,
                     "seed": seed, "test_accuracy": s["final_test_accuracy"],
                     "wall_time_s": s["wall_time_s"], "learned_lam": leaks})
        learned = "".join(f" {layer} {lam:.3f}" for layer, lam in leaks.items())
        print(f"  {method:<6} {mode:<6} {dtype:<8} {leak:<9} seed {seed}: accuracy "
              f"{s['final_test_accuracy']:.4f} in {s['wall_time_s']:.1f}s"
              + (f"; lam{learned}" if leaks else ""), flush=True)
    summary = []
    for key in dict.fromkeys((m, mode, dtype, leak) for m, mode, dtype, leak, _ in plan):
        sel = [r for r in runs if (r["method"], r["step_mode"], r["dtype"], r["leak"]) == key]
        acc = np.array([r["test_accuracy"] for r in sel])
        summary.append({
            **dict(zip(("method", "step_mode", "dtype", "leak"), key)), "seeds": len(sel),
            "mean_accuracy": float(acc.mean()), "std_accuracy": float(acc.std()),
            "mean_wall_time_s": float(np.mean([r["wall_time_s"] for r in sel]))})
    return {"summary": summary, "runs": runs}


def learned_leaks(config, workdir) -> dict[str, float]:
    """Every LIF layer's decay ``lam = sigmoid(w)`` in the run's final checkpoint."""
    _, _, state = train.load_trained(config, workdir, log=lambda *_: None)
    return {name.rpartition(".")[0]: float(jax.nn.sigmoid(w))
            for name, w in analysis.named_leaves(state["params"])
            if name.endswith("leak_logit")}


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(f"{'method':<8}{'mode':<8}{'dtype':<10}{'leak':<10}{'seeds':>6} {'accuracy':>16} "
          f"{'wall s':>8}")
    for r in result["summary"]:
        print(f"{r['method']:<8}{r['step_mode']:<8}{r['dtype']:<10}{r['leak']:<10}{r['seeds']:>6} "
              f"{100 * r['mean_accuracy']:>9.2f} +- {100 * r['std_accuracy']:.2f} "
              f"{r['mean_wall_time_s']:>8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
