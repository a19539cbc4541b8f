"""Speculative settings against autoregressive decoding, interleaved: fixed chains, prompt lookup and the auto depth.

For each temperature and batch size every setting runs on the same held-out prompts (batch 1: one prompt at a
time), one call each in turn per prompt and round (AR, setting 1, setting 2, ..., AR, ...), so load changes on
the machine fall on all alike; a speedup is the ratio of total times. Greedy outputs must equal autoregressive's.

    python benchmarks/bench_auto_depth.py                      # batch 1 and 8, T = 0 and 0.8
    python benchmarks/bench_auto_depth.py --no-auto            # only the settings an older checkout has
    python benchmarks/bench_auto_depth.py --methods "chain auto" --prompts 4 --new-tokens 64   # a short run
"""

from __future__ import annotations

import argparse

import numpy as np

import jspec
from jspec import bench
from jspec.bench import heldout_prompts


def settings(draft, auto: bool) -> dict[str, tuple[str, dict]]:
    out = {
        "autoregressive": ("greedy", {}),
        "chain k=2": ("speculative", dict(draft=draft, num_draft_tokens=2)),
        "chain k=4": ("speculative", dict(draft=draft, num_draft_tokens=4)),
        "prompt lookup k=4": ("prompt_lookup", dict(num_draft_tokens=4)),
    }
    if auto:
        out["chain auto"] = ("speculative", dict(draft=draft, num_draft_tokens="auto"))
        out["prompt lookup auto"] = ("prompt_lookup", dict(num_draft_tokens="auto"))
    return out


def select(available: dict[str, tuple[str, dict]], methods: list[str] | None) -> dict[str, tuple[str, dict]]:
    """autoregressive and the named settings (all when methods is None); an unknown name is a usage error."""
    if methods is None:
        return available
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise SystemExit(f"--methods: unknown setting(s) {unknown}; expected some of {sorted(available)}")
    return {name: available[name] for name in available if name == "autoregressive" or name in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-auto", action="store_true")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="the settings to run beside autoregressive (default: all), e.g. 'chain auto'")
    args = parser.parse_args()

    target, draft = jspec.load("demo-code"), jspec.load("demo-code-draft")
    prompts = heldout_prompts(target.tokenizer, args.prompts, args.prompt_tokens)
    print(bench.environment())
    rows = []
    for temperature in args.temperatures:
        for batch in args.batch_sizes:
            groups = [prompts[:batch]] if batch > 1 else [[p] for p in prompts]
            chosen = select(settings(draft, not args.no_auto), args.methods)

            def runner(strategy, options):
                sampling = {} if temperature == 0 else {"temperature": temperature}
                if strategy == "greedy" and temperature > 0:
                    strategy = "sample"
                return lambda group: jspec.decode(target, group, strategy, max_new_tokens=args.new_tokens, stop_tokens=[],
                                                  key=0, **options, **sampling)

            timed = bench.time_groups_interleaved(  # A, B, C, A, B, C, ... per prompt group and round
                {name: runner(*chosen[name]) for name in chosen}, groups, args.rounds)
            totals = {name: runs.seconds for name, runs in timed.items()}
            calls = {name: sum(int(out.stats["model_calls"]) for out in runs.results) for name, runs in timed.items()}
            outputs = {name: [seq for out in runs.results for seq in out.sequences()] for name, runs in timed.items()}
            depths = {name: sum(np.asarray(out.stats["depth_histogram"]) for out in runs.results)
                      for name, runs in timed.items() if "depth_histogram" in runs.results[0].stats}
            probes = {name: sum(int(out.stats["probes"]) for out in runs.results) for name, runs in timed.items() if name in depths}
            for name in chosen:
                same = outputs[name] == outputs["autoregressive"]
                if temperature == 0 and not same:
                    raise SystemExit(f"{name}: greedy output differs from autoregressive: the benchmark is invalid")
                rows.append({"T": temperature, "batch": batch, "method": name,
                             "speedup vs AR": totals["autoregressive"] / totals[name],
                             "ms/token": 1000 * totals[name] / (args.rounds * len(prompts) * args.new_tokens),
                             "target calls": calls[name],
                             "depths 0..D": " ".join(map(str, depths[name].tolist())) if name in depths else "",
                             "probes": probes.get(name, ""),
                             "same tokens": same if temperature == 0 else ""})
                print(rows[-1], flush=True)
    print()
    bench.print_table(rows, ["T", "batch", "method", "speedup vs AR", "ms/token", "target calls", "depths 0..D", "probes", "same tokens"])
    bench.write_json("auto_depth", {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
