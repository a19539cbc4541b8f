"""Speculative decoding on the demo pair against jspec autoregressive decoding and transformers, interleaved in one run.

Prompts are code from held-out standard-library files (the demo models never trained on them). For each temperature
and batch size every setting decodes the same prompt group in turn (autoregressive, chain k=2, ..., then the next
prompt and the next round: A, B, C, A, B, C, ...), each program compiled before the timed rounds; a speedup is the
ratio of total times against autoregressive decoding in the same rounds. At batch 1, greedy, transformers' generate,
assisted generation (`assistant_model`) and prompt-lookup decoding on the same weights (the demo directories are
Hugging Face checkpoints) run in the same rounds.

Beside the measured speedup every jspec row prints:
- predicted: the speedup its measured counts and per-call costs imply,
      (AR target calls x t_target(1)) / (target calls x t_target(width) + draft calls x t_draft),
  counts per token from this run's decodes (auto depth: each step at its depth's width, from its depth histogram;
  the prefill at t_target(1), as for AR), t_target(w) a jitted target forward of w tokens per row and t_draft the
  mean cost of the drafter's calls (a draft-model or layer-skipped forward of each level's width; 0 for prompt
  lookup), all timed alone in this run at the same batch size (default causal mask);
- measured/predicted: how much of the prediction the decode loop delivers (the rest goes to what the forwards above
  leave out: the acceptance walk, cache compaction, drafting without a network, the loop itself);
- memory-bound: the same counts when a verification costs one forward and a draft call its parameter bytes' share
  of the target's (the regime of an accelerator whose forward is bound by reading the weights):
      AR target calls / (target calls + draft calls x draft bytes / target bytes).
At batch 8 a call serves every row, so calls per token follow the slowest row. Greedy outputs are checked token for
token against autoregressive decoding (the benchmark stops if one differs).

    python benchmarks/bench_speculative.py                 # full table
    python benchmarks/bench_speculative.py --quick         # fewer settings, for a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

import jspec
from jspec import bench
from jspec.bench import heldout_prompts
from jspec.loading import ASSETS_DIR
from jspec.strategies.drafters import DraftModelDrafter, LayerSkipDrafter
from jspec.validation import ArgumentError


def strategies(draft, skip_layers, quick: bool, temperature: float, auto_depth: bool) -> list[tuple[str, str, dict]]:
    chains = (2, 4) if quick else (2, 3, 4, 6, 8)
    out = [("autoregressive", "greedy", {})]
    out += [(f"chain k={k}", "speculative", dict(draft=draft, num_draft_tokens=k)) for k in chains]
    out += [("chain k=6 adaptive", "speculative", dict(draft=draft, num_draft_tokens=6, adaptive=True))]
    if auto_depth:
        out += [("chain auto", "speculative", dict(draft=draft, num_draft_tokens="auto"))]
    trees = ((2, 2, 1, 1),) if quick else ((2, 2, 1, 1), (3, 2, 1, 1, 1), (4, 2, 2, 1))
    out += [(f"tree {','.join(map(str, t))}", "speculative", dict(draft=draft, tree=t)) for t in trees]
    out += [("prompt lookup k=10", "prompt_lookup", dict(num_draft_tokens=10))]
    if temperature == 0:
        out += [("prompt lookup k=4", "prompt_lookup", dict(num_draft_tokens=4))]
    out += [(f"self-spec skip {','.join(map(str, skip_layers))} k=3", "self_speculative", dict(skip_layers=skip_layers, num_draft_tokens=3))]
    return out


def accepts_auto_depth(target, draft) -> bool:
    """Whether this jspec's speculative strategy takes num_draft_tokens="auto" (depth chosen per step): a 2-token
    decode with it succeeds."""
    try:
        jspec.decode(target, [[1, 2, 3]], "speculative", draft=draft, num_draft_tokens="auto", max_new_tokens=2)
    except (ArgumentError, TypeError, ValueError):  # an older jspec refuses the option
        return False
    return True


def parameter_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class CallCosts:
    """What one setting's calls cost: the verification width, the draft forwards of one full step (width of each
    call), the network that drafts (None: no network) and its parameter bytes as a share of the target's."""

    verify_width: int
    draft_widths: tuple[int, ...] = ()
    depth_widths: tuple[int, ...] = ()  # auto depth: the verification width of a step at each depth 0..D
    draft_network: Any = None
    skip_layers: tuple[int, ...] = ()
    draft_bytes_share: float = 0.0


