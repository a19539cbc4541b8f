"""The Colab notebooks run: every code cell is executed in order (shell/magic lines skipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_code_cells_run(path):
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            lines = [line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))]
            exec(compile("".join(lines), f"{path.name}", "exec"), namespace)
