"""The training loop's overhead: its steps/s against a bare loop of the same jitted step.

    python experiments/backend/loop_overhead.py [--model vgg_tiny] [--examples 8192] [--epochs 4] \
        [--rounds 3] [--json PATH]

Trains the default config (with ``--model``) through ``train.train_and_evaluate`` on random
8x8 digits-shaped images (an npz of ``--examples``, so that an epoch is long enough for its
evaluation and checkpoints not to dominate), and takes the loop's steps/s of each epoch
after the first (the first compiles). Then it runs a bare Python loop of the same jitted,
state-donating train step over the same epochs' batches, already on the device, blocking
at each epoch's end as the loop does: the ceiling for any loop. Both run in this one
process, alternately ``--rounds`` times.

Two figures, because this machine's speed drifts by 10 to 20% within seconds (other
tenants): the median of the rounds' ratios (each round's median epoch of the loop against
the bare loop's), the one to read, with more ``--rounds`` for a steadier figure; and the
ratio of the fastest epochs of each over the whole run (the ``timeit`` idea: noise only
slows a program down), which one lucky epoch sets, so it varies more between runs than the
median does.

Results: docs/RESULTS.md, "The training loop against a bare loop".
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from ratebp_jax import cli, data, methods, models, train

# The configs live in experiments/configs/ and import each other as configs.*.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vgg_tiny", help="a zoo model, the smallest by default")
    p.add_argument("--examples", type=int, default=8192,
                   help="training examples of the random dataset (batch 64)")
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs to train; the first (compilation) is not timed")
    p.add_argument("--rounds", type=int, default=3,
                   help="times to run the loop and the bare loop, alternately")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    cli.check_choices("--model", [args.model], models.MODELS)
    cli.check_int("--epochs", args.epochs, 2)
    cli.check_int("--rounds", args.rounds, 1)
    cli.check_int("--examples", args.examples, 64)
    cli.check_output_path("--json", args.json)
    return args


def config_for(args, folder):
    """The default config on an npz of random digits-shaped images written to ``folder``."""
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "random.npz")
    np.savez(path, x_train=rng.integers(0, 256, (args.examples, 8, 8, 1), dtype=np.uint8),
             y_train=np.arange(args.examples) % 10,
             x_test=rng.integers(0, 256, (256, 8, 8, 1), dtype=np.uint8),
             y_test=np.arange(256) % 10)
    c = default.get_config()
    c.dataset, c.data_path, c.model = "npz", path, args.model
    c.num_epochs, c.progress_bar, c.plots = args.epochs, False, False
    return c


def loop_epochs(config) -> list[float]:
    """Steps/s of each of ``train_and_evaluate``'s epochs 2.. (evaluation excluded)."""
    with tempfile.TemporaryDirectory() as workdir:
        train.train_and_evaluate(config, workdir, log=lambda *_: None)
        records = train.wd.read_jsonl(f"{workdir}/{train.wd.METRICS_FILE}")
    return [(r["step"] - before["step"]) / r["seconds"]
            for before, r in zip(records, records[1:])]


def bare_epochs(config) -> list[float]:
    """Steps/s of ``for batch: leaves = step(leaves, batch)`` on pre-transferred batches, for
    epochs 2.., each ended by waiting for its last step."""
    dataset = data.load_dataset(config)
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    tx = train.create_optimizer(config, train.learning_rate_schedule(
        config, steps_per_epoch, config.num_epochs))
    net, state = train.create_state(config, dataset.image_shape, dataset.num_classes, tx)
    grad_fn = methods.make_grad_fn(config.method, net, T=config.T, step_mode=config.step_mode,
                                   rate_grad_scale=config.rate_grad_scale)
    # The step as the trainer calls it: on the state's leaves (train.on_leaves).
    treedef = jax.tree.structure(state)
    step = jax.jit(train.on_leaves(train.make_train_step(grad_fn, tx, config.nan_policy),
                                   treedef), donate_argnums=0)
    leaves = jax.tree.leaves(state)
    epochs = [[jax.device_put(b) for b in dataset.train_batches(
        epoch=epoch, batch_size=config.batch_size, seed=config.seed)]
        for epoch in range(config.num_epochs)]
    leaves, metrics = step(leaves, epochs[0][0])  # compile
    jax.block_until_ready(metrics)
    speeds = []
    for batches in epochs[1:]:
        start = time.perf_counter()
        for batch in batches:
            leaves, metrics = step(leaves, batch)
        jax.block_until_ready((leaves, metrics))
        speeds.append(len(batches) / (time.perf_counter() - start))
    return speeds


def main(argv=None):
    args = parse_args(argv)
    rounds = []
    with tempfile.TemporaryDirectory() as folder:
        config = config_for(args, folder)
        for _ in range(args.rounds):
            loop, bare = loop_epochs(config), bare_epochs(config)
            ratio = float(np.median(loop) / np.median(bare))
            rounds.append({"loop_epochs_steps_per_s": loop, "bare_epochs_steps_per_s": bare,
                           "loop_over_bare": ratio})
            print(f"{args.model}, batch {config.batch_size}, T={config.T}: training loop "
                  f"{np.median(loop):.1f} steps/s, bare jitted loop {np.median(bare):.1f} "
                  f"steps/s (median epochs), ratio {ratio:.3f}")
    median = float(np.median([r["loop_over_bare"] for r in rounds]))
    best_loop = max(s for r in rounds for s in r["loop_epochs_steps_per_s"])
    best_bare = max(s for r in rounds for s in r["bare_epochs_steps_per_s"])
    result = {"model": args.model, "examples": args.examples, "T": config.T,
              "batch_size": config.batch_size, "epochs_timed": args.epochs - 1,
              "rounds": rounds, "loop_over_bare": median,
              "best_loop_steps_per_s": best_loop, "best_bare_steps_per_s": best_bare,
              "best_loop_over_best_bare": best_loop / best_bare,
              "device": jax.devices()[0].device_kind}
    print(f"median ratio over {args.rounds} rounds: {median:.3f}; fastest epochs: loop "
          f"{best_loop:.1f}, bare {best_bare:.1f} steps/s, ratio {best_loop / best_bare:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
