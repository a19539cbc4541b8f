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


def run_code_cells(path: Path) -> None:
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines = [line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))]
            exec(compile("".join(lines), f"{path.name}", "exec"), namespace)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_cells_run(path):
    if path.name not in OWN_PROCESS:
        run_code_cells(path)
        return
    env = {**os.environ, **OWN_PROCESS[path.name],
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("XLA_FLAGS", None)  # a device count there would override the notebook's
    done = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{path.name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"


if __name__ == "__main__":
    run_code_cells(Path(sys.argv[1]))
