"""Greedy decoding speed of jspec against Hugging Face transformers on the same weights and prompts (CPU, batch 1).

jspec: `jspec.decode` (one compiled loop per call; compile time reported apart). transformers:
`generate(do_sample=False)` on the same weights, exported with `save_hf` and loaded with `from_pretrained`
(float32, torch using every available core unless --torch-threads says otherwise). Both are timed in the same run, interleaved (jspec, transformers, jspec, ...:
`--repeats` rounds after a warm-up run; the speedup is the ratio of totals), on the same prompts, and must emit the same tokens: a mismatch is reported with the step where
the two first differ and both models' logits for the two candidate tokens there (float32 rounding can flip a
near-tie after a long generation), and the run goes on.

    python benchmarks/bench_vs_transformers.py --random-preset random-25m
    python benchmarks/bench_vs_transformers.py --model path/to/hf_model_dir
    python benchmarks/bench_vs_transformers.py            # --model demo-code, once it exists

On a shared machine whose cores are oversubscribed, torch's OpenMP threads spin-wait and multi-threaded torch
can be several times slower than one thread; set OMP_WAIT_POLICY=PASSIVE (before the run) or --torch-threads 1
and say which in the figures you report (the JSON records both settings).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jspec
from jspec import bench
from jspec.checkpoint.hf import save_hf
from jspec.loading import model_config


def jspec_model(args, directory: Path) -> tuple[jspec.Model, Path]:
    """The model in float32, and an HF directory (written by `save_hf`) holding the same weights."""
    if args.random_preset:
        config = model_config(args.random_preset).replace(dtype="float32")
        model = jspec.Model.random(config, jax.random.key(args.seed))
    else:
        try:
            model = jspec.load(args.model, dtype="float32")
        except ValueError as error:
            raise SystemExit(f"--model {args.model!r}: {error}\n(use --random-preset random-25m for a random model)") from None
    return model, save_hf(model, directory / "model")


def hf_generate(hf_model, torch, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                pad_token_id=0)
    return out[0, len(prompt):].tolist()


def explain_mismatch(model, hf_model, torch, prompt, ours, theirs) -> dict:
    step = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    prefix = list(prompt) + ours[:step]
    tokens = jnp.asarray([prefix], jnp.int32)
    logits = np.asarray(model.forward(tokens, jnp.arange(len(prefix))[None])[0][0, -1])
    with torch.inference_mode():
        hf_logits = hf_model(torch.tensor([prefix])).logits[0, -1].float().numpy()
    a, b = ours[step], theirs[step]
    return {"step": step, "jspec_token": a, "hf_token": b,
            "jspec_logits": [float(logits[a]), float(logits[b])], "hf_logits": [float(hf_logits[a]), float(hf_logits[b])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-code", help="HF model directory or a name jspec.load knows")
    parser.add_argument("--random-preset", help="instead of --model: a random-weight model from configs/models (e.g. random-25m)")
    parser.add_argument("--prompts", type=int, default=3, help="number of prompts (each decoded alone, batch 1)")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, help="default: every core this process may use")
    args = parser.parse_args()

    import torch
    import transformers

    threads = args.torch_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch:
        model, hf_path = jspec_model(args, Path(scratch))
        model = model.without_tokenizer()
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
    hf_model.generation_config.eos_token_id = None  # both decode exactly --new-tokens tokens
    name = args.random_preset and f"random:{args.random_preset}" or args.model
    environment = {**bench.environment(), "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": threads,
                   "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"), "load_average": os.getloadavg()}
    print(f"model {name}: {model.num_parameters() / 1e6:.1f}M parameters, float32; {environment}")

    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, model.config.vocab_size, args.prompt_length).tolist() for _ in range(args.prompts)]

    def run_jspec():
        return [jspec.decode(model, [p], max_new_tokens=args.new_tokens, stop_tokens=[]).sequences()[0] for p in prompts]

    def run_hf():
        return [hf_generate(hf_model, torch, p, args.new_tokens) for p in prompts]

    timings = bench.time_interleaved({"jspec": run_jspec, "transformers": run_hf}, args.repeats)  # ratio of totals
    ours, theirs = timings["jspec"], timings["transformers"]

    mismatches = [
        {"prompt": i, **explain_mismatch(model, hf_model, torch, p, a, b)}
        for i, (p, a, b) in enumerate(zip(prompts, ours.result, theirs.result)) if a != b
    ]
    tokens = args.prompts * args.new_tokens
    rows = []
    for method, timing in (("transformers generate", theirs), ("jspec.decode greedy", ours)):
        rows.append({
            "method": method,
            "tokens/s": tokens / timing.median_seconds,
            "ms/token": 1000 * timing.median_seconds / tokens,
            "median s": timing.median_seconds,
            "compile s": timing.compile_seconds,
            "speedup vs transformers": theirs.total_seconds / timing.total_seconds,
        })
    print(f"{args.prompts} prompts x {args.prompt_length} tokens, {args.new_tokens} new tokens each, batch 1, "
          f"median of {args.repeats} runs, interleaved; speedup: ratio of totals")
    bench.print_table(rows, ["method", "tokens/s", "ms/token", "median s", "compile s", "speedup vs transformers"])
    if mismatches:
        print(f"TOKEN MISMATCH in {len(mismatches)} of {args.prompts} prompts (float32 differences can flip a near-tie):")
        for m in mismatches:
            print(f"  prompt {m['prompt']}: first differs at step {m['step']}: jspec {m['jspec_token']} vs transformers "
                  f"{m['hf_token']}; logits of (jspec's, transformers') token: jspec {m['jspec_logits']}, transformers {m['hf_logits']}")
    else:
        print(f"tokens identical: all {args.prompts} prompts, {args.new_tokens} tokens each")
    path = bench.write_json("vs_transformers", {
        "args": vars(args), "model": name, "parameters": model.num_parameters(), "environment_extra": environment,
        "rows": rows, "tokens_identical": not mismatches, "mismatches": mismatches,
        "runs_seconds": {"jspec": ours.runs, "transformers": theirs.runs},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
