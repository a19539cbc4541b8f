"""Train a Learn2PD unmasking filter (arXiv 2509.25188) for a diffusion LM, post hoc. The model's kind chooses
the decoder: a masked-diffusion model (config.diffusion == "masked") is decoded by `dllm_static` (no context
cache) and its filter scores the positions of the current block; a block-diffusion model ("block") by
`block_diffusion` with the static rule (the exact block cache) and its filter scores the positions of the current
sub-block, the positions the rule may unmask there.

1. Trajectories: static decoding (no stop tokens) of prompts cut from the TRAINING split of the demo corpus (file
   beginnings, as `jspec.bench.heldout_prompts` cuts the held-out files the benchmarks and tests use), batched,
   in one compiled `lax.scan` over the decoder's own `step`. Each step records the positions the rule could
   unmask and the fresh predictions and confidences of its forward there (`decision_record`).
2. Examples: every such position (of steps with at least two: with one, the rule unmasks it anyway):
   `filter_features` as the rule computes them; label 1 when the prediction equals static decoding's final
   token there (Learn2PD's "extremely greedy parallel" oracle, which the filter learns).
3. The per-position MLP (`jspec.strategies.learn2pd`) trained with optax (Adam, binary cross-entropy, full
   batch), written as a safetensors file with its metadata (data, figures).

    python -m jspec.train.learn2pd --model demo-code-dllm --out jspec/assets/demo-code-dllm/learn2pd_filter.safetensors
    python -m jspec.train.learn2pd --model demo-code-bd --out jspec/assets/demo-code-bd/learn2pd_filter.safetensors
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
from jspec.strategies.block_diffusion import BlockDiffusion, block_diffusion
from jspec.strategies.diffusion import MaskedDiffusion, dllm_static
from jspec.strategies.unmasking import LEARN2PD_THRESHOLD

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


def static_decoder(model: jspec.Model, block_size: int | None) -> MaskedDiffusion | BlockDiffusion:
    """The one-token-per-forward decoder whose output labels a filter's examples (no early end at stops):
    dllm_static (block_size, no context cache) for a masked-diffusion model; block_diffusion's static rule
    (the model's block size, sub-blocks of 8, the exact block cache) for a block-diffusion model."""
    if model.config.diffusion == "block":
        return block_diffusion(unmasking="static", end_of_text=False)
    return dllm_static(block_size=block_size or 32, end_of_text=False)


def trajectory_steps(strategy: MaskedDiffusion | BlockDiffusion, model: jspec.Model, new_tokens: int) -> int:
    """Steps that finish static decoding of new_tokens: one per token, and for block diffusion one commit per block."""
    if isinstance(strategy, BlockDiffusion):
        return new_tokens + new_tokens // (strategy.block_size or model.config.diffusion_block_size) + 2
    return new_tokens


def decision_record(strategy: MaskedDiffusion | BlockDiffusion, before: Any, after: Any) -> dict[str, jax.Array]:
    """What a step's rule decided from, per row [B, T]: the positions it could unmask ("masked"), their
    generated positions, and the step's fresh predictions and confidences there."""
    if isinstance(strategy, BlockDiffusion):
        return after.last_decision._asdict()  # the current sub-block (no positions where the row decided nothing)
    bs = strategy.block_size
    block_slots = (before.gen_start + before.block * bs)[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]
    block = jnp.take_along_axis(before.canvas, jnp.minimum(block_slots, before.canvas.shape[1] - 1), axis=1)
    return {
        "masked": (block == before.mask_token_id) & ~before.output.finished[:, None],
        "positions": (before.block * bs)[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :],
        "predicted": after.predicted[:, :bs],  # the step's forward (the kept predictions of its state)
        "confidence": after.confidence[:, :bs],
    }


@partial(jax.jit, static_argnames=("steps",))
def static_trajectory(model: Any, strategy: MaskedDiffusion | BlockDiffusion, prompts: Any, key: jax.Array, steps: int) -> dict[str, jax.Array]:
    """Run `steps` steps of `strategy` (one compiled scan); per step its `decision_record`, and the final
    output and which rows finished."""

    def body(state, _):
        after = strategy.step(model, state)
        return after, decision_record(strategy, state, after)

    final, records = jax.lax.scan(body, strategy.init(model, prompts, key), None, length=steps)
    return {**records, "output": final.output.tokens, "finished": final.output.finished}


def trajectory_examples(model: jspec.Model, prompts: list[list[int]], new_tokens: int, block_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Features [E, F] and labels [E] of every position a static step could unmask, of steps with >= 2 of them."""
    strategy = static_decoder(model, block_size)
    request = decode_module.build_prompts(model, prompts, new_tokens, None, [], None, strategy)
    strategy.validate(model, request)
    steps = trajectory_steps(strategy, model, new_tokens)
    trace = jax.device_get(static_trajectory(model.without_tokenizer(), strategy, request, jax.random.key(0), steps))
    if not np.all(trace["finished"][: len(prompts)]):
        raise RuntimeError(f"static decoding did not finish in {steps} steps")
    masked = trace["masked"]  # [steps, B, T]
    output = np.broadcast_to(trace["output"][None], (steps,) + trace["output"].shape)
    final = np.take_along_axis(output, np.clip(trace["positions"], 0, new_tokens - 1), axis=2)
    labels = trace["predicted"] == final
    features = np.asarray(learn2pd.filter_features(jnp.asarray(trace["confidence"]), jnp.asarray(masked)))
    keep = masked & (masked.sum(axis=2, keepdims=True) >= 2) & (np.arange(masked.shape[1])[None, :, None] < len(prompts))
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


def heldout_decoders(model: jspec.Model, filter: learn2pd.UnmaskingFilter, threshold: float, block_size: int | None) -> tuple[tuple[str, dict], tuple[str, dict]]:
    """(strategy, options) of the static decoder and of Learn2PD with `filter` for the model's kind (as
    `static_decoder`: block_diffusion with its default sub-blocks and block cache, dllm with block_size)."""
    if model.config.diffusion == "block":
        return ("block_diffusion", {"unmasking": "static"}), ("block_diffusion", {"unmasking": "learn2pd", "filter": filter, "threshold": threshold})
    options = {"block_size": block_size or 32}
    return ("dllm_static", options), ("dllm_learn2pd", {**options, "filter": filter, "threshold": threshold})


def decode_counting_forwards(model: jspec.Model, prompts: list[list[int]], strategy: str, options: dict, new_tokens: int) -> tuple[np.ndarray, int]:
    """Tokens [count, new_tokens] and forwards of decoding `prompts` (no stop tokens). Masked diffusion: one
    batched call, forwards = the rows' block_forwards (every forward decides). Block diffusion: each prompt
    alone, forwards = model_calls (the prefill and block commits count too, as in bench_diffusion)."""
    if model.config.diffusion == "block":
        outputs = [jspec.decode(model, [prompt], strategy, max_new_tokens=new_tokens, stop_tokens=[], **options) for prompt in prompts]
        return np.concatenate([np.asarray(o.tokens) for o in outputs]), sum(int(o.stats["model_calls"]) for o in outputs)
    output = jspec.decode(model, prompts, strategy, max_new_tokens=new_tokens, stop_tokens=[], **options)
    return np.asarray(output.tokens), int(np.asarray(output.stats["block_forwards"]).sum())


def measure_heldout(model: jspec.Model, filter: learn2pd.UnmaskingFilter, threshold: float, count: int = 4,
                    prompt_tokens: int = 64, new_tokens: int = 64, block_size: int | None = None) -> dict[str, Any]:
    """The filter's figures on `count` held-out prompts (`jspec.bench.heldout_prompts`, no stop tokens): tokens
    per forward (`decode_counting_forwards`) and agreement with static decoding (`heldout_decoders`), position by
    position. tests/test_learn2pd.py re-measures them."""
    from jspec import bench

    prompts = bench.heldout_prompts(model.tokenizer, count, prompt_tokens)
    static, learned = heldout_decoders(model, filter, threshold, block_size)
    static_tokens, _ = decode_counting_forwards(model, prompts, *static, new_tokens)
    tokens, forwards = decode_counting_forwards(model, prompts, *learned, new_tokens)
    return {
        "prompts": count,
        "threshold": threshold,
        "tokens_per_forward": round(tokens.size / forwards, 4),
        "agreement_with_static": round(float(np.mean(tokens == static_tokens)), 4),
    }


def weights_digest(model_name: str) -> str | None:
    """sha256 of a shipped model's model.safetensors (the weights a filter was trained on), None if not shipped."""
    from jspec.loading import ASSETS_DIR
    from jspec.train.corpus import file_sha256

    path = ASSETS_DIR / model_name / "model.safetensors"
    return file_sha256(path) if path.is_file() else None


CARD_WORDS = {  # per model kind: what the filter scores, the rule that uses it, the static decoder, the held-out setting
    "masked": dict(
        scope="current block", rule="`dllm_learn2pd` unmasks", static="`dllm_static`", setting="block 32, float32, batched",
        bench="Learn2PD rows beside static, threshold, FreeDave and the oracle filter",
    ),
    "block": dict(
        scope="current sub-block", rule='`block_diffusion(unmasking="learn2pd")` unmasks',
        static="static `block_diffusion` (threshold 1)",
        setting="sub-block 8, block cache, float32, each prompt alone, every forward counted: prefill and block commits too",
        bench="block_diffusion + Learn2PD rows beside block_diffusion's",
    ),
}


def card_section(assets: Any) -> list[str]:
    """The model card's entry on the shipped Learn2PD filters (empty when none is shipped); its figures are the
    filter metadata's, which tests/test_learn2pd.py re-measures."""
    from pathlib import Path

    lines = []
    for path in sorted(Path(assets).glob(f"*/{learn2pd.FILTER_FILE}")):
        filter, meta = learn2pd.load_filter(path)
        heldout = meta["heldout"]
        name = path.parent.name
        words = CARD_WORDS[meta.get("kind", "masked")]
        lines += [
            f"## Learn2PD unmasking filter: `{name}/{learn2pd.FILTER_FILE}`",
            "",
            f"A {meta.get('hidden', 32)}-unit, two-layer per-position MLP ({sum(int(np.prod(np.shape(v))) for v in filter.params.values())} "
            f"parameters) that scores, per masked position of `{meta['model']}`'s {words['scope']}, whether the current",
            f"prediction already is static decoding's final token (Learn2PD, arXiv 2509.25188); {words['rule']}",
            "the positions it scores above the threshold (`jspec/strategies/learn2pd.py` lists its features).",
            f"Trained post hoc on {meta['data']}: {meta['examples']} masked positions of the recorded steps, "
            f"{100 * meta['positive_fraction']:.1f}% labelled final; Adam, binary cross-entropy, {meta['adam_steps']} full-batch steps "
            f"(final BCE {meta['final_bce']:.3f}, training accuracy at 0.5 {100 * meta['train_accuracy_at_0.5']:.1f}%), "
            f"{meta['seconds'] / 60:.1f} min on the 2-core CPU, trajectories included. Trained on the `{meta['model']}` weights with",
            f"sha256 {str(meta.get('model_sha256'))[:12]}... (retrain it when the model changes; the test checks they match).",
            "",
            f"On {heldout['prompts']} held-out prompts (64 tokens, 64 new, {words['setting']}, no stop tokens), at its",
            f"default threshold {heldout['threshold']:g}: {heldout['tokens_per_forward']:.2f} tokens per forward, "
            f"{100 * heldout['agreement_with_static']:.1f}% agreement with {words['static']} (position by position).",
            "",
            "```bash",
            f"python -m jspec.train.learn2pd --model {meta['model']} --out jspec/assets/{name}/{learn2pd.FILTER_FILE}",
            f"python benchmarks/bench_diffusion.py   # {words['bench']}",
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
    parser.add_argument("--block-size", type=int, help="masked diffusion: the block size, 32 (block diffusion: the model's)")
    parser.add_argument("--steps", type=int, default=2000, help="Adam steps (full batch)")
    parser.add_argument("--threshold", type=float, default=LEARN2PD_THRESHOLD, help="threshold of the held-out figures")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = jspec.load(args.model, dtype="float32")
    if model.config.diffusion == "block" and args.block_size is not None:
        parser.error(f"--block-size: a block-diffusion model decodes in its own blocks ({model.config.diffusion_block_size}); "
                     "the flag is for masked-diffusion models")
    prompts = training_prompts(model.tokenizer, args.prompts, args.prompt_tokens)
    features, labels = trajectory_examples(model, prompts, args.new_tokens, args.block_size)
    print(f"{len(prompts)} training prompts, {len(labels)} examples, {labels.mean():.3f} positive", flush=True)
    params, losses = train_filter(features, labels, steps=args.steps)
    scores = np.asarray(jax.nn.sigmoid(learn2pd.mlp_logits(params, jnp.asarray(features))))
    accuracy = float(np.mean((scores > 0.5) == (labels > 0.5)))
    seconds = time.perf_counter() - start
    heldout = measure_heldout(model, learn2pd.MLPFilter(params=params), args.threshold, block_size=args.block_size)
    kind = model.config.diffusion
    decoder = ("block_diffusion static rule, sub-block 8, block cache" if kind == "block"
               else f"dllm_static, block_size {args.block_size or 32}, no cache")
    metadata = {
        "model": args.model,
        "kind": kind,
        "model_sha256": weights_digest(args.model),
        "model_shape": learn2pd.model_shape(model.config),
        "data": f"static decoding ({decoder}) of the first {args.prompt_tokens} tokens "
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
