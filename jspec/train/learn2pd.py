"""Train a Learn2PD unmasking filter (arXiv 2509.25188) for a masked-diffusion model, post hoc.

1. Trajectories: static decoding (`dllm_static`, no context cache, no stop tokens) of prompts cut from the
   TRAINING split of the demo corpus (file beginnings, as `jspec.bench.heldout_prompts` cuts the held-out files
   the benchmarks and tests use), batched, in one compiled `lax.scan` over the decoder's own `step`. Each step
   records the current block before the step, and the fresh predictions and confidences of its forward.
2. Examples: every masked position of a step's block (steps with at least two masked positions: with one, the
   rule unmasks it anyway): `filter_features` as the rule computes them; label 1 when the prediction equals
   static decoding's final token there (Learn2PD's "extremely greedy parallel" oracle, which the filter learns).
3. The per-position MLP (`jspec.strategies.learn2pd`) trained with optax (Adam, binary cross-entropy, full
   batch), written as a safetensors file with its metadata (data, figures).

    python -m jspec.train.learn2pd --model demo-code-dllm --out jspec/assets/demo-code-dllm/learn2pd_filter.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jspec
from jspec.strategies import learn2pd
from jspec.strategies.diffusion import LEARN2PD_THRESHOLD, MaskedDiffusion, dllm_static

decode_module = importlib.import_module("jspec.decode")


def training_prompts(tokenizer: Any, count: int, prompt_tokens: int, min_continuation: int = 64) -> list[list[int]]:
    """The first `prompt_tokens` tokens of `count` training-split files of the demo corpus (never the held-out
    files), spread evenly over the split; files shorter than prompt + min_continuation are skipped."""
    from jspec.loading import ASSETS_DIR
    from jspec.train import corpus

    manifest = corpus.load_manifest(ASSETS_DIR / "demo-code" / "corpus_manifest.json")
    texts = corpus.load_documents(manifest, "train", root=corpus.stdlib_root())
    long_enough = [ids for ids in map(tokenizer.encode, texts[:: max(1, len(texts) // (4 * count))]) if len(ids) >= prompt_tokens + min_continuation]
    stride = max(1, len(long_enough) // count)
    return [ids[:prompt_tokens] for ids in long_enough[::stride][:count]]


@partial(jax.jit, static_argnames=("steps",))
def static_trajectory(model: Any, strategy: MaskedDiffusion, prompts: Any, key: jax.Array, steps: int) -> dict[str, jax.Array]:
    """Run `steps` steps of `strategy` (one compiled scan); per step the block before it and its forward's
    predictions, and the final output."""
    bs = strategy.block_size

    def body(state, _):
        block_slots = (state.gen_start + state.block * bs)[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]
        block = jnp.take_along_axis(state.canvas, jnp.minimum(block_slots, state.canvas.shape[1] - 1), axis=1)
        after = strategy.step(model, state)
        record = {
            "masked": block == state.mask_token_id,  # [B, bs]
            "block": state.block,  # [B]
            "predicted": after.predicted[:, :bs],  # the step's forward (the kept predictions of its state)
            "confidence": after.confidence[:, :bs],
        }
        return after, record

    final, records = jax.lax.scan(body, strategy.init(model, prompts, key), None, length=steps)
    return {**records, "output": final.output.tokens}


def trajectory_examples(model: jspec.Model, prompts: list[list[int]], new_tokens: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Features [E, F] and labels [E] of every masked position of every static step with >= 2 masked."""
    strategy = dllm_static(block_size=block_size, end_of_text=False)
    request = decode_module.build_prompts(model, prompts, new_tokens, None, [], None, strategy)
    strategy.validate(model, request)
    trace = jax.device_get(static_trajectory(model.without_tokenizer(), strategy, request, jax.random.key(0), new_tokens))
    masked = trace["masked"]  # [steps, B, bs]
    positions = trace["block"][:, :, None] * block_size + np.arange(block_size)[None, None, :]  # [steps, B, bs]
    final = np.take_along_axis(np.broadcast_to(trace["output"][None], (new_tokens,) + trace["output"].shape), positions, axis=2)
    labels = trace["predicted"] == final
    features = np.asarray(learn2pd.filter_features(jnp.asarray(trace["confidence"]), jnp.asarray(masked)))
    keep = masked & (masked.sum(axis=2, keepdims=True) >= 2) & (np.arange(len(prompts))[None, :, None] < len(prompts))
    return features[keep], labels[keep].astype(np.float32)


