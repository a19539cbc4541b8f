"""Run every benchmark, then plot their JSON results and write benchmarks/results/README.md that shows them.

Each benchmark runs as its own process (as its docstring says to run it, `--quick` sizes with --quick) and writes its
JSON to benchmarks/results/; a benchmark that fails or runs past --timeout is reported and the others go on. The
plots are drawn from whatever JSON is there (matplotlib, the `plots` extra):

    speedup_<benchmark>.png       speedup bars per strategy (measured; predicted and memory-bound where reported)
    acceptance_by_depth.png       speculative settings: fraction of draft tokens accepted at each depth
    forwards_per_token.png        target forwards per emitted token: speculative, Jacobi family, diffusion
    tokens_per_second_vs_batch.png  greedy tokens/s against batch size (jspec and the naive per-token loop)

    python benchmarks/run_all.py --quick              # every benchmark in its quick form, then plots and README
    python benchmarks/run_all.py --only speculative   # one benchmark (names below), then plots from all JSON there
    python benchmarks/run_all.py --plots-only         # re-plot the JSON already in benchmarks/results/

bench_versions.py compares two checkouts (--before DIR) and is not run here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str  # its JSON is RESULTS / f"{name}.json"
    script: str
    full: tuple[str, ...] = ()  # arguments of the full run
    quick: tuple[str, ...] = ()  # arguments of the quick run
    what: str = ""


BENCHMARKS = (
    Benchmark("speculative", "bench_speculative.py", (), ("--quick", "--new-tokens", "64", "--repeats", "1"),
              "draft chain / tree, prompt lookup, layer skip vs autoregressive (and transformers), interleaved"),
    Benchmark("jacobi", "bench_jacobi.py", (), ("--quick",), "Jacobi, SJD, GSD, lookahead vs autoregressive, interleaved"),
    Benchmark("diffusion", "bench_diffusion.py", (), ("--quick", "--prompts", "2", "--repeats", "2"),
              "dllm_static / dllm_threshold / FreeDave / block diffusion vs static and autoregressive"),
    Benchmark("autoregressive", "bench_autoregressive.py", ("--batch-sizes", "1", "2", "4", "8", "16"),
              ("--model", "random-25m", "--batch-sizes", "1", "2", "4", "8", "16", "--new-tokens", "64", "--repeats", "3"),
              "greedy tokens/s vs a naive per-token Python loop, by batch size"),
    Benchmark("vs_transformers", "bench_vs_transformers.py", (), ("--prompts", "2", "--new-tokens", "64", "--repeats", "2"),
              "jspec greedy vs transformers generate on the same weights"),
    Benchmark("sharded", "bench_sharded.py", (), ("--quick",), "1-8 simulated CPU devices: overhead, compile time, collectives"),
)


def run_benchmark(benchmark: Benchmark, quick: bool, timeout: float) -> dict:
    """Run one benchmark script from the repository root; its status, seconds and the tail of its output."""
    command = [sys.executable, str(ROOT / "benchmarks" / benchmark.script), *(benchmark.quick if quick else benchmark.full)]
    env = {"OMP_WAIT_POLICY": "PASSIVE",  # torch's OpenMP threads spin-wait on a shared CPU (bench_vs_transformers.py)
           **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"--- {benchmark.name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = f"timed out after {timeout:.0f} s"
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
    seconds = time.perf_counter() - started
    print(output[-3000:], flush=True)
    print(f"--- {benchmark.name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": benchmark.name, "command": "python benchmarks/" + " ".join([benchmark.script, *command[2:]]),
            "status": status, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def record_runs(runs: list[dict]) -> list[dict]:
    """Merge these runs into RESULTS/runs.json (one entry per benchmark, the one that finished last), in BENCHMARKS
    order."""
    path = RESULTS / "runs.json"
    recorded = {r["name"]: r for r in (json.loads(path.read_text()) if path.is_file() else [])}
    for run in runs:
        if run.get("finished", "") >= recorded.get(run["name"], {}).get("finished", ""):
            recorded[run["name"]] = run
    merged = [recorded[b.name] for b in BENCHMARKS if b.name in recorded]
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def load_results() -> dict[str, dict]:
    results = {}
    for benchmark in BENCHMARKS:
        path = RESULTS / f"{benchmark.name}.json"
        if path.is_file():
            results[benchmark.name] = json.loads(path.read_text())
    return results


# --- plots ---------------------------------------------------------------------------------------------------------


def speedup_panels(rows: list[dict], method_key: str, measured_key: str, extra_keys: tuple[str, ...], panel_keys):
    """{panel title: (methods, {series: values})} for grouped bars, one panel per (T, batch) or other key."""
    panels: dict[str, tuple[list[str], dict[str, list]]] = {}
    for row in rows:
        title = ", ".join(f"{k} {row[k]}" for k in panel_keys if k in row)
        methods, series = panels.setdefault(title, ([], {key: [] for key in (measured_key, *extra_keys)}))
        methods.append(str(row[method_key]).removeprefix("jspec "))
        for key in series:
            value = row.get(key)
            series[key].append(float(value) if isinstance(value, (int, float)) else float("nan"))
    return panels


def plot_speedups(plt, name: str, panels: dict, ylabel: str) -> Path | None:
    if not panels:
        return None
    import numpy as np

    columns = min(len(panels), 2)
    rows = (len(panels) + columns - 1) // columns
    widest = max(len(methods) for methods, _ in panels.values())
    fig, axes = plt.subplots(rows, columns, figsize=(max(6.5, 0.55 * widest) * columns, 3.8 * rows), squeeze=False)
    for ax, (title, (methods, series)) in zip(axes.flat, panels.items()):
        positions = np.arange(len(methods))
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.bar(positions + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(positions, methods, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{name}: speedup over the baseline of the same run (dashed: 1x)")
    fig.tight_layout()
    return save(fig, plt, f"speedup_{name}.png")


def save(fig, plt, filename: str) -> Path:
    path = RESULTS / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_acceptance(plt, speculative: dict) -> Path | None:
    rows = [row for row in speculative.get("rows", []) if row.get("acceptance by depth")]
    if not rows:
        return None
    panels = sorted({(row["T"], row["batch"]) for row in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (temperature, batch) in zip(axes.flat, panels):
        for row in rows:
            if (row["T"], row["batch"]) == (temperature, batch):
                rates = row["acceptance by depth"]
                ax.plot(range(1, len(rates) + 1), rates, marker="o", label=row["method"].removeprefix("jspec "))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("draft depth")
        ax.set_ylabel("accepted / tried")
        ax.set_title(f"T {temperature}, batch {batch}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("speculative decoding on the demo pair: acceptance by depth")
    fig.tight_layout()
    return save(fig, plt, "acceptance_by_depth.png")


def plot_forwards_per_token(plt, results: dict) -> Path | None:
    series = []  # (title, labels, values)
    if "speculative" in results:
        rows = [r for r in results["speculative"]["rows"] if r.get("batch") == 1 and r.get("T") == 0 and "target calls/token" in r]
        series.append(("speculative (greedy, batch 1)", [r["method"].removeprefix("jspec ") for r in rows],
                       [r["target calls/token"] for r in rows]))
    if "jacobi" in results:
        rows = [r for r in results["jacobi"]["rows"] if r.get("batch") == 1]
        series.append(("Jacobi family (batch 1)", [f"{r['method']} T={r['T']}" for r in rows], [r["calls/token"] for r in rows]))
    if "diffusion" in results:
        # bench_diffusion reports tokens per forward; the rows that stop at line ends measure stopping, not parallelism
        rows = [r for r in results["diffusion"]["rows"] if r.get("tokens/forward") and "stop at" not in r["method"]]
        series.append(("diffusion (batch 1)", [r["method"] for r in rows], [1.0 / r["tokens/forward"] for r in rows]))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (title, labels, values) in zip(axes.flat, series):
        ax.barh(labels, values)
        ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("target forwards per token")
        ax.set_title(title, fontsize=9)
    fig.suptitle("target forwards per emitted token (dashed: autoregressive, 1)")
    fig.tight_layout()
    return save(fig, plt, "forwards_per_token.png")


def plot_tokens_per_second(plt, autoregressive: dict) -> Path | None:
    rows = autoregressive.get("rows", [])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row["batch"], row["tokens/s"]) for row in rows if row["method"] == method)
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s (all rows)")
    ax.set_title(f"greedy decoding, {autoregressive.get('args', {}).get('model', '')}: tokens/s vs batch size", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, plt, "tokens_per_second_vs_batch.png")


def make_plots(results: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    if "speculative" in results:
        panels = speedup_panels(results["speculative"]["rows"], "method", "speedup (measured)",
                                ("predicted", "memory-bound"), ("T", "batch"))
        plots.append(plot_speedups(plt, "speculative", panels, "speedup over jspec autoregressive"))
        plots.append(plot_acceptance(plt, results["speculative"]))
    if "jacobi" in results:
        panels = speedup_panels(results["jacobi"]["rows"], "method", "speedup (measured)", ("predicted", "memory-bound"), ("T", "batch"))
        plots.append(plot_speedups(plt, "jacobi", panels, "speedup over autoregressive"))
    if "diffusion" in results:
        panels = speedup_panels(results["diffusion"]["rows"], "method", "vs AR greedy", ("vs dllm_static",), ())
        plots.append(plot_speedups(plt, "diffusion", panels, "speedup"))
    plots.append(plot_forwards_per_token(plt, results))
    if "autoregressive" in results:
        plots.append(plot_tokens_per_second(plt, results["autoregressive"]))
    return [p for p in plots if p is not None]


# --- README --------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    columns = [c for c in columns if any(c in row for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


TABLE_COLUMNS = {
    "speculative": ["T", "batch", "method", "tokens/s", "target calls/token", "draft calls/token", "speedup (measured)",
                    "predicted", "measured/predicted", "memory-bound", "same tokens as jspec"],
    "jacobi": ["T", "batch", "method", "tokens/s", "calls/token", "speedup (measured)", "predicted", "memory-bound"],
    "diffusion": ["method", "model", "tokens/s", "tokens/forward", "forwards/block", "vs dllm_static", "vs AR greedy", "agreement", "target NLL"],
    "autoregressive": ["batch", "method", "tokens/s", "median s", "compile s", "speedup vs naive"],
    "vs_transformers": ["method", "tokens/s", "ms/token", "median s", "compile s", "speedup vs transformers"],
    "sharded": ["strategy", "mesh (data x model)", "devices", "tokens/s", "time vs 1x1", "compile s", "same tokens as 1x1",
                "collectives per step"],
}


def write_readme(results: dict, plots: list[Path], runs: list[dict], command: str, total_seconds: float | None) -> Path:
    environment = next((r["environment"] for r in results.values() if "environment" in r), {})
    lines = ["# Benchmark results", "",
             f"Written by `{command}`"
             + (f" in {total_seconds / 60:.1f} minutes" if total_seconds else "") + f" on {time.strftime('%Y-%m-%d')}; "
             f"environment: {json.dumps(environment)}. Each speedup is a ratio against a baseline measured in the same "
             "run on the same weights and prompts (see each script's docstring); on a shared CPU the figures move "
             "from run to run, so read them as the shape of the results, not as this hardware's best. The scripts run "
             "with OMP_WAIT_POLICY=PASSIVE unless it was set (torch's threads otherwise spin on a shared CPU).", ""]
    if runs:
        lines += ["Last runs:", "", "| benchmark | command | status | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | `{r['command']}` | {r['status']} | {r['seconds']:.0f} |" for r in runs]
        lines += [""]
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in plots]
    for benchmark in BENCHMARKS:
        if benchmark.name not in results:
            continue
        rows = results[benchmark.name].get("rows", [])
        lines += [f"## {benchmark.name}: {benchmark.what}", "", f"JSON: [{benchmark.name}.json]({benchmark.name}.json)", ""]
        if rows:
            lines += [markdown_table(rows, TABLE_COLUMNS.get(benchmark.name, list(rows[0]))), ""]
        if benchmark.name == "speculative" and results[benchmark.name].get("per_call_ms"):
            per_call = ", ".join(f"{k}: {v:.3f}" for k, v in results[benchmark.name]["per_call_ms"].items())
            lines += [f"Per-call milliseconds (jitted forwards timed interleaved; b = batch, w = tokens per row): {per_call}", ""]
    path = RESULTS / "README.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick form")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="run only these")
    parser.add_argument("--skip", nargs="+", default=[], choices=[b.name for b in BENCHMARKS], help="do not run these")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark")
    parser.add_argument("--plots-only", action="store_true", help="run nothing: plot the JSON in benchmarks/results/")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    started, runs = time.perf_counter(), []
    if not args.plots_only:
        for benchmark in BENCHMARKS:
            if (args.only and benchmark.name not in args.only) or benchmark.name in args.skip:
                continue
            runs.append(run_benchmark(benchmark, args.quick, args.timeout))
    runs = record_runs(runs)
    results = load_results()
    plots = make_plots(results)
    command = "python benchmarks/run_all.py " + " ".join(sys.argv[1:])
    readme = write_readme(results, plots, runs, command.strip(), None if args.plots_only else time.perf_counter() - started)
    print("\n".join(f"{r['name']}: {r['status']} ({r['seconds']:.0f} s)" for r in runs))
    print(f"wrote {', '.join(p.name for p in plots)} and {readme}")


if __name__ == "__main__":
    main()
