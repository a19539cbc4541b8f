"""Two checkouts of jspec side by side in one run: decode speed, compile time against depth, cache bytes per row.

Each checkout runs in its own long-lived worker process (PYTHONPATH = that checkout); the driver interleaves the
timed calls (per round: case 1 before, after, case 2 before, after, ...) and reports the ratio of total times, so
load changes on the machine fall on both versions and on every case alike (ratios between cases of one version
are interleaved too). Diffusion cases (DIFFUSION_CASES: dllm_static and freedave on demo-code-dllm in its shipped
bfloat16, greedy or at T = 0.8, the four code prompts one after another at batch 1) report forwards as well. The workers use only the API both versions share (`jspec.load`, `jspec.decode`,
`Model.random`, a strategy's `init`).

    git worktree add /tmp/jspec-before <commit>
    python benchmarks/bench_versions.py --before /tmp/jspec-before --after . [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "def fib(n):\n    if n < 2:\n        return n\n"
CASES = ["greedy b1", "greedy b8", "chain k=4 b1", "tree 2,2,1 b1", "sample T=0.8 b1", "chain k=4 T=0.8 b1"]
AUTO_CASES = ["auto b8", "auto T=0.8 b8"]  # num_draft_tokens="auto", batch 8 (both versions must take "auto")
CODE_PROMPTS = [
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n",
    "import os\nimport sys\n\n\ndef main(",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.",
    "def read_lines(path):\n    with open(path) as f:\n        return",
]
DIFFUSION_CASES = [f"{strategy} {cache} bf16" for cache in ("none", "dual") for strategy in ("dllm_static", "freedave k=4")]
DIFFUSION_CASES += ["dllm_static T=0.8 none bf16", "freedave k=4 T=0.8 none bf16"]


def worker() -> None:
    sys.path.insert(0, os.getcwd())  # the checkout (cwd) before an editable install's finder, which PYTHONPATH does not beat
    import jax
    import numpy as np

    import jspec

    if not Path(jspec.__file__).resolve().is_relative_to(Path.cwd().resolve()):
        raise SystemExit(f"worker in {os.getcwd()} imported jspec from {jspec.__file__}")
    from jspec.decode import _decode_loop, build_prompts
    from jspec.models.config import TransformerConfig
    from jspec.strategies.base import resolve_strategy

    target, draft = jspec.load("demo-code"), jspec.load("demo-code-draft")

    def diffusion(case: str):
        """One output per code prompt, each decoded alone (batch 1) in the model's shipped dtype (bfloat16)."""
        dllm = jspec.load("demo-code-dllm")  # cached by jspec.load
        strategy, *rest = case.split()  # "<strategy> [k=<draft steps>] [T=<temperature>] <cache> bf16"
        cache = rest[-2]
        options = {}
        for word in rest[:-2]:
            name, value = word.split("=")
            if name not in ("k", "T"):
                raise SystemExit(f"case {case!r}: unknown setting {word!r} (k=<draft steps> or T=<temperature>)")
            options.update({"draft_steps": int(value)} if name == "k" else {"temperature": float(value), "key": 0})
        return [jspec.decode(dllm, [prompt], strategy, max_new_tokens=64, block_size=32, cache=cache, **options)
                for prompt in CODE_PROMPTS]

    cases = {
        "greedy b1": lambda: jspec.decode(target, [PROMPT], max_new_tokens=128, stop_tokens=[]),
        "greedy b8": lambda: jspec.decode(target, [PROMPT + "x" * i for i in range(8)], max_new_tokens=64, stop_tokens=[]),
        "chain k=4 b1": lambda: jspec.decode(target, [PROMPT], "speculative", draft=draft, num_draft_tokens=4,
                                             max_new_tokens=128, stop_tokens=[]),
        "tree 2,2,1 b1": lambda: jspec.decode(target, [PROMPT], "speculative", draft=draft, tree=(2, 2, 1),
                                              max_new_tokens=128, stop_tokens=[]),
        "sample T=0.8 b1": lambda: jspec.decode(target, [PROMPT], "sample", temperature=0.8, key=0, max_new_tokens=128,
                                                stop_tokens=[]),
        "chain k=4 T=0.8 b1": lambda: jspec.decode(target, [PROMPT], "speculative", draft=draft, num_draft_tokens=4,
                                                   temperature=0.8, key=0, max_new_tokens=128, stop_tokens=[]),
        "auto b8": lambda: jspec.decode(target, [PROMPT + "x" * i for i in range(8)], "speculative", draft=draft,
                                        num_draft_tokens="auto", max_new_tokens=64, stop_tokens=[]),
        "auto T=0.8 b8": lambda: jspec.decode(target, [PROMPT + "x" * i for i in range(8)], "speculative", draft=draft,
                                              num_draft_tokens="auto", temperature=0.8, key=0, max_new_tokens=64,
                                              stop_tokens=[]),
    }

    def random_model(layers: int, **extra):
        config = TransformerConfig(vocab_size=512, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128, **extra)
        return jspec.Model.random(config)

    def compile_seconds(layers: int, strategy: str) -> float:
        model = random_model(layers)
        options = {"draft": random_model(1), "num_draft_tokens": 4} if strategy == "speculative" else {}
        resolved = resolve_strategy(strategy, options)
        request = build_prompts(model, [[1, 2, 3]], 16, None, [], None, resolved)
        start = time.perf_counter()
        jax.jit(_decode_loop).lower(model, resolved, request, jax.random.key(0)).compile()
        return time.perf_counter() - start

    def cache_bytes_per_row(window: int, strategy: str) -> int:
        model = random_model(4, sliding_window=window)
        options = {"draft": random_model(1, sliding_window=window), "tree": (2, 2, 1)} if strategy == "speculative" else {}
        resolved = resolve_strategy(strategy, options)
        request = build_prompts(model, [[1, 2, 3]], 4 * window, None, [], None, resolved)
        state = jax.eval_shape(lambda: resolved.init(model, request, jax.random.key(0)))
        return sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.cache))

    def session() -> list:
        """20 decode calls, greedy and speculative alternating, batch 1-4, prompts of 5-60 tokens, 20-64 new tokens:
        (compiles, seconds)."""
        rng = np.random.default_rng(0)
        before, start = jspec.trace_count(), time.perf_counter()
        for call in range(20):
            batch, length = int(rng.integers(1, 5)), int(rng.integers(5, 61))
            prompts = [list(map(int, rng.integers(5, 4000, length))) for _ in range(batch)]
            new_tokens = int(rng.integers(20, 65))
            options = {"draft": draft, "num_draft_tokens": 4} if call % 2 else {}
            jspec.decode(target, prompts, "speculative" if call % 2 else "greedy", max_new_tokens=new_tokens,
                         stop_tokens=[], **options)
        return [jspec.trace_count() - before, time.perf_counter() - start]

    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "where":
            answer = jspec.__file__
        elif request["op"] == "session":
            answer = session()
        elif request["op"] == "run":
            start = time.perf_counter()
            case = request["case"]
            outs = diffusion(case) if case in DIFFUSION_CASES else [cases[case]()]
            answer = [time.perf_counter() - start, [row for out in outs for row in out.sequences()],
                      sum(int(out.stats["model_calls"]) for out in outs)]
        elif request["op"] == "compile":
            answer = compile_seconds(request["layers"], request["strategy"])
        else:
            answer = int(cache_bytes_per_row(request["window"], request["strategy"]))
        print(json.dumps(answer), flush=True)