def call_costs(target, strategy: str, options: dict) -> CallCosts:
    """The calls one step of a jspec setting makes: a draft model's root forward covers the last committed token and
    the pending one (2 tokens), a layer-skipped target's the pending one; then one forward per template level but the
    last, of that level's width."""
    if strategy == "greedy":
        return CallCosts(verify_width=1)
    resolved = jspec.strategies.resolve_strategy(strategy, options)
    template, drafter = resolved.template, resolved.drafter
    level_widths = tuple(end - start for start, end in template.levels[:-1])
    depths = tuple(nodes + 1 for nodes in resolved.verified_nodes()) if getattr(resolved, "auto", False) else ()
    if isinstance(drafter, DraftModelDrafter):
        share = parameter_bytes(drafter.draft.params) / parameter_bytes(target.params)
        return CallCosts(resolved.chunk_width, (2, *level_widths), depths, drafter.draft.without_tokenizer(), (), share)
    if isinstance(drafter, LayerSkipDrafter):
        layers = parameter_bytes(target.params["groups"]) / target.config.num_layers  # one layer's bytes
        share = 1 - len(drafter.skip_layers) * layers / parameter_bytes(target.params)
        return CallCosts(resolved.chunk_width, (1, *level_widths), depths, target.without_tokenizer(), drafter.skip_layers,
                         share)
    return CallCosts(verify_width=resolved.chunk_width, depth_widths=depths)  # prompt lookup: no network


class PerCallTimer:
    """Per-call milliseconds of jitted forwards (`bench.forward_call`): every forward the rows need is registered
    first, then all are timed together, interleaved (A, B, C, A, B, C, ...), and each gets the median of its calls."""

    def __init__(self, prompt_tokens: int, rounds: int = 20):
        self.prompt_tokens, self.rounds, self.calls, self.ms = prompt_tokens, rounds, {}, {}

    def forward(self, network, name: str, batch: int, width: int, skip_layers: tuple[int, ...] = ()) -> tuple:
        """Register a forward (`name`: which network) and return its key into `ms`."""
        key = (name, batch, width, skip_layers)
        if key not in self.calls:
            options = {"skip_layers": skip_layers} if skip_layers else {}
            self.calls[key] = bench.forward_call(network, batch, self.prompt_tokens, width, **options)
        return key

    def draft_call(self, costs: CallCosts, batch: int) -> list[tuple]:
        """Keys of the drafter's calls over one full step; their mean is the cost of one draft call."""
        if costs.draft_network is None:
            return []
        name = "target" if costs.skip_layers else "draft"
        return [self.forward(costs.draft_network, name, batch, w, costs.skip_layers) for w in costs.draft_widths]

    def measure(self) -> None:
        timings = bench.time_interleaved(self.calls, self.rounds)
        self.ms = {key: 1000 * timing.median_seconds for key, timing in timings.items()}

    def mean_ms(self, keys: list[tuple]) -> float:
        return float(np.mean([self.ms[key] for key in keys])) if keys else 0.0

    def table(self) -> dict[str, float]:
        return {f"{name} b={b} w={w}" + (f" skip {','.join(map(str, s))}" if s else ""): v
                for (name, b, w, s), v in sorted(self.ms.items())}


