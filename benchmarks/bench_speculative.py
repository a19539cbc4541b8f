"""Speculative decoding on the demo pair against jspec autoregressive decoding and transformers.

Prompts are code from held-out standard-library files (the demo models never trained on them). Every
speedup is a ratio against jspec autoregressive decoding measured in the same run, on the same weights and
prompts; transformers' assisted generation (`assistant_model`) and prompt-lookup decoding run on the same
weights (the demo directories are Hugging Face checkpoints) at batch 1, greedy.

    python benchmarks/bench_speculative.py                 # full table
    python benchmarks/bench_speculative.py --quick         # fewer settings, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jspec
from jspec import bench
from jspec.bench import heldout_prompts
from jspec.loading import ASSETS_DIR


def strategies(draft, skip_layers, quick: bool):
    chains = (2, 4) if quick else (2, 3, 4, 6, 8)
    out = [("autoregressive", "greedy", {})]
    out += [(f"chain k={k}", "speculative", dict(draft=draft, num_draft_tokens=k)) for k in chains]
    out += [("chain k=6 adaptive", "speculative", dict(draft=draft, num_draft_tokens=6, adaptive=True))]
    trees = ((2, 2, 1, 1),) if quick else ((2, 2, 1, 1), (3, 2, 1, 1, 1), (4, 2, 2, 1))
    out += [(f"tree {','.join(map(str, t))}", "speculative", dict(draft=draft, tree=t)) for t in trees]
    out += [("prompt lookup k=10", "prompt_lookup", dict(num_draft_tokens=10))]
    out += [("prompt lookup k=4", "prompt_lookup", dict(num_draft_tokens=4))]
    out += [(f"self-spec skip {','.join(map(str, skip_layers))} k=3", "self_speculative", dict(skip_layers=skip_layers, num_draft_tokens=3))]
    return out


def time_jspec(target, prompts, strategy, options, new_tokens, temperature, repeats):
    sampling = {} if strategy == "greedy" else {"temperature": temperature}
    if strategy == "greedy" and temperature > 0:
        strategy, sampling = "sample", {"temperature": temperature}
    call = lambda: jspec.decode(target, prompts, strategy, max_new_tokens=new_tokens, stop_tokens=[], key=0, **options, **sampling)  # noqa: E731
    timing = bench.time_call(call, repeats)
    return timing, timing.result


def per_call_breakdown(target, draft, prompt_len: int, width: int, repeats: int = 20) -> dict[str, float]:
    """Milliseconds per jitted forward call at batch 1: target 1 token, target verify (width), draft 1 token."""
    forward_ms = lambda model, chunk: bench.forward_ms(model, 1, prompt_len, chunk, repeats)  # noqa: E731

    return {
        "target 1 token (ms)": forward_ms(target, 1),
        f"target verify {width} tokens (ms)": forward_ms(target, width),
        "draft 1 token (ms)": forward_ms(draft, 1),
    }


def transformers_rows(prompts, new_tokens, repeats):
    """transformers generate / assisted generation / prompt lookup on the exported demo weights, batch 1."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers/torch not installed: skipping the transformers comparison")
        return []
    torch.manual_seed(0)
    target = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "demo-code", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / "demo-code-draft", dtype=torch.float32).eval()
    settings = {
        "transformers generate": {},
        "transformers assisted (draft)": {"assistant_model": draft},
        "transformers prompt lookup k=10": {"prompt_lookup_num_tokens": 10},
    }
    results = []
    for name, extra in settings.items():
        outputs = []

        def run():
            outputs.clear()
            with torch.no_grad():
                for prompt in prompts:
                    ids = torch.tensor([prompt])
                    out = target.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
                    outputs.append(out[0, len(prompt) :].tolist())
            return 0

        timing = bench.time_call(run, repeats)
        results.append((name, timing, [list(o) for o in outputs]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="demo-code")
    parser.add_argument("--draft", default="demo-code-draft")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (batch 8 uses all, batch 1 runs them one by one)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    target, draft = jspec.load(args.target), jspec.load(args.draft)
    prompts = heldout_prompts(target.tokenizer, args.prompts, args.prompt_tokens)
    from jspec.strategies.calibration import calibrate_skip_layers

    calibration_text = np.asarray(heldout_prompts(target.tokenizer, args.prompts + 8, args.prompt_tokens)[args.prompts :])
    skip_layers, agreement = calibrate_skip_layers(target.without_tokenizer(), calibration_text, max(1, target.config.num_layers // 3))
    print(f"{bench.environment()}\ntarget {target.num_parameters() / 1e6:.2f}M, draft {draft.num_parameters() / 1e6:.2f}M parameters; "
          f"self-speculative skips layers {skip_layers} (top-1 agreement {agreement:.2f} on other held-out text)")

    rows, greedy_batch1 = [], None
    for temperature in args.temperatures:
        for batch in args.batch_sizes:
            batch_prompts = [prompts[:batch]] if batch > 1 else [[p] for p in prompts]
            baseline = None
            for name, strategy, options in strategies(draft, skip_layers, args.quick):
                if temperature > 0 and strategy == "prompt_lookup" and name.endswith("k=4"):
                    continue
                seconds, compile_seconds, calls, tokens, outputs = 0.0, 0.0, 0, 0, []
                for group in batch_prompts:
                    timing, out = time_jspec(target, group, strategy, options, args.new_tokens, temperature, args.repeats)
                    seconds += timing.median_seconds
                    compile_seconds += timing.compile_seconds
                    calls += out.stats["model_calls"]
                    tokens += int(np.sum(out.lengths))
                    outputs += out.sequences()
                if baseline is None:
                    baseline = seconds
                    reference_outputs = outputs
                if temperature == 0 and outputs != reference_outputs:
                    raise SystemExit(f"{name}: greedy output differs from autoregressive: the benchmark is invalid")
                row = {
                    "T": temperature,
                    "batch": batch,
                    "method": f"jspec {name}",
                    "tokens/s": tokens / seconds,
                    "target calls/token": calls * (batch if batch > 1 else 1) / tokens,
                    "speedup vs jspec AR": baseline / seconds,
                    "compile s": compile_seconds,
                }
                rows.append(row)
                print(row, flush=True)
            if temperature == 0 and batch == 1:
                greedy_batch1 = (baseline, reference_outputs)

    if greedy_batch1 is not None and not args.no_transformers:
        baseline, reference_outputs = greedy_batch1
        for name, timing, outputs in transformers_rows(prompts, args.new_tokens, args.repeats):
            agree = sum(a == b for a, b in zip(outputs, reference_outputs))
            rows.append({
                "T": 0.0,
                "batch": 1,
                "method": name,
                "tokens/s": len(prompts) * args.new_tokens / timing.median_seconds,
                "speedup vs jspec AR": baseline / timing.median_seconds,
                "same tokens as jspec": f"{agree}/{len(prompts)}",
            })
            print(rows[-1], flush=True)

    breakdown = per_call_breakdown(target.without_tokenizer(), draft.without_tokenizer(), args.prompt_tokens, 5)
    print("\nper-call time at batch 1 (median of 20):", {k: round(v, 3) for k, v in breakdown.items()})
    print()
    bench.print_table(rows, ["T", "batch", "method", "tokens/s", "target calls/token", "speedup vs jspec AR", "compile s", "same tokens as jspec"])
    path = bench.write_json("speculative", {"args": vars(args), "skip_layers": list(skip_layers), "rows": rows, "per_call_ms": breakdown})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
