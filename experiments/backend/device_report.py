"""Images/s and compiled memory from benchmark.py's JSON files, one row per program.

    python experiments/backend/device_report.py bench_float32.json bench_bfloat16.json --batch 128 \
        --json device_benchmark.json

Used by ``experiments/device_benchmark.sh``. Images/s is the batch over the median step
time of each training method and of spike inference (the forward alone, the floor); memory
is XLA's compiled temporary memory of the same program.

Results: docs/RESULTS.md, "GPU".
"""
from __future__ import annotations

import json

import jax

from ratebp_jax import cli

PROGRAMS = ("infer", "rate", "bptt", "bptt_remat")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", metavar="BENCH_JSON", help="benchmark.py --json files")
    p.add_argument("--batch", type=int, required=True, help="the batch size they were run at")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    cli.check_int("--batch", args.batch)
    cli.check_output_path("--json", args.json)
    return args


def device_rows(bench_rows, batch: int) -> list[dict]:
    """One row per (step mode, T, dtype, program), inference taken from any method's row."""
    rows, seen = [], set()
    for r in bench_rows:
        key = (r["step_mode"], r["T"], r["dtype"])
        programs = [(r["method"], r["step_s"], r["temp_bytes"])]
        if key not in seen:
            seen.add(key)
            programs.insert(0, ("infer", r["infer_s"], r["infer_temp_bytes"]))
        for program, seconds, temp in programs:
            rows.append({"step_mode": key[0], "T": key[1], "dtype": key[2],
                         "program": program, "temp_bytes": temp,
                         "images_per_s": batch / seconds if seconds else None})
    order = {p: i for i, p in enumerate(PROGRAMS)}
    return sorted(rows, key=lambda r: (r["step_mode"], r["T"], r["dtype"],
                                       order.get(r["program"], len(order))))


def main(argv=None):
    args = parse_args(argv)
    bench_rows = []
    for path in args.files:
        if not path.endswith(".json"):
            raise cli.UsageError(f"BENCH_JSON={path!r}: must be a benchmark.py --json file")
        with open(path) as f:
            bench_rows += json.load(f)["results"]
    rows = device_rows(bench_rows, args.batch)
    device = jax.devices()[0].device_kind
    print(f"\n{device}, batch {args.batch}")
    print(f"{'mode':<7}{'T':>3} {'dtype':>9} {'program':<11}{'images/s':>10} {'temp MiB':>10}")
    for r in rows:
        ips = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        print(f"{r['step_mode']:<7}{r['T']:>3} {r['dtype']:>9} {r['program']:<11}{ips:>10} "
              f"{r['temp_bytes'] / 2**20:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "batch": args.batch, "results": rows}, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
