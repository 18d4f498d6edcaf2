"""Max-pool tie rules compared: test accuracy and rate-BP's agreement with BPTT, per rule.

    python experiments/backend/pool_ties.py --root /tmp/pool_ties --json pool_ties.json

For every rule of ``layers.POOL_TIES`` and every seed it trains
``experiments/configs/default.py`` with ``--model`` (sew_resnet_tiny, whose stem max-pools
spikes) at ``--T`` for ``--epochs`` in ``<root>/<rule>-seed<seed>`` (a finished run is
reused, an interrupted one resumed), one run after the other. Then, per rule, it compares rate-BP's gradient with BPTT's (both under
that rule) on ``--batches`` real training batches, at initialisation (seed 0) and on each
trained run's last checkpoint: cosine and norm ratio over all parameters and for the stem
convolution's kernel, averaged over the batches. As a scale for those figures it also
compares the two rules' BPTT gradients with each other at initialisation.

Results: docs/RESULTS.md, "Max-pool tie rule (`pool_ties`), SEW-ResNet tiny on digits".
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from ratebp_jax import analysis, cli, data, layers, methods, models, train

# The configs live in experiments/configs/ and import each other as configs.*.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402

# The zoo's models with a max pool: the ImageNet stems of SEW- and PreAct-ResNet.
POOLED_MODELS = [name for name in models.MODELS if name.startswith(("sew_", "preact_"))]


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/pool_ties", help="folder of the runs' workdirs")
    p.add_argument("--model", default="sew_resnet_tiny",
                   help=f"a model with a max pool, of {', '.join(POOLED_MODELS)}")
    p.add_argument("--T", type=int, default=4, help="time steps of training and comparison")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds")
    p.add_argument("--rules", nargs="+", default=list(layers.POOL_TIES),
                   help=f"tie rules, of {', '.join(layers.POOL_TIES)}")
    p.add_argument("--batches", type=int, default=4,
                   help="training batches (epoch 0, seed 0) the gradients are compared on")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    cli.check_choices("--model", [args.model], POOLED_MODELS)
    cli.check_choices("--rules", args.rules, layers.POOL_TIES)
    if os.path.isfile(args.root):
        raise cli.UsageError(f"--root={args.root!r}: is a file; give a folder")
    for flag in ("T", "epochs", "batches"):
        cli.check_int(f"--{flag}", getattr(args, flag))
    for seed in args.seeds:
        cli.check_int("--seeds", seed, 0)
    cli.check_output_path("--json", args.json)
    return args


def run_config(args, rule: str, seed: int):
    c = default.get_config()
    c.name = f"pool_ties_{rule}"
    c.model, c.pool_ties, c.T, c.seed, c.num_epochs = args.model, rule, args.T, seed, args.epochs
    c.progress_bar, c.plots = False, False
    return c


def workdir_of(args, rule: str, seed: int) -> str:
    return os.path.join(args.root, f"{rule}-seed{seed}")


def train_all(args) -> dict:
    """``{(rule, seed): summary}``, training the runs one after the other."""
    summaries = {}
    for rule in args.rules:
        for seed in args.seeds:
            t0 = time.time()
            summary = train.train_and_evaluate(run_config(args, rule, seed),
                                               workdir_of(args, rule, seed),
                                               log=lambda *_: None)
            summaries[rule, seed] = summary
            print(f"trained {rule} seed {seed}: test accuracy "
                  f"{summary['final_test_accuracy']:.4f} ({time.time() - t0:.0f} s)",
                  flush=True)
    return summaries


def agreement(grads, grads_ref) -> dict:
    """Cosine and norm ratio over all parameters and for the stem convolution's kernel."""
    stats = analysis.compare_gradients(grads, grads_ref)
    stem = next(p for p in stats["per_param"]
                if p["name"].startswith("stem.") and p["name"].endswith(".kernel"))
    return {"cosine": stats["cosine"], "norm_ratio": stats["norm_ratio"],
            "stem_cosine": stem["cosine"], "stem_norm_ratio": stem["norm_ratio"]}


