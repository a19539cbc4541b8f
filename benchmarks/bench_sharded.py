"""Decoding on a mesh of 1, 2, 4 and 8 simulated CPU devices: tokens/s, compile time, collectives per step.

The demo pair (`demo-code`: 6 heads, 2 KV heads, MLP 1024, vocab 4096; `demo-code-draft`: 4 heads, 2 KV heads)
decodes 8 held-out code prompts with greedy and speculative (draft chain, 4 tokens) decoding on meshes
data x model (`jspec.make_mesh`). The model axis is 1 or 2: 6 heads do not split over 4 or 8 devices, so the
larger meshes add devices along "data" (the batch of 8 divides every data axis here):

    devices 1: 1x1    2: 1x2, 2x1    4: 2x2, 4x1    8: 4x2, 8x1        (--quick: 1x1, 1x2, 2x2, 4x2)

The devices are simulated (`JAX_NUM_CPU_DEVICES=N`) and share this machine's CPU cores, so the tokens/s ratios
measure the overhead of partitioning and collectives, not scaling. A device count is fixed per process: each
count runs in its own long-lived worker process, and the driver interleaves the timed calls (every mesh once per
round, the starting mesh rotating, several rounds) and reports each mesh's total time against the 1x1 mesh's.

Collectives come from the compiled decode loop's HLO (`_decode_jit.lower(...).compile().as_text()`): collective
ops (all-gather, all-reduce, reduce-scatter, collective-permute, all-to-all) in the computations the decode
`while` loop's body and condition reach (each step) and elsewhere (prefill, outputs). Counts are ops in the
program text: both branches of a conditional count, and an op in a nested loop counts once.

    python benchmarks/bench_sharded.py                 # every mesh above, 5 rounds, 64 new tokens
    python benchmarks/bench_sharded.py --quick         # 4 meshes, 3 rounds, 32 new tokens (under 2 minutes)
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys
import time
from collections import defaultdict

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
STRATEGIES = ("greedy", "speculative")
MESHES = ("1x1", "1x2", "2x1", "2x2", "4x1", "4x2", "8x1")
QUICK_MESHES = ("1x1", "1x2", "2x2", "4x2")


def parse_mesh(text: str) -> tuple[int, int]:
    data, model = text.split("x")
    return int(data), int(model)


# --- HLO ------------------------------------------------------------------------------------------------

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE = re.compile(r"\swhile\(.*\bcondition=%?([\w.\-]+), body=%?([\w.\-]+)")
_COLLECTIVE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{"step": {op: count}, "outside": {op: count}} for a compiled module's text: "step" counts the ops in the
    computations reached from the body and condition of the decode loop (the entry computation's `while` with
    the largest body), "outside" every other op reached from the entry."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith("  "):
            computations[current].append(line)

    def reached(roots) -> set[str]:
        seen, todo = set(), list(roots)
        while todo:
            name = todo.pop()
            if name in seen or name not in computations:
                continue
            seen.add(name)
            for line in computations[name]:
                todo += _CALLEE.findall(line)
                for group in _CALLEE_LIST.findall(line):
                    todo += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
        return seen

    loops = [reached(m.groups()) for line in computations[entry] if (m := _WHILE.search(line))]
    step = max(loops, key=lambda names: sum(len(computations[n]) for n in names), default=set())
    counts = {"step": dict.fromkeys(COLLECTIVES, 0), "outside": dict.fromkeys(COLLECTIVES, 0)}
    for name in reached([entry]):
        for line in computations[name]:
            if match := _COLLECTIVE.search(line):
                counts["step" if name in step else "outside"][match.group(1)] += 1
    return counts


# --- worker: one process per device count -----------------------------------------------------------------


def worker(num_devices: int, new_tokens: int, batch: int, prompt_tokens: int) -> None:
    import jax

    import jspec
    from jspec import bench
    from jspec.strategies.base import resolve_strategy

    decode_module = importlib.import_module("jspec.decode")  # `jspec.decode` is the function
    if jax.device_count() != num_devices:
        raise SystemExit(f"worker: expected {num_devices} devices, jax sees {jax.device_count()} (XLA_FLAGS set?)")
    target, draft = jspec.load("demo-code"), jspec.load("demo-code-draft")
    prompts = bench.heldout_prompts(target.tokenizer, batch, prompt_tokens)
    options = {"greedy": {}, "speculative": {"draft": draft, "num_draft_tokens": 4}}
    placed = {}  # (mesh, strategy) -> (mesh object, model and strategy already on it)

    def setup(mesh_text: str, strategy_name: str) -> dict:
        """Place the model (and draft) on the mesh, then lower and compile the decode loop (timed)."""
        mesh = jspec.make_mesh(*parse_mesh(mesh_text))
        model, strategy = decode_module.on_mesh(target, resolve_strategy(strategy_name, options[strategy_name]), mesh)
        placed[mesh_text, strategy_name] = mesh, model, strategy
        request = decode_module.build_prompts(model, prompts, new_tokens, None, [], None, strategy)
        start = time.perf_counter()
        lowered = decode_module._decode_jit.lower(model.without_tokenizer(), strategy,
                                                  *decode_module._placed(model, request, jax.random.key(0)))
        lower_seconds = time.perf_counter() - start
        compiled = lowered.compile()  # decode() below reuses this executable
        compile_seconds = time.perf_counter() - start - lower_seconds
        return {"lower_s": lower_seconds, "compile_s": compile_seconds,
                "collectives": count_collectives(compiled.as_text())}

    def run(mesh_text: str, strategy_name: str) -> dict:
        mesh, model, strategy = placed[mesh_text, strategy_name]
        start = time.perf_counter()
        out = jspec.decode(model, prompts, strategy, max_new_tokens=new_tokens, stop_tokens=[], mesh=mesh)
        return {"seconds": time.perf_counter() - start, "tokens": int(out.lengths.sum()), "steps": out.stats["steps"],
                "sequences": out.sequences()}

    bench.serve(lambda request: (setup if request.pop("op") == "setup" else run)(**request))


# --- driver ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meshes", nargs="+", help=f"data x model meshes (default {' '.join(MESHES)})")
    parser.add_argument("--rounds", type=int, help="timed calls per mesh and strategy (default 5; --quick 3)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row (default 64; --quick 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    meshes = args.meshes or list(QUICK_MESHES if args.quick else MESHES)
    rounds = args.rounds or (3 if args.quick else 5)
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    if "1x1" not in meshes:
        meshes.insert(0, "1x1")  # the baseline

    from jspec import bench

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"driver {bench.environment()}; workers: JAX_NUM_CPU_DEVICES = devices of their meshes")
    print(f"cpu cores available: {len(os.sched_getaffinity(0))}; target demo-code, draft demo-code-draft; batch "
          f"{args.batch}, {args.prompt_tokens}-token held-out prompts, {new_tokens} new tokens, {rounds} rounds")
    print("NOTE: the devices are simulated on the same CPU cores: tokens/s ratios below measure the overhead of a "
          "mesh (partitioned programs, collectives), not scaling.\n")

    workers = {}
    for count in sorted({d * m for d, m in map(parse_mesh, meshes)}):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(count), JAX_PLATFORMS="cpu")
        workers[count] = bench.Worker([__file__, "--worker", str(count), str(new_tokens), str(args.batch),
                                       str(args.prompt_tokens)], env=env)
    worker_of = {mesh: workers[d * m] for mesh, (d, m) in zip(meshes, map(parse_mesh, meshes))}
    cases = [(mesh, strategy) for strategy in STRATEGIES for mesh in meshes]

    setups, first = {}, {}
    for mesh, strategy in cases:  # one at a time: compile times are not contended
        setups[mesh, strategy] = worker_of[mesh].ask(op="setup", mesh_text=mesh, strategy_name=strategy)
        first[mesh, strategy] = worker_of[mesh].ask(op="run", mesh_text=mesh, strategy_name=strategy)  # warm-up
        print(f"set up {mesh} {strategy}: compile {setups[mesh, strategy]['compile_s']:.1f} s", flush=True)

    totals, tokens = defaultdict(float), defaultdict(int)
    for index in range(rounds):
        for strategy in STRATEGIES:
            order = meshes[index % len(meshes):] + meshes[: index % len(meshes)]  # rotate the starting mesh
            for mesh in order:
                answer = worker_of[mesh].ask(op="run", mesh_text=mesh, strategy_name=strategy)
                totals[mesh, strategy] += answer["seconds"]
                tokens[mesh, strategy] += answer["tokens"]
    for w in workers.values():
        w.close()

    rows = []
    for mesh, strategy in cases:
        step, outside = (setups[mesh, strategy]["collectives"][where] for where in ("step", "outside"))
        d, m = parse_mesh(mesh)
        rows.append({
            "strategy": strategy, "mesh (data x model)": mesh, "devices": d * m,
            "tokens/s": tokens[mesh, strategy] / totals[mesh, strategy],
            "time vs 1x1": totals[mesh, strategy] / totals["1x1", strategy],
            "lower s": setups[mesh, strategy]["lower_s"], "compile s": setups[mesh, strategy]["compile_s"],
            "steps": first[mesh, strategy]["steps"],
            "same tokens as 1x1": first[mesh, strategy]["sequences"] == first["1x1", strategy]["sequences"],
            **{f"{name} step/out": f"{step[name]}/{outside[name]}" for name in COLLECTIVES},
            "collectives per step": sum(step.values()),
        })
    print(f"\ntotals over {rounds} interleaved rounds; 'time vs 1x1' is the ratio of total seconds against the "
          "1x1 mesh (same strategy, same run); collectives: ops per decode step / ops outside the loop")
    bench.print_table(rows, ["strategy", "mesh (data x model)", "devices", "tokens/s", "time vs 1x1", "lower s",
                             "compile s", "steps", "same tokens as 1x1", "collectives per step",
                             *[f"{name} step/out" for name in COLLECTIVES]])
    path = bench.write_json("sharded", {"command": sys.argv, "meshes": meshes, "rounds": rounds,
                                        "new_tokens": new_tokens, "batch": args.batch, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        position = sys.argv.index("--worker")
        worker(*map(int, sys.argv[position + 1: position + 5]))
    else:
        main()
