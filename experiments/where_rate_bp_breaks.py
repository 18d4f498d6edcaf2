"""The table of docs/RESULTS.md, "Where rate-BP stops being BPTT": BPTT and rate-BP on inputs
whose label moves from the firing rate into spike timing (``ratebp_jax.limits``).

    python experiments/where_rate_bp_breaks.py                      # notebook 06's three inputs
    python experiments/where_rate_bp_breaks.py --nmnist ../shared/data/nmnist --json out.json

The static digits, the rate-coded digits and the temporal-order task are notebook 06's,
with its settings (``vgg_tiny``, seeds 0 to 4, 120 Adam steps of 64 at learning rate 0.01,
agreement every 40 steps on 128 training samples), at each ``--T``. ``--nmnist`` adds
N-MNIST event frames: a folder with one ``*train*.npz`` and one ``*test*.npz`` of events
(``data.events.read_events_npz``), binned into T frames and resized to ``--nmnist-size``
pixels; the frames are the event counts, as the trainer's ``nmnist`` dataset gives them.
N-MNIST gets a model and a length of its own (default ``vgg_small``, the ``nmnist_vgg``
config's, for 300 steps, on 17x17 frames): ``vgg_tiny`` reaches under 0.7 on it.
Prints the markdown table of ``limits.table``; ``--json`` also writes every figure per seed.
"""
from __future__ import annotations

import glob
import json
import os
import time

from ratebp_jax import cli, limits
from ratebp_jax.data import events

TASKS = {"static": limits.static_digits, "rate_code": limits.rate_coded_digits,
         "order": limits.temporal_order}


def nmnist(folder: str, T: int, size: int) -> limits.Task:
    """N-MNIST frames ``[N, T, size, size, 2]`` from the event files in ``folder``."""
    def read(split):
        files = sorted(glob.glob(os.path.join(folder, f"*{split}*.npz")))
        if len(files) != 1:
            raise FileNotFoundError(f"--nmnist={folder!r}: expected one *{split}*.npz, found "
                                    f"{len(files)}")
        return events.read_events_npz(files[0], T=T, size=size)

    (x_train, y_train), (x_test, y_test) = read("train"), read("test")
    return limits.Task("N-MNIST", x_train, y_train, x_test, y_test,
                       int(max(y_train.max(), y_test.max())) + 1)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[4, 16], help="time steps (default 4 16)")
    p.add_argument("--tasks", nargs="*", default=list(TASKS),
                   help=f"synthetic inputs, of {', '.join(TASKS)} (default: all; none: "
                        "only N-MNIST)")
    p.add_argument("--nmnist", default=None,
                   help="a folder with N-MNIST event files (*train*.npz, *test*.npz)")
    p.add_argument("--nmnist-size", type=int, default=17,
                   help="frame size of the N-MNIST input (default 17; the sensor's is 34)")
    p.add_argument("--nmnist-model", default="vgg_small", help="model for N-MNIST")
    p.add_argument("--nmnist-steps", type=int, default=300, help="train steps on N-MNIST")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)
    cli.check_choices("--tasks", args.tasks, TASKS)
    for T in args.T:
        cli.check_int("--T", T, 2)
    if args.json:
        cli.check_output_path("--json", args.json)
    return args


def main(argv=None):
    args = parse_args(argv)
    results = []
    for T in args.T:
        runs = [(TASKS[name](T), "vgg_tiny", args.steps) for name in args.tasks]
        if args.nmnist:
            runs.append((nmnist(args.nmnist, T, args.nmnist_size), args.nmnist_model,
                         args.nmnist_steps))
        for task, model, steps in runs:
            start = time.perf_counter()
            result = limits.measure(task, model=model, seeds=tuple(args.seeds), steps=steps,
                                    log_every=40)
            print(f"T={T:2d} {task.name:15s} measured in {time.perf_counter() - start:.1f} s",
                  flush=True)
            results.append(result)
    summaries = [limits.summarize(r) for r in results]
    print(limits.table(summaries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summaries": summaries, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    cli.run(main)
