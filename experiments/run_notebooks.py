"""Re-execute the research notebooks in place, so that they are stored with their outputs.

    python experiments/run_notebooks.py                # every notebooks/*.ipynb
    python experiments/run_notebooks.py notebooks/05_gradient_agreement_over_training.ipynb

Each notebook runs top to bottom on a fresh IPython kernel of this interpreter, in the
notebook's own folder, with the repository on ``PYTHONPATH`` (tests/test_notebooks.py runs
them the same way, through :func:`execute`). A notebook is written back only if every cell
ran without error; one line per notebook gives its time and stored size. Exits 1 if any
notebook failed (its error is printed, its file left as it was).
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time

from ratebp_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
CELL_TIMEOUT_S = 600


def kernel_manager(kernel_dir: str):
    """A KernelManager for a ``python3`` kernel that is this interpreter, whatever kernels
    are registered on the machine (a user-level ``python3`` spec may point elsewhere); its
    kernel spec is written into ``kernel_dir``."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = os.path.join(kernel_dir, "kernels")
    write_kernel_spec(os.path.join(kernels, "python3"))  # argv: [sys.executable, -m, ...]
    ksm = KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)
    assert ksm.get_kernel_spec("python3").argv[0] == sys.executable
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def execute(nb, folder: str, kernel_dir: str, timeout: int = CELL_TIMEOUT_S) -> None:
    """Run notebook ``nb`` (an ``nbformat`` node, changed in place: outputs and execution
    counts 1..n) on a fresh kernel (:func:`kernel_manager`) with ``folder`` as its working
    directory. Raises nbclient's ``CellExecutionError`` at the first failing cell."""
    import nbclient

    env = dict(os.environ)
    # The repository importable in the kernel without an install; figures inline, not Agg.
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("MPLBACKEND", None)
    for cell in nb.cells:  # no timestamps: a rerun changes only what the run printed
        cell.metadata.pop("execution", None)
    client = nbclient.NotebookClient(
        nb, km=kernel_manager(kernel_dir), timeout=timeout, allow_errors=False,
        record_timing=False, resources={"metadata": {"path": folder}})
    client.execute(env=env)


def read_notebook(path: str):
    """The notebook at ``path`` (nbformat 4), or a one-line error naming it."""
    import nbformat

    if not path.endswith(".ipynb"):
        raise cli.UsageError(f"NOTEBOOK={path!r}: not a notebook (*.ipynb)")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise cli.UsageError(f"NOTEBOOK={path!r}: {what}")
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001 - nbformat raises many kinds for a bad file
        gist = str(e).splitlines()[0] if str(e) else ""
        raise cli.UsageError(f"NOTEBOOK={path!r}: not a readable notebook "
                                    f"({type(e).__name__}: {gist})") from None
    return nb


def main(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", metavar="NOTEBOOK",
                   help="notebooks to run (default: every notebooks/*.ipynb)")
    p.add_argument("--timeout", type=int, default=CELL_TIMEOUT_S,
                   help="seconds a cell may run before the notebook fails")
    args = p.parse_args(argv)
    cli.check_int("--timeout", args.timeout)
    paths = args.paths or sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    notebooks = [(path, read_notebook(path)) for path in paths]  # all checked before any runs

    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    failed = []
    for path, nb in notebooks:
        start = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as kernel_dir:
                execute(nb, os.path.dirname(os.path.abspath(path)), kernel_dir, args.timeout)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            failed.append(path)
            print(f"{path}: FAILED after {time.perf_counter() - start:.1f} s, left as it was\n"
                  f"{e}", file=sys.stderr)
            continue
        nbformat.write(nb, path)
        print(f"{path}: ran in {time.perf_counter() - start:.1f} s, stored "
              f"{os.path.getsize(path) / 1e3:.0f} kB", flush=True)
    if failed:
        print(f"{len(failed)} of {len(notebooks)} notebooks failed: {' '.join(failed)}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