def train_filter(features: np.ndarray, labels: np.ndarray, steps: int = 2000, seed: int = 0, learning_rate: float = 3e-3) -> tuple[dict, list[float]]:
    """Fit the filter MLP with Adam on binary cross-entropy (full batch); the params and the loss curve."""
    params = learn2pd.init_mlp(jax.random.key(seed))
    optimizer = optax.adam(learning_rate)
    x, y = jnp.asarray(features), jnp.asarray(labels)

    def loss_fn(p):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(learn2pd.mlp_logits(p, x), y))

    @jax.jit
    def update(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state, losses = optimizer.init(params), []
    for _ in range(steps):
        params, opt_state, loss = update(params, opt_state)
        losses.append(float(loss))
    return params, losses


def measure_heldout(model: jspec.Model, filter: learn2pd.UnmaskingFilter, threshold: float, count: int = 4,
                    prompt_tokens: int = 64, new_tokens: int = 64, block_size: int = 32) -> dict[str, Any]:
    """The filter's figures on `count` held-out prompts (`jspec.bench.heldout_prompts`, batched, no stop tokens):
    tokens per forward (generated tokens / the rows' forwards) and agreement with dllm_static, position by
    position. tests/test_learn2pd.py re-measures them."""
    from jspec import bench

    prompts = bench.heldout_prompts(model.tokenizer, count, prompt_tokens)
    options = dict(max_new_tokens=new_tokens, block_size=block_size, stop_tokens=[])
    static = jspec.decode(model, prompts, "dllm_static", **options)
    learned = jspec.decode(model, prompts, "dllm_learn2pd", filter=filter, threshold=threshold, **options)
    forwards = int(np.asarray(learned.stats["block_forwards"]).sum())
    return {
        "prompts": count,
        "threshold": threshold,
        "tokens_per_forward": round(float(np.asarray(learned.lengths).sum()) / forwards, 4),
        "agreement_with_static": round(float(np.mean(np.asarray(learned.tokens) == np.asarray(static.tokens))), 4),
    }


def weights_digest(model_name: str) -> str | None:
    """sha256 of a shipped model's model.safetensors (the weights a filter was trained on), None if not shipped."""
    import hashlib

    from jspec.loading import ASSETS_DIR

    path = ASSETS_DIR / model_name / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def card_section(assets: Any) -> list[str]:
    """The model card's entry on the shipped Learn2PD filters (empty when none is shipped); its figures are the
    filter metadata's, which tests/test_learn2pd.py re-measures."""
    from pathlib import Path

    lines = []
    for path in sorted(Path(assets).glob(f"*/{learn2pd.FILTER_FILE}")):
        meta = learn2pd.load_filter(path)[1]
        heldout = meta["heldout"]
        name = path.parent.name
        lines += [
            f"## Learn2PD unmasking filter: `{name}/{learn2pd.FILTER_FILE}`",
            "",
            f"A {meta.get('hidden', 32)}-unit, two-layer per-position MLP ({sum(int(np.prod(np.shape(v))) for v in learn2pd.load_filter(path)[0].params.values())} "
            f"parameters) that scores, per masked position of `{meta['model']}`'s current block, whether the current",
            "prediction already is static decoding's final token (Learn2PD, arXiv 2509.25188); `dllm_learn2pd` unmasks",
            "the positions it scores above the threshold (`jspec/strategies/learn2pd.py` lists its features).",
            f"Trained post hoc on {meta['data']}: {meta['examples']} masked positions of the recorded steps, "
            f"{100 * meta['positive_fraction']:.1f}% labelled final; Adam, binary cross-entropy, {meta['adam_steps']} full-batch steps "
            f"(final BCE {meta['final_bce']:.3f}, training accuracy at 0.5 {100 * meta['train_accuracy_at_0.5']:.1f}%), "
            f"{meta['seconds'] / 60:.1f} min on the 2-core CPU, trajectories included. Trained on the `{meta['model']}` weights with",
            f"sha256 {str(meta.get('model_sha256'))[:12]}... (retrain it when the model changes; the test checks they match).",
            "",
            f"On {heldout['prompts']} held-out prompts (64 tokens, 64 new, block 32, float32, batched, no stop tokens), at its",
            f"default threshold {heldout['threshold']:g}: {heldout['tokens_per_forward']:.2f} tokens per forward, "
            f"{100 * heldout['agreement_with_static']:.1f}% agreement with `dllm_static` (position by position).",
            "",
            "```bash",
            f"python -m jspec.train.learn2pd --model {meta['model']} --out jspec/assets/{name}/{learn2pd.FILTER_FILE}",
            "python benchmarks/bench_diffusion.py   # Learn2PD rows beside static, threshold, FreeDave and the oracle filter",
            "```",
            "",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-code-dllm")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--prompts", type=int, default=48, help="training-split prompts")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps (full batch)")
    parser.add_argument("--threshold", type=float, default=LEARN2PD_THRESHOLD, help="threshold of the held-out figures")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = jspec.load(args.model, dtype="float32")
    prompts = training_prompts(model.tokenizer, args.prompts, args.prompt_tokens)
    features, labels = trajectory_examples(model, prompts, args.new_tokens, args.block_size)
    print(f"{len(prompts)} training prompts, {len(labels)} examples, {labels.mean():.3f} positive", flush=True)
    params, losses = train_filter(features, labels, steps=args.steps)
    scores = np.asarray(jax.nn.sigmoid(learn2pd.mlp_logits(params, jnp.asarray(features))))
    accuracy = float(np.mean((scores > 0.5) == (labels > 0.5)))
    seconds = time.perf_counter() - start
    heldout = measure_heldout(model, learn2pd.MLPFilter(params=params), args.threshold)
    metadata = {
        "model": args.model,
        "model_sha256": weights_digest(args.model),
        "data": f"static decoding (dllm_static, block_size {args.block_size}, no cache) of the first {args.prompt_tokens} tokens "
                f"of {len(prompts)} training-split files of the demo corpus, {args.new_tokens} new tokens each",
        "examples": len(labels),
        "positive_fraction": float(labels.mean()),
        "final_bce": losses[-1],
        "train_accuracy_at_0.5": accuracy,
        "adam_steps": args.steps,
        "hidden": int(params["w1"].shape[1]),
        "seconds": round(seconds, 1),
        "heldout": heldout,
    }
    path = learn2pd.save_filter(params, args.out, metadata)
    print(f"BCE {losses[0]:.4f} -> {losses[-1]:.4f}, train accuracy {accuracy:.3f}, {seconds:.0f} s; held-out {heldout}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
