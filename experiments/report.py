"""Compare training runs: one row per workdir, and their test accuracy over epochs and time.

    python experiments/report.py runs/default-rate-multi-T4 runs/default-bptt-multi-T4 \
        --plot compare.png
    python experiments/report.py 'runs/*' --json runs.json      # globs are expanded here too

Each row: name, model, dataset, method, step mode, T, compute dtype, steps, final and best
test accuracy, wall time, median images/s, compile time, and the run's state (complete,
interrupted, stopped, running, killed). Runs still training are read as they are. A path
that holds no run gets one line on stderr, and the others are still reported.
"""
from __future__ import annotations

import glob
import json
import sys

from ratebp_jax import cli, report


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="workdirs (glob patterns welcome)")
    p.add_argument("--plot", default=None, help="write the accuracy figure here (PNG)")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    cli.check_output_path("--plot", args.plot)
    cli.check_output_path("--json", args.json)
    return args


def main(argv=None):
    args = parse_args(argv)
    paths = [p for pattern in args.runs for p in (sorted(glob.glob(pattern)) or [pattern])]
    rows = []
    for path in paths:
        try:
            rows.append(report.read_run(path))
        except report.NotARun as e:
            print(f"skipped {e}", file=sys.stderr)
    if not rows:
        raise cli.UsageError(f"RUN={' '.join(args.runs)}: no run among them")
    print(report.table(rows))
    if args.plot:
        report.plot_runs(rows, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in row.items() if k != "records"} for row in rows], f,
                      indent=1)


if __name__ == "__main__":
    cli.run(main)
