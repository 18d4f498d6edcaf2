"""Check our training step against the reference implementation's recorded numbers.

    python experiments/check_reference.py tests/data/reference_vectors --json parity.json

For each vector file (or every ``*.json`` in a folder) it rebuilds the weights and input
by the recipe, imports them, runs one step of the same method, step mode, T and reset with
``rate_grad_scale="reference"``, compares loss, logits and every gradient's and BN buffer's
summaries, and prints one line per file. Exits 1 if any file fails.
"""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np

from ratebp_jax import cli, parity


def vector_files(paths):
    """The vector files named by FILE_OR_DIR, each checked to be one (see check_vector)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(glob.glob(os.path.join(path, "*_seed*.json")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise cli.UsageError(f"FILE_OR_DIR={path!r}: no such file or directory")
    if not files:
        raise cli.UsageError(f"FILE_OR_DIR={' '.join(paths)!r}: no vector files "
                                    f"(*_seed*.json)")
    for path in files:
        check_vector(path)
    return files


def check_vector(path):
    """A JSON object with an ``arch`` whose ``keys_<arch>.txt`` lies beside it, so that a bad
    file stops the run before any step is computed, not in the middle of the table."""
    try:
        with open(path) as f:
            arch = json.load(f).get("arch")
    except (OSError, ValueError, AttributeError) as e:
        raise cli.UsageError(f"FILE_OR_DIR={path!r}: not a reference vector file "
                                    f"({type(e).__name__}: {e})") from None
    if not isinstance(arch, str):
        raise cli.UsageError(f"FILE_OR_DIR={path!r}: not a reference vector file (no "
                                    f"\"arch\" name)")
    keys = os.path.join(os.path.dirname(path), f"keys_{arch}.txt")
    if not os.path.isfile(keys):
        raise cli.UsageError(f"FILE_OR_DIR={path!r}: arch={arch!r} needs "
                                    f"{os.path.basename(keys)} beside it")


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR",
                   help="reference vector files (*_seed*.json), or folders of them")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--float64", action="store_true",
                   help="compute in float64 (rules out float32 threshold ties)")
    args = p.parse_args(argv)
    cli.check_output_path("--json", args.json)
    files = vector_files(args.paths)
    if args.float64:
        import jax
        jax.config.update("jax_enable_x64", True)
    results = []
    print(f"{'file':<48} {'loss_rel':>9} {'logits':>9} {'worst_dev':>9}  worst parameter")
    for path in files:
        r = parity.check_file(path, dtype=np.float64 if args.float64 else np.float32)
        results.append(r)
        print(f"{r['file']:<48} {r['loss_rel_err']:>9.1e} {r['logits_max_abs_err']:>9.1e} "
              f"{r['worst_dev']:>9.1e}  {r['worst_param']:<28} "
              f"{'pass' if r['pass'] else 'FAIL'}")
    n_fail = sum(not r["pass"] for r in results)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results}, f, indent=1)
    if n_fail:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
