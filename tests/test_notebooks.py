"""The notebooks in notebooks/ run top to bottom and render their figures.

Each notebook is executed in memory with nbclient on a fresh IPython kernel of the running
interpreter, with notebooks/ as its working directory; any cell error (including a failed
``assert`` in a notebook) fails the test. The executed copy goes to pytest's tmp_path for
inspection only: the notebooks in the repository are never rewritten. Each is stored either
with its outputs stripped or, to render on GitHub, with the outputs of one clean top-to-bottom
run; that is checked too.

Needs nbclient, nbformat and ipykernel (skipped without them).
"""
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def kernel_manager(tmp_path):
    """A KernelManager for a ``python3`` kernel that is this interpreter, whatever kernels
    are registered on the machine (a user-level ``python3`` spec may point elsewhere)."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(str(kernels / "python3"))  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    assert ksm.get_kernel_spec("python3").argv[0] == sys.executable
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def image_outputs(nb) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])
               if out.output_type in ("display_data", "execute_result"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_bptt_vs_rate_gradients.ipynb",
        "02_training_and_firing_rates.ipynb",
        "03_memory_and_time.ipynb",
        "04_your_own_model.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_stored_stripped_or_as_one_clean_run(path):
    """Stripped: no code cell has outputs or an execution count. With outputs: every code
    cell ran once, in order, none raised, and the file stays under 1 MB."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    if all(count is None for count in counts):
        assert all(cell.outputs == [] for cell in code), (
            f"{path.name} has outputs without execution counts; rerun it all or strip it")
        return
    assert counts == list(range(1, len(code) + 1)), (
        f"{path.name} was not run once top to bottom (execution counts {counts}); rerun it "
        f"all or strip it")
    errors = [out.ename for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name} is stored with errors {errors}"
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    original = path.read_bytes()
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    # The repository importable in the kernel without an install; figures inline, not Agg.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("MPLBACKEND", None)
    client = nbclient.NotebookClient(
        nb, km=kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    try:
        client.execute(env=env)  # raises CellExecutionError on the first failing cell
    finally:
        nbformat.write(nb, tmp_path / path.name)  # for inspection; never into the repo
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s "
          f"(copy with outputs: {tmp_path / path.name})")
    assert image_outputs(nb) >= 1, f"{path.name} rendered no image/png output"
    assert path.read_bytes() == original, f"{path.name} was modified by the test"