@dataclasses.dataclass
class Totals:
    """A runner's summed results over the groups (one round) and its mean time per round."""

    seconds: float = 0.0  # per round
    compile_seconds: float = 0.0
    calls: int = 0
    draft_calls: int = 0
    tokens: int = 0
    outputs: list = dataclasses.field(default_factory=list)
    accepted_by_depth: np.ndarray | None = None
    tried_by_depth: np.ndarray | None = None
    depth_histogram: np.ndarray | None = None  # auto depth: steps taken at each depth

    @classmethod
    def of(cls, runs: bench.InterleavedRuns, rounds: int) -> "Totals":
        totals = cls(seconds=runs.seconds / rounds, compile_seconds=runs.compile_seconds)
        for out in runs.results:
            totals.calls += out.get("calls", 0)
            totals.draft_calls += out.get("draft_calls", 0)
            totals.tokens += out["tokens"]
            totals.outputs += out["outputs"]
            if out.get("accepted_by_depth") is not None:
                accepted, tried = out["accepted_by_depth"], out["tried_by_depth"]
                totals.accepted_by_depth = accepted if totals.accepted_by_depth is None else totals.accepted_by_depth + accepted
                totals.tried_by_depth = tried if totals.tried_by_depth is None else totals.tried_by_depth + tried
            if out.get("depth_histogram") is not None:
                steps = out["depth_histogram"]
                totals.depth_histogram = steps if totals.depth_histogram is None else totals.depth_histogram + steps
        return totals

    def acceptance_by_depth(self) -> list[float] | None:
        if self.tried_by_depth is None:
            return None
        return (self.accepted_by_depth / np.maximum(self.tried_by_depth, 1)).tolist()


def jspec_runner(target, strategy, options, new_tokens, temperature) -> Callable[[list[list[int]]], dict]:
    if strategy == "greedy" and temperature > 0:
        strategy = "sample"
    sampling = {} if temperature == 0 and strategy == "greedy" else {"temperature": temperature}

    def run(group):
        out = jspec.decode(target, group, strategy, max_new_tokens=new_tokens, stop_tokens=[], key=0, **options, **sampling)
        jax.block_until_ready(out.tokens)
        stats = out.stats
        result = {"calls": int(np.max(stats["model_calls"])), "draft_calls": int(np.max(stats.get("draft_calls", 0))),
                  "tokens": int(np.sum(out.lengths)), "outputs": out.sequences()}
        if "accepted_by_depth" in stats:
            result["accepted_by_depth"] = np.asarray(stats["accepted_by_depth"], np.int64)
            result["tried_by_depth"] = np.asarray(stats["tried_by_depth"], np.int64)
        if "depth_histogram" in stats:
            result["depth_histogram"] = np.asarray(stats["depth_histogram"], np.int64)
        return result

    return run


