"""The Colab notebooks run: every code cell is executed in order (shell/magic lines skipped).

Notebooks that set up devices before importing jax (`sharded_decoding.ipynb`: 8 simulated CPU devices) run in a
fresh process with that environment, so this process keeps its one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
OWN_PROCESS = {"sharded_decoding.ipynb": {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}}


def run_code_cells(path: Path) -> dict:
    """Execute the notebook's code cells in order in one namespace, which is returned."""
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines = [line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))]
            exec(compile("".join(lines), f"{path.name}", "exec"), namespace)
    return namespace


def check_images_notebook(namespace: dict) -> None:
    """jacobi_and_images.ipynb drew 8 samples of each digit, and compared with sjd where it is registered."""
    import jspec

    assert namespace["ar_pictures"].shape == (80, 8, 8) and namespace["ar_pictures"].max() <= 16
    assert namespace["picture"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if "sjd" in jspec.strategy_names():
        assert namespace["sjd_pictures"].shape == (80, 8, 8) and namespace["side_by_side"].shape == (160, 8, 8)


CHECKS = {"jacobi_and_images.ipynb": check_images_notebook}  # what a notebook's namespace must hold after its run


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_cells_run(path):
    if path.name not in OWN_PROCESS:
        namespace = run_code_cells(path)
        CHECKS.get(path.name, lambda namespace: None)(namespace)
        return
    env = {**os.environ, **OWN_PROCESS[path.name],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("XLA_FLAGS", None)  # a device count there would override the notebook's
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{path.name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


if __name__ == "__main__":
    run_code_cells(Path(sys.argv[1]))
