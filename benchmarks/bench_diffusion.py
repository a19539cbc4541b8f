"""Diffusion-LM decoding on the demo models against static decoding and autoregressive greedy.

demo-code-dllm (masked diffusion) runs dllm_static, dllm_threshold (several thresholds and caches), freedave
and dllm_learn2pd (the shipped Learn2PD filter at several thresholds, with the dual cache, and the oracle filter:
Learn2PD's bound, positions whose prediction is static decoding's token); demo-code-bd (block diffusion) runs
block_diffusion (thresholds and caches) and block_diffusion with Learn2PD on its sub-blocks (demo-code-bd's
shipped filter with the default block cache and the sub-block cache, and the oracle filter of block_diffusion
at threshold 1); demo-code runs autoregressive greedy. All on the same held-out code
prompts (the models never trained on them), batch 1, in float32, in one process. Every program is compiled
first; then each round runs every setting on every prompt, interleaved (A, B, C, A, B, C, ...), so load changes
fall on every setting alike. Every speedup is a ratio of total wall-clock times measured in this run: against
dllm_static (same model) and against autoregressive greedy on the causal demo target.

Per setting: tokens per forward (generated tokens / forwards), forwards per block (mean of the rows'
block_forwards), agreement with the model's one-token-per-forward decoding (dllm_static, or block_diffusion at
threshold 1), position by position; and the causal demo target's mean negative log-likelihood of the
completions (nats/token; lower is more plausible code to the target; greedy AR output scores low by
construction). The "stop at line end" rows decode until the first line break (stop tokens: every token holding
"\n"), with End-of-Text Prediction off and on: the EoTP-on row's agreement is with the EoTP-off row (the
benchmark stops unless they are identical); compare their tokens/forward and forwards/block.

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
from jspec.strategies import learn2pd


def settings(quick: bool) -> list[tuple[str, str, str, dict]]:
    """(label, model key, strategy, options); options {"filter": "oracle"} is the oracle filter of each prompt's
    output under the model's reference setting (`reference_label`), {"stop": "line end"} stops at the first line
    break."""
    rows = [("autoregressive greedy", "ar", "greedy", {}), ("dllm_static", "dllm", "dllm_static", {})]
    thresholds = (0.9, 0.7) if quick else (0.9, 0.7, 0.5, 0.3)
    rows += [(f"dllm_threshold t={t}", "dllm", "dllm_threshold", {"threshold": t}) for t in thresholds]
    caches = ("dual",) if quick else ("prefix", "dual")
    rows += [(f"dllm_threshold t=0.9 {c} cache", "dllm", "dllm_threshold", {"threshold": 0.9, "cache": c}) for c in caches]
    rows += [("dllm_static dual cache", "dllm", "dllm_static", {"cache": "dual"})]
    drafts = (2, 4) if quick else (2, 4, 8)
    rows += [(f"freedave k={k}", "dllm", "freedave", {"draft_steps": k}) for k in drafts if k <= 4]
    rows += [(f"freedave k={k} dual cache", "dllm", "freedave", {"draft_steps": k, "cache": "dual"}) for k in drafts]
    learn2pd_thresholds = (0.99, 0.9) if quick else (0.99, 0.97, 0.9, 0.7)
    rows += [(f"dllm_learn2pd t={t}", "dllm", "dllm_learn2pd", {"threshold": t}) for t in learn2pd_thresholds]
    rows += [("dllm_learn2pd t=0.99 dual cache", "dllm", "dllm_learn2pd", {"threshold": 0.99, "cache": "dual"})]
    rows += [("dllm_learn2pd oracle filter", "dllm", "dllm_learn2pd", {"threshold": 0.5, "filter": "oracle"})]
    rows += [(f"dllm_static stop at line end, EoTP {'on' if on else 'off'}", "dllm", "dllm_static", {"stop": "line end", "end_of_text": on})
             for on in (False, True)]
    bd_thresholds = (1.0, 0.9) if quick else (1.0, 0.9, 0.7, 0.5)
    rows += [(f"block_diffusion t={t}", "bd", "block_diffusion", {"threshold": t}) for t in bd_thresholds]
    bd_caches = ("sub_block",) if quick else ("none", "sub_block")
    rows += [(f"block_diffusion t=0.9 {c} cache", "bd", "block_diffusion", {"threshold": 0.9, "cache": c}) for c in bd_caches]
    learned = {"unmasking": "learn2pd", "threshold": 0.99}
    rows += [("block_diffusion learn2pd t=0.99", "bd", "block_diffusion", learned)]
    rows += [("block_diffusion learn2pd t=0.99 sub_block cache", "bd", "block_diffusion", {**learned, "cache": "sub_block"})]
    rows += [("block_diffusion learn2pd oracle filter", "bd", "block_diffusion", {"unmasking": "learn2pd", "threshold": 0.5, "filter": "oracle"})]
    rows += [(f"block_diffusion t=0.9 stop at line end, EoTP {'on' if on else 'off'}", "bd", "block_diffusion",
              {"threshold": 0.9, "stop": "line end", "end_of_text": on}) for on in (False, True)]
    return rows


def reference_label(label: str, model_key: str) -> str | None:
    """The setting whose outputs a setting's agreement is measured against (None: none)."""
    if label.endswith("EoTP on"):
        return label.replace("EoTP on", "EoTP off")
    if label.endswith("EoTP off"):
        return None
    return {"dllm": "dllm_static", "bd": "block_diffusion t=1.0", "ar": "autoregressive greedy"}[model_key]


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
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every setting on every prompt)")
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

    line_ends = [i for i in range(models["ar"].config.vocab_size) if "\n" in models["ar"].tokenizer.decode([i])]
    static_of: dict[tuple[str, int], list[int]] = {}  # (model key, prompt): the reference setting's output (the oracle's)

    def runner(label: str, model_key: str, strategy: str, options: dict):
        options = dict(options)
        stops = line_ends if options.pop("stop", None) == "line end" else []
        if strategy in ("dllm_static", "dllm_threshold", "freedave", "dllm_learn2pd"):
            options = {"block_size": args.block_size, **options}
        oracle, records_reference = options.get("filter") == "oracle", label == reference_label(label, model_key)

        filters = {}  # prompt index -> the oracle filter (built once, outside the timed calls after the warm-up)

        def run(index: int):
            if oracle:  # the reference setting ran on this prompt before (an earlier runner, in the warm-up)
                if index not in filters:
                    filters[index] = learn2pd.OracleFilter(reference=jnp.asarray([static_of[model_key, index]], jnp.int32))
                options["filter"] = filters[index]
            result = jspec.decode(models[model_key], [prompts[index]], strategy, max_new_tokens=args.new_tokens,
                                  stop_tokens=stops, key=0, **options)
            if records_reference and (model_key, index) not in static_of:  # once, in the warm-up
                static_of[model_key, index] = result.sequences()[0]
            return result

        return run

    chosen = settings(args.quick)
    indices = list(range(len(prompts)))
    timed = bench.time_groups_interleaved(  # every program compiled on every prompt first, then A, B, C, A, B, C, ...
        {label: runner(label, *setting) for label, *setting in chosen}, indices, args.repeats, warm_groups=len(indices))
    totals = {}
    for label, runs in timed.items():
        block_forwards = []
        for result in runs.results:  # diffusion decoders: forwards per block of the row
            if "block_forwards" in result.stats:
                forwards = np.asarray(result.stats["block_forwards"])[0]
                block_forwards += forwards[forwards > 0].tolist()
        totals[label] = dict(seconds=runs.seconds, compile_seconds=runs.compile_seconds, block_forwards=block_forwards,
                             calls=sum(int(result.stats["model_calls"]) for result in runs.results),
                             tokens=sum(int(np.sum(result.lengths)) for result in runs.results),
                             outputs=[result.sequences()[0] for result in runs.results])

    rows = []
    seconds = {label: totals[label]["seconds"] for label in totals}
    for label, model_key, strategy, options in chosen:
        total, reference = totals[label], reference_label(label, model_key)
        outputs = total["outputs"]
        whole = "stop" not in options  # the rows that stop at a line end emit other tokens: no speed ratios
        row = {
            "method": label,
            "model": model_key,
            "tokens/s": total["tokens"] * args.repeats / total["seconds"],
            "tokens/forward": total["tokens"] / total["calls"],
            "forwards/block": float(np.mean(total["block_forwards"])) if total["block_forwards"] else None,
            "vs dllm_static": seconds["dllm_static"] / total["seconds"] if whole else None,
            "vs AR greedy": seconds["autoregressive greedy"] / total["seconds"] if whole else None,
            "agreement": agreement(outputs, totals[reference]["outputs"]) if reference else None,
            "target NLL": float(np.mean([completion_nll(target, p, o) for p, o in zip(prompts, outputs)])),
            "compile s": total["compile_seconds"],
        }
        static_label = "dllm_static" if options.get("cache", "none") == "none" else f"dllm_static {options['cache']} cache"
        if strategy == "freedave" and outputs != totals[static_label]["outputs"]:
            raise SystemExit(f"{label}: output differs from dllm_static: FreeDave must be lossless")
        if label.endswith("EoTP on") and outputs != totals[reference]["outputs"]:
            raise SystemExit(f"{label}: output differs from {reference}: End-of-Text Prediction must be lossless")
        rows.append(row)
        print(row, flush=True)
    print()
    columns = ["method", "model", "tokens/s", "tokens/forward", "forwards/block", "vs dllm_static", "vs AR greedy", "agreement", "target NLL", "compile s"]
    bench.print_table(rows, columns)
    path = bench.write_json("diffusion", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
