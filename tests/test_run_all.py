"""benchmarks/run_all.py draws its plots and README from benchmark JSON (here: small rows of each benchmark's form)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_all", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


RESULTS = {
    "speculative": {"environment": {"backend": "cpu"}, "per_call_ms": {"target b=1 w=1": 2.0}, "rows": [
        {"T": 0.0, "batch": 1, "method": "jspec autoregressive", "tokens/s": 400.0, "speedup (measured)": 1.0,
         "predicted": 1.0, "memory-bound": 1.0, "target calls/token": 1.0, "acceptance by depth": None},
        {"T": 0.0, "batch": 1, "method": "jspec chain k=2", "tokens/s": 500.0, "speedup (measured)": 1.25,
         "predicted": 1.4, "memory-bound": 1.6, "target calls/token": 0.6, "acceptance by depth": [0.7, 0.5]},
        {"T": 0.0, "batch": 1, "method": "transformers generate", "tokens/s": 300.0, "speedup (measured)": 0.75,
         "same tokens as jspec": "4/4"},
    ]},
    "jacobi": {"rows": [{"T": 0.0, "batch": 1, "method": "jacobi W=8", "speedup (measured)": 0.9, "predicted": 1.0,
                         "memory-bound": 1.1, "calls/token": 0.9}]},
    "diffusion": {"rows": [{"method": "freedave k=2", "model": "dllm", "tokens/forward": 1.33, "forwards/block": 24.0, "vs AR greedy": 0.8,
                            "vs dllm_static": 1.2}]},
    "autoregressive": {"args": {"model": "random-25m"}, "rows": [
        {"batch": b, "method": m, "tokens/s": 100.0 * b} for b in (1, 2, 4) for m in ("naive python loop", "jspec.decode greedy")]},
}


def test_plots_and_readme_from_benchmark_json(run_all, tmp_path):
    plots = run_all.make_plots(RESULTS)
    assert {p.name for p in plots} == {"speedup_speculative.png", "acceptance_by_depth.png", "speedup_jacobi.png",
                                       "speedup_diffusion.png", "forwards_per_token.png", "tokens_per_second_vs_batch.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    runs = [{"name": "speculative", "command": "python benchmarks/bench_speculative.py --quick", "status": "ok", "seconds": 1.0}]
    readme = run_all.write_readme(RESULTS, plots, runs, "python benchmarks/run_all.py --quick", 60.0).read_text()
    assert all(f"]({p.name})" in readme for p in plots)  # every plot shown
    assert "| jspec chain k=2 | 500 | 0.6 |" in readme and "| 1.4 |" in readme  # rows as tables, predicted included


def test_plots_from_the_committed_results(run_all):
    """The committed benchmarks/results/*.json (the benchmarks' real output) plot and tabulate: a benchmark whose
    columns change without run_all following fails here, not in the next full run."""
    results = {}
    for benchmark in run_all.BENCHMARKS:
        path = ROOT / "benchmarks" / "results" / f"{benchmark.name}.json"
        if path.is_file():
            results[benchmark.name] = json.loads(path.read_text())
    assert {"speculative", "diffusion", "jacobi"} <= set(results)
    plots = run_all.make_plots(results)
    assert {"forwards_per_token.png", "speedup_diffusion.png"} <= {p.name for p in plots}
    run_all.write_readme(results, plots, [], "python benchmarks/run_all.py --quick", None)
