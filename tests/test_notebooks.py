"""The Colab notebooks run in a real Jupyter kernel (nbclient + ipykernel), each with at least one picture.

Every notebook is executed top to bottom in its own kernel, as a user's Jupyter or Colab runtime runs it: a copy of
the notebook with its shell (`!`) and magic (`%`) lines replaced by `pass` (they install packages in Colab), then
cells appended by this test that check what the notebook computed, in the same kernel. The kernel is the native
ipykernel spec of this interpreter (`sys.executable`), whatever other `python3` specs are installed; it starts in a
scratch directory with the checkout on PYTHONPATH, so `import jspec` finds this checkout. Notebooks that set up
devices before importing jax (`sharded_decoding.ipynb`: 8 simulated CPU devices) get that environment for their
kernel. A cell that raises fails the test; so does a notebook whose outputs hold no image/png.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
KERNEL_ENV = {"sharded_decoding.ipynb": {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}}
CELL_TIMEOUT_S = 300
SHELL_OR_MAGIC = re.compile(r"^(\s*)[!%].*$", re.MULTILINE)

# Cells run after a notebook's own, in its kernel: what the notebook must have computed.
CHECKS = {
    "jacobi_and_images.ipynb": """
assert ar_pictures.shape == (80, 8, 8) and ar_pictures.max() <= 16
assert picture.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
if "sjd" in jspec.strategy_names():
    assert sjd_pictures.shape == (80, 8, 8) and side_by_side.shape == (160, 8, 8)
""",
    "quickstart.ipynb": "assert spec.sequences() == ar.sequences()",
    "sharded_decoding.ipynb": "assert len(jax.devices()) == 8 and all(agree)",
    "speculative.ipynb": "assert all(same_as_greedy.values()), same_as_greedy",
    "diffusion.ipynb": "assert freedave_out.sequences() == static_out.sequences()",
}


def without_shell_lines(source: str) -> str:
    """The cell with every shell (`!`) and magic (`%`) line replaced by `pass` at the same indentation."""
    return SHELL_OR_MAGIC.sub(lambda line: f"{line.group(1)}pass  # shell/magic line skipped by the test", source)


def native_kernel_manager():
    """A kernel manager for ipykernel's native `python3` spec: this interpreter, not a `python` found on PATH."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager(kernel_dirs=[])  # no installed specs: only the native one (ipykernel, sys.executable)
    manager = KernelManager(kernel_name="python3", kernel_spec_manager=specs)
    assert manager.kernel_spec.argv[0] == sys.executable, manager.kernel_spec.argv
    return manager


def kernel_environment(name: str) -> dict[str, str]:
    env = {**os.environ, **KERNEL_ENV.get(name, {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if name in KERNEL_ENV:
        env.pop("XLA_FLAGS", None)  # a device count there would override the notebook's
    env.pop("MPLBACKEND", None)  # the kernel's inline backend turns figures into image/png outputs
    return env


def execute_notebook(path: Path, workdir: Path):
    """The executed copy of the notebook (shell lines skipped, check cell appended); raises on a failing cell."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.source = without_shell_lines(cell.source)
    if path.name in CHECKS:
        notebook.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name]))
    manager = native_kernel_manager()
    client = nbclient.NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(env=kernel_environment(path.name))
    finally:  # nbclient shuts down only the kernels of managers it made itself
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)
    return notebook


def image_outputs(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


def test_shell_and_magic_lines_are_skipped():
    source = "import os\n!pip install x\nif True:\n    %time y = 1\n"
    assert without_shell_lines(source) == ("import os\npass  # shell/magic line skipped by the test\nif True:\n"
                                           "    pass  # shell/magic line skipped by the test\n")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_a_kernel_with_a_picture(path, tmp_path):
    notebook = execute_notebook(path, tmp_path)
    assert image_outputs(notebook) >= 1, f"{path.name}: no image/png among the executed outputs"
