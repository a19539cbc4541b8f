"""Diffusion-LM decoding on the demo models against static decoding and autoregressive greedy.

demo-code-dllm (masked diffusion) runs dllm_static, dllm_threshold (several thresholds and caches) and
freedave; demo-code-bd (block diffusion) runs block_diffusion (thresholds and caches); demo-code runs
autoregressive greedy. All on the same held-out code prompts (the models never trained on them), batch 1, one
prompt after another, in float32, in one process. Every speedup is a ratio of wall-clock times measured in this
run: against dllm_static (same model) and against autoregressive greedy on the causal demo target.

Quality, per setting: agreement with the model's one-token-per-forward decoding (dllm_static, or
block_diffusion at threshold 1), position by position; and the causal demo target's mean negative
log-likelihood of the completions (nats/token; lower is more plausible code to the target; greedy AR output
scores low by construction).

    python benchmarks/bench_diffusion.py            # full table
    python benchmarks/bench_diffusion.py --quick    # a few settings
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jspec
from jspec import bench


def settings(quick: bool) -> list[tuple[str, str, str, dict]]:
    """(label, model key, strategy, options)."""
    rows = [("autoregressive greedy", "ar", "greedy", {}), ("dllm_static", "dllm", "dllm_static", {})]
    thresholds = (0.9, 0.7) if quick else (0.9, 0.7, 0.5, 0.3)
    rows += [(f"dllm_threshold t={t}", "dllm", "dllm_threshold", {"threshold": t}) for t in thresholds]
    caches = ("dual",) if quick else ("prefix", "dual")
    rows += [(f"dllm_threshold t=0.9 {c} cache", "dllm", "dllm_threshold", {"threshold": 0.9, "cache": c}) for c in caches]
    rows += [("dllm_static dual cache", "dllm", "dllm_static", {"cache": "dual"})]
    drafts = (2, 4) if quick else (2, 4, 8)
    rows += [(f"freedave k={k}", "dllm", "freedave", {"draft_steps": k}) for k in drafts if k <= 4]
    rows += [(f"freedave k={k} dual cache", "dllm", "freedave", {"draft_steps": k, "cache": "dual"}) for k in drafts]
    bd_thresholds = (1.0, 0.9) if quick else (1.0, 0.9, 0.7, 0.5)
    rows += [(f"block_diffusion t={t}", "bd", "block_diffusion", {"threshold": t}) for t in bd_thresholds]
    bd_caches = ("sub_block",) if quick else ("none", "sub_block")
    rows += [(f"block_diffusion t=0.9 {c} cache", "bd", "block_diffusion", {"threshold": 0.9, "cache": c}) for c in bd_caches]
    return rows


def completion_nll(target: jspec.Model, prompt: list[int], completion: list[int]) -> float:
    """Mean negative log-likelihood (nats/token) of `completion` after `prompt` under the causal target."""
    if not completion:
        return float("nan")
    sequence = jnp.asarray([prompt + completion], jnp.int32)
    positions = jnp.arange(sequence.shape[1], dtype=jnp.int32)[None, :]
    logits, _ = target.forward(sequence, positions)
    log_probs = jax.nn.log_softmax(logits[0, len(prompt) - 1 : -1], axis=-1)
    return float(-jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(completion)[:, None], axis=1)))


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> float:
    same = sum(sum(a == b for a, b in zip(o, r)) for o, r in zip(outputs, reference))
    return same / max(sum(len(r) for r in reference), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64, help="a multiple of the masked-diffusion block size")
    parser.add_argument("--block-size", type=int, default=32, help="dllm block size (block_diffusion uses the model's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()

    models = {
        "ar": jspec.load("demo-code", dtype="float32"),
        "dllm": jspec.load("demo-code-dllm", dtype="float32"),
        "bd": jspec.load("demo-code-bd", dtype="float32"),
    }
    prompts = bench.heldout_prompts(models["ar"].tokenizer, args.prompts, args.prompt_tokens)
    target = models["ar"].without_tokenizer()
    print(bench.environment())
    print(f"{len(prompts)} held-out prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens each, batch 1, float32")

    rows, seconds_of, outputs_of = [], {}, {}
    for label, model_key, strategy, options in settings(args.quick):
        model = models[model_key]
        if strategy in ("dllm_static", "dllm_threshold", "freedave"):
            options = {"block_size": args.block_size, **options}
        seconds, compile_seconds, calls, tokens, outputs = 0.0, 0.0, 0, 0, []
        for prompt in prompts:
            call = lambda: jspec.decode(model, [prompt], strategy, max_new_tokens=args.new_tokens, stop_tokens=[], key=0, **options)  # noqa: E731
            timing = bench.time_call(call, args.repeats)
            seconds += timing.median_seconds
            compile_seconds += timing.compile_seconds
            calls += int(timing.result.stats["model_calls"])
            tokens += int(np.sum(timing.result.lengths))
            outputs += timing.result.sequences()
        seconds_of[label], outputs_of[label] = seconds, outputs
        reference = {"dllm": "dllm_static", "bd": "block_diffusion t=1.0", "ar": "autoregressive greedy"}[model_key]
        row = {
            "method": label,
            "model": model_key,
            "tokens/s": tokens / seconds,
            "forwards/token": calls / tokens,
            "vs dllm_static": seconds_of["dllm_static"] / seconds if "dllm_static" in seconds_of else None,
            "vs AR greedy": seconds_of["autoregressive greedy"] / seconds,
            "agreement": agreement(outputs, outputs_of[reference]) if reference in outputs_of else None,
            "target NLL": float(np.mean([completion_nll(target, p, o) for p, o in zip(prompts, outputs)])),
            "compile s": compile_seconds,
        }
        static_label = "dllm_static" if options.get("cache", "none") == "none" else f"dllm_static {options['cache']} cache"
        if strategy == "freedave" and outputs != outputs_of[static_label]:
            raise SystemExit(f"{label}: output differs from dllm_static: FreeDave must be lossless")
        rows.append(row)
        print(row, flush=True)
    print()
    bench.print_table(rows, ["method", "model", "tokens/s", "forwards/token", "vs dllm_static", "vs AR greedy", "agreement", "target NLL", "compile s"])
    path = bench.write_json("diffusion", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
