"""Benchmark helpers shared by the scripts in benchmarks/: timing with compile time apart, tables, JSON.

Every figure is the median of several timed runs after a first (compiling) run, and every speedup is a
ratio against a baseline measured in the same process, on the same weights and prompts.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax


@dataclasses.dataclass
class Timing:
    compile_seconds: float  # first call minus the median steady-state call
    median_seconds: float
    runs: list[float]
    result: Any = None

    @property
    def total_seconds(self) -> float:
        return sum(self.runs)


@dataclasses.dataclass
class InterleavedRuns:
    """One runner's calls in `time_groups_interleaved`."""

    warm_seconds: float  # its untimed first calls (compiling), in total
    warm_calls: int
    runs: list[float]  # seconds of each timed call, round by round, group by group
    results: list  # its result on each group in the first timed round (the later rounds repeat the same calls)

    @property
    def seconds(self) -> float:
        """All its timed calls, in total: compare runners by ratios of these."""
        return sum(self.runs)

    @property
    def compile_seconds(self) -> float:
        """The warm-up calls' time beyond what as many timed calls take on average."""
        return max(self.warm_seconds - self.warm_calls * self.seconds / len(self.runs), 0.0)


def time_groups_interleaved(
    runners: dict[str, Callable[[Any], Any]], groups: list[Any], rounds: int, warm_groups: int = 1
) -> dict[str, InterleavedRuns]:
    """Every runner on every group in turn, `rounds` times: for each round, for each group, A, B, C, ... (each call
    blocked until its results are ready), after untimed calls of every runner on the first `warm_groups` groups
    (compiling; group by group, in the runners' order, so a runner may use what an earlier one found on the same
    group). Load changes on the machine fall on every runner alike, so ratios of `seconds` compare them fairly."""
    warm = {name: 0.0 for name in runners}
    for group in groups[:warm_groups]:
        for name, run in runners.items():
            started = time.perf_counter()
            jax.block_until_ready(run(group))
            warm[name] += time.perf_counter() - started
    runs: dict[str, list[float]] = {name: [] for name in runners}
    results: dict[str, list[Any]] = {name: [] for name in runners}
    for round_index in range(rounds):
        for group in groups:
            for name, run in runners.items():
                started = time.perf_counter()
                result = jax.block_until_ready(run(group))
                runs[name].append(time.perf_counter() - started)
                if round_index == 0:
                    results[name].append(result)
    warm_calls = min(warm_groups, len(groups))
    return {name: InterleavedRuns(warm[name], warm_calls, runs[name], results[name]) for name in runners}


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int = 5) -> dict[str, Timing]:
    """Each call once to compile, then `repeats` rounds of every call in turn (A, B, ..., A, B, ...), each blocked
    until its results are ready (`time_groups_interleaved` with one group): load changes on the machine fall on
    every call alike, so ratios of `total_seconds` compare them fairly."""
    timed = time_groups_interleaved({name: (lambda _, fn=fn: fn()) for name, fn in calls.items()}, [None], repeats)
    timings = {}
    for name, runs in timed.items():
        median = statistics.median(runs.runs)
        timings[name] = Timing(max(runs.warm_seconds - median, 0.0), median, runs.runs, runs.results[0])
    return timings


def time_call(fn: Callable[[], Any], repeats: int = 5) -> Timing:
    """Call fn once to compile, then `repeats` times; every call is blocked until its results are ready."""
    return time_interleaved({"call": fn}, repeats)["call"]


def forward_call(model: Any, batch_size: int, prompt_len: int, width: int, **forward_options: Any) -> Callable[[], Any]:
    """A call of a jitted forward of `width` tokens per row over a cache holding `prompt_len` tokens (default causal
    mask): one decode step (width 1) or one verification (width > 1), of the model as `jspec.decode` runs it
    (`with_head_copy`). `forward_options` go to `model.forward` (e.g. skip_layers=(1,): a self-speculative draft
    call)."""
    import jax.numpy as jnp

    from jspec.models.model import with_head_copy

    model = with_head_copy(model)
    cache = model.new_cache(batch_size, prompt_len + width + 64).with_lengths(jnp.full((batch_size,), prompt_len))
    tokens = jnp.ones((batch_size, width), jnp.int32)
    positions = jnp.broadcast_to(prompt_len + jnp.arange(width)[None], (batch_size, width))
    run = jax.jit(lambda m, c: m.forward(tokens, positions, c, **forward_options)[0])
    return lambda: run(model, cache)


def forward_ms(model: Any, batch_size: int, prompt_len: int, width: int, repeats: int = 20, **forward_options: Any) -> float:
    """Milliseconds per `forward_call` (median of `repeats`)."""
    return 1000 * time_call(forward_call(model, batch_size, prompt_len, width, **forward_options), repeats).median_seconds


def heldout_prompts(tokenizer, count: int, prompt_tokens: int, min_continuation: int = 64) -> list[list[int]]:
    """The first `prompt_tokens` tokens of held-out standard-library files of the demo corpus (the demo models
    never trained on them), in manifest order; files shorter than prompt + min_continuation are skipped."""
    from jspec.loading import ASSETS_DIR
    from jspec.train import corpus

    manifest = corpus.load_manifest(ASSETS_DIR / "demo-code" / "corpus_manifest.json")
    prompts = []
    for text in corpus.load_documents(manifest, "heldout", root=corpus.stdlib_root()):
        ids = tokenizer.encode(text)
        if len(ids) >= prompt_tokens + min_continuation:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == count:
            break
    return prompts


# Peak memory bandwidth (TB/s) by a lower-case substring of the device kind, for bandwidth-bound kernels.
PEAK_TBPS_BY_DEVICE_KIND = (("h200", 4.8), ("h100", 3.35))


def detect_peak_tbps(device_kind: str) -> float | None:
    """Peak memory bandwidth of a known accelerator in TB/s (H100 SXM 3.35, H200 4.8); None when unknown."""
    kind = device_kind.lower()
    for key, tbps in PEAK_TBPS_BY_DEVICE_KIND:
        if key in kind:
            return tbps
    return None


def environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_json(name: str, payload: dict[str, Any], directory: str | Path = "benchmarks/results") -> Path:
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


class Worker:
    """A long-lived Python process that answers one JSON request per line on stdin with one JSON line on stdout
    (its side: `serve`). Benchmarks keep one per setting that must live in its own process (a checkout, a device
    count) and interleave their timed requests, so load changes on the machine fall on every setting alike."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None):
        self.process = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, cwd=cwd)

    def ask(self, **request: Any) -> Any:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.process.args} exited (code {self.process.wait()}) on {request}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def serve(handle: Callable[[dict[str, Any]], Any]) -> None:
    """The worker side of `Worker`: answer each JSON request line on stdin with `handle(request)` as one JSON line."""
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)