def transformers_runners(new_tokens) -> dict[str, Callable[[list[list[int]]], dict]]:
    """transformers generate / assisted generation / prompt lookup on the exported demo weights, batch 1, greedy."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers/torch not installed: skipping the transformers comparison")
        return {}
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "demo-code", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "demo-code-draft", dtype=torch.float32).eval()
    settings = {
        "transformers generate": {},
        "transformers assisted (draft)": {"assistant_model": draft},
        "transformers prompt lookup k=10": {"prompt_lookup_num_tokens": 10},
    }

    def runner(extra):
        def run(group):
            outputs = []
            with torch.no_grad():
                for prompt in group:
                    out = target.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False, pad_token_id=0, **extra)
                    outputs.append(out[0, len(prompt):].tolist())
            return {"tokens": sum(map(len, outputs)), "outputs": outputs}
        return run

    return {name: runner(extra) for name, extra in settings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="demo-code")
    parser.add_argument("--draft", default="demo-code-draft")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (batch 8 uses all, batch 1 runs them one by one)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds over the prompts")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    if max(args.batch_sizes) > args.prompts:
        parser.error(f"--batch-sizes: batch {max(args.batch_sizes)} needs at least that many --prompts, got {args.prompts}")

    target, draft = jspec.load(args.target), jspec.load(args.draft)
    plain = target.without_tokenizer()
    prompts = heldout_prompts(target.tokenizer, args.prompts, args.prompt_tokens)
    from jspec.strategies.calibration import calibrate_skip_layers

    calibration_text = np.asarray(heldout_prompts(target.tokenizer, args.prompts + 8, args.prompt_tokens)[args.prompts :])
    skip_layers, agreement = calibrate_skip_layers(plain, calibration_text, max(1, target.config.num_layers // 3))
    print(f"{bench.environment()}\ntarget {target.num_parameters() / 1e6:.2f}M, draft {draft.num_parameters() / 1e6:.2f}M parameters; "
          f"self-speculative skips layers {skip_layers} (top-1 agreement {agreement:.2f} on other held-out text)")

    auto_depth = accepts_auto_depth(target, draft)
    timer, measured = PerCallTimer(args.prompt_tokens), []
    for temperature in args.temperatures:
        for batch in args.batch_sizes:
            groups = [prompts[:batch]] if batch > 1 else [[p] for p in prompts]
            settings = strategies(draft, skip_layers, args.quick, temperature, auto_depth)
            runners = {name: jspec_runner(target, strategy, options, args.new_tokens, temperature)
                       for name, strategy, options in settings}
            if temperature == 0 and batch == 1 and not args.no_transformers:
                runners.update(transformers_runners(args.new_tokens))
            timed = bench.time_groups_interleaved(runners, groups, args.repeats)  # A, B, C, A, B, C, ... per group
            totals = {name: Totals.of(runs, args.repeats) for name, runs in timed.items()}
            for name, strategy, options in settings:
                if temperature == 0 and totals[name].outputs != totals["autoregressive"].outputs:
                    raise SystemExit(f"{name}: greedy output differs from autoregressive: the benchmark is invalid")
            measured.append((temperature, batch, settings, totals))
            print(f"T={temperature} batch {batch}: decoded", flush=True)

    costs_of = {}  # (T, batch, setting) -> its calls, the key of its verification forward, the keys of its draft calls
    for temperature, batch, settings, _ in measured:  # register every forward, then time them all together
        for name, strategy, options in settings:
            costs = call_costs(target, strategy, options)
            costs_of[temperature, batch, name] = (
                costs, timer.forward(plain, "target", batch, costs.verify_width), timer.draft_call(costs, batch),
                [timer.forward(plain, "target", batch, width) for width in costs.depth_widths])
    timer.measure()
    rows = []
    for temperature, batch, settings, totals in measured:
        base = totals["autoregressive"]
        t_ar = timer.ms[timer.forward(plain, "target", batch, 1)]
        ar_calls_per_token = base.calls / base.tokens
        for name, total in totals.items():
            row = {
                "T": temperature, "batch": batch, "method": name if name.startswith("transformers") else f"jspec {name}",
                "tokens/s": total.tokens / total.seconds,
                "speedup (measured)": base.seconds / total.seconds,
                "compile s": total.compile_seconds,
            }
            if (temperature, batch, name) in costs_of:
                costs, verify_key, draft_keys, depth_keys = costs_of[temperature, batch, name]
                calls_per_token, draft_calls_per_token = total.calls / total.tokens, total.draft_calls / total.tokens
                if depth_keys and total.depth_histogram is not None:  # auto depth: each step at its own width
                    steps = total.depth_histogram
                    at_depths = sum(n * timer.ms[key] for n, key in zip(steps, depth_keys))
                    target_ms = (total.calls - steps.sum()) * t_ar + at_depths  # the prefills at one token's cost
                else:
                    target_ms = total.calls * timer.ms[verify_key]
                cost_per_token = target_ms / total.tokens + draft_calls_per_token * timer.mean_ms(draft_keys)
                predicted = ar_calls_per_token * t_ar / cost_per_token
                row.update({
                    "target calls/token": calls_per_token * batch,
                    "draft calls/token": draft_calls_per_token * batch,
                    "predicted": predicted,
                    "measured/predicted": row["speedup (measured)"] / predicted,
                    "memory-bound": ar_calls_per_token / (calls_per_token + draft_calls_per_token * costs.draft_bytes_share),
                    "verify width": costs.verify_width,
                    "acceptance by depth": total.acceptance_by_depth(),
                })
            else:
                same = sum(a == b for a, b in zip(total.outputs, base.outputs))
                row["same tokens as jspec"] = f"{same}/{len(base.outputs)}"
            rows.append(row)

    print(f"\nper-call ms, jitted forwards timed interleaved (median of {timer.rounds}):", {k: round(v, 3) for k, v in timer.table().items()})
    print()
    bench.print_table(rows, ["T", "batch", "method", "tokens/s", "target calls/token", "draft calls/token", "speedup (measured)",
                             "predicted", "measured/predicted", "memory-bound", "compile s", "same tokens as jspec"])
    payload = {"args": vars(args), "skip_layers": list(skip_layers), "rows": rows, "per_call_ms": timer.table()}
    print(f"wrote {bench.write_json('speculative', payload)}")


if __name__ == "__main__":
    main()