class Worker:
    def __init__(self, checkout: Path):
        env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
        self.process = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env, cwd=checkout)

    def ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="*", default=[2, 8, 32], help="compile-time depths (none: skip)")
    parser.add_argument("--cases", nargs="*", default=CASES, help=f"timed cases, from {CASES + AUTO_CASES + DIFFUSION_CASES}")
    parser.add_argument("--session", action="store_true", help="first: a 20-call session's compiles and seconds")
    parser.add_argument("--windows", type=int, nargs="*", default=[64, 256], help="cache-size windows (none: skip)")
    args = parser.parse_args()
    workers = {"before": Worker(args.before), "after": Worker(args.after)}
    for name, w in workers.items():
        print(f"{name}: jspec from {w.ask(op='where')}")

    if args.session:
        print("\nsession of 20 decode calls (batch 1-4, prompts of 5-60 tokens, max_new_tokens 20-64; greedy and "
              "speculative alternating), fresh process each")
        for name, w in workers.items():
            compiles, seconds = w.ask(op="session")
            print(f"{name:7s} compiles {compiles:3d}   total seconds {seconds:7.1f}")

    totals = {case: {"before": 0.0, "after": 0.0} for case in args.cases}
    first = {case: {name: w.ask(op="run", case=case) for name, w in workers.items()} for case in args.cases}  # compile
    for _ in range(args.rounds):
        for case in args.cases:
            for name, w in workers.items():  # interleaved: before, after, before, after, ...
                totals[case][name] += w.ask(op="run", case=case)[0]
    print(f"\n{args.rounds} interleaved rounds\ncase                     before s   after s   after/before   same tokens"
          "   forwards before  after")
    for case in args.cases:
        seconds, (before, after) = totals[case], first[case].values()
        print(f"{case:23s}  {seconds['before']:8.3f}  {seconds['after']:8.3f}   {seconds['after'] / seconds['before']:12.3f}"
              f"   {str(before[1] == after[1]):11s}   {before[2]:15d}  {after[2]:5d}")

    def compare(title: str, header: str, op: str, sizes, key: str, fmt: str) -> None:
        """One table row per (size, strategy): the same request to both workers."""
        print(f"\n{title}\n{header}")
        for size in sizes:
            for strategy in ("greedy", "speculative"):
                got = {name: w.ask(op=op, strategy=strategy, **{key: size}) for name, w in workers.items()}
                print(f"{size:6d}  {strategy:12s} {got['before']:{fmt}} {got['after']:{fmt}}")

    compare("compile s of decode (lower + compile), random model, 64 hidden", "layers  strategy       before    after",
            "compile", args.layers, "layers", "8.2f")
    compare("cache bytes per row, 4-layer window-w model decoding 4w new tokens (3-token prompt, 16 padded)",
            "window  strategy       before     after", "cache", args.windows, "window", "9d")
    for w in workers.values():
        w.process.stdin.close()


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