def mean_over(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def compare_rule(args, rule: str, batches) -> dict:
    """Rate-BP against BPTT under ``rule``: at initialisation and on every trained run,
    each averaged over ``batches``; also BPTT's gradients at initialisation, per batch."""
    config = run_config(args, rule, args.seeds[0])
    dataset = data.load_dataset(config)
    model = train.create_model(config, dataset.image_shape, dataset.num_classes)
    net, params, batch_stats = methods.split_model(model)
    grad_fns = {m: jax.jit(methods.make_grad_fn(m, net, T=args.T, step_mode=config.step_mode,
                                                rate_grad_scale=config.rate_grad_scale))
                for m in ("rate", "bptt")}

    def compare(params, batch_stats):
        grads = {m: [fn(params, batch_stats, b)[1] for b in batches]
                 for m, fn in grad_fns.items()}
        return mean_over([agreement(r, b) for r, b in zip(grads["rate"], grads["bptt"])]), \
            grads["bptt"]

    at_init, bptt_init = compare(params, batch_stats)
    trained = {}
    for seed in args.seeds:
        _, _, state = train.load_trained(run_config(args, rule, seed), workdir_of(args, rule, seed),
                                         log=lambda *_: None)
        trained[seed] = compare(state["params"], state["batch_stats"])[0]
    return {"init": at_init, "trained": trained,
            "trained_mean": mean_over(list(trained.values()))}, bptt_init


def measure(args) -> dict:
    summaries = train_all(args)
    dataset = data.load_dataset(run_config(args, args.rules[0], 0))
    batches = [b for _, b in zip(range(args.batches), dataset.train_batches(
        epoch=0, batch_size=default.get_config().batch_size, seed=0))]
    results = {"model": args.model, "T": args.T, "epochs": args.epochs, "seeds": args.seeds,
               "batches": args.batches, "rules": {}}
    bptt_init = {}
    for rule in args.rules:
        accs = [summaries[rule, s]["final_test_accuracy"] for s in args.seeds]
        agree, bptt_init[rule] = compare_rule(args, rule, batches)
        results["rules"][rule] = {
            "test_accuracy": accs, "test_accuracy_mean": float(np.mean(accs)),
            "test_accuracy_std": float(np.std(accs)),
            "wall_time_s": [summaries[rule, s]["wall_time_s"] for s in args.seeds],
            "agreement": agree}
    if len(bptt_init) == 2:
        a, b = bptt_init.values()
        results["bptt_rule_vs_rule_init"] = mean_over([agreement(x, y) for x, y in zip(a, b)])
    return results


def print_table(results):
    print(f"{results['model']}, T={results['T']}, {results['epochs']} epochs, seeds "
          f"{results['seeds']}; rate-BP vs BPTT on {results['batches']} training batches")
    print(f"{'rule':<6} {'test acc':>15}  {'when':<8} {'cosine':>7} {'norm':>6} "
          f"{'stem cos':>8} {'stem norm':>9}")
    for rule, r in results["rules"].items():
        acc = f"{100 * r['test_accuracy_mean']:.2f} +- {100 * r['test_accuracy_std']:.2f}"
        for when, a in (("init", r["agreement"]["init"]),
                        ("trained", r["agreement"]["trained_mean"])):
            print(f"{rule:<6} {acc:>15}  {when:<8} {a['cosine']:>7.4f} {a['norm_ratio']:>6.3f} "
                  f"{a['stem_cosine']:>8.4f} {a['stem_norm_ratio']:>9.3f}")
    if "bptt_rule_vs_rule_init" in results:
        a = results["bptt_rule_vs_rule_init"]
        print(f"BPTT split vs first at init: cosine {a['cosine']:.4f}, norm ratio "
              f"{a['norm_ratio']:.3f}, stem cosine {a['stem_cosine']:.4f}")


def main(argv=None):
    args = parse_args(argv)
    results = measure(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
