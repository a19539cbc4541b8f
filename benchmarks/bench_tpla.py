"""TPLA on demo-code-mla: accuracy against MLA, KV bytes per token per device, tokens/s on simulated devices.

1. Accuracy (the paper's table, on our model): held-out windows of 257 tokens; the first `--prefix` tokens are
   prefilled with exact MLA, the rest are fed teacher-forced in decode chunks of 8 tokens (each chunk attends by
   TPLA over the cache, exactly as decode and verification do). Reported per g in 2, 4, 8 and transform none /
   hadamard / pca (PCA calibrated on training-split windows, never the held-out ones): held-out loss (nats) over the
   chunked positions, and top-1 agreement with MLA's argmax at those positions. Then, at g = 4 with the chosen
   transform, the two open options: RoPE key replicated or split, shard logits rescaled by g or not.
2. KV cache bytes per token per device (all layers), measured from the addressable shards of a cache created and
   filled under jit on the mesh: MLA head-parallel (`jspec.shard`: the latent is replicated over "model"; 6 heads
   split over 2 devices only, so 4 and 8 are the same figure by construction) vs TPLA.
3. Tokens/s of greedy decoding (8 prompts, `--new-tokens`): MLA on one device vs TPLA on g simulated devices,
   interleaved (every variant once per round, the starting one rotating), ratio of total times. The simulated
   devices share this machine's 2 CPU cores: the ratio measures partitioning and psum overhead, not a speedup.

    python benchmarks/bench_tpla.py                       # jspec/assets/demo-code-mla, 32 windows, 3 rounds
    python benchmarks/bench_tpla.py --windows 8 --rounds 1 --quick
    python benchmarks/bench_tpla.py --write    # also writes the tables to <model>/tpla_measurements.md (model card)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jspec  # noqa: E402
from jspec.train import data as data_lib  # noqa: E402
from jspec.train.trainer import TrainConfig, prepare_data  # noqa: E402

CHUNK = 8
SHARDS = (2, 4, 8)
TRANSFORMS = ("none", "hadamard", "pca")


def teacher_forced_logits(model, windows: np.ndarray, prefix: int) -> np.ndarray:
    """Logits [N, W - prefix, V] at positions prefix .. W-1 of windows [N, W + 1] (inputs windows[:, :W]):
    MLA prefill of the prefix, then chunks of CHUNK tokens through the decode path."""
    inputs = jnp.asarray(windows[:, :-1], jnp.int32)
    batch, length = inputs.shape

    @jax.jit
    def prefill(model, tokens):
        cache = model.new_cache(batch, length)
        positions = jnp.broadcast_to(jnp.arange(prefix), (batch, prefix))
        _, cache = model.forward(tokens, positions, cache)
        return cache.with_lengths(jnp.full((batch,), prefix, jnp.int32))

    @jax.jit
    def chunk(model, cache, tokens, start):
        positions = start + jnp.broadcast_to(jnp.arange(CHUNK), (batch, CHUNK))
        logits, cache = model.forward(tokens, positions, cache)
        return logits, cache.with_lengths(cache.lengths + CHUNK)

    model = model.without_tokenizer()
    cache = prefill(model, inputs[:, :prefix])
    outputs = []
    for start in range(prefix, length, CHUNK):
        logits, cache = chunk(model, cache, inputs[:, start:start + CHUNK], jnp.int32(start))
        outputs.append(np.asarray(logits, np.float32))
    return np.concatenate(outputs, axis=1)


def loss_and_agreement(logits: np.ndarray, reference: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = float(-np.take_along_axis(log_probs, targets[..., None], -1).mean())
    return loss, float((logits.argmax(-1) == reference.argmax(-1)).mean())


def kv_bytes_per_token(model, batch: int = 8, capacity: int = 64) -> float:
    """Cache bytes one device holds per token (all layers), from a cache created and written under jit."""
    fill = jax.jit(lambda m: m.forward(jnp.ones((batch, 4), jnp.int32), jnp.broadcast_to(jnp.arange(4), (batch, 4)),
                                       m.new_cache(batch, capacity))[1])
    cache = fill(model.without_tokenizer())
    first = jax.devices()[0]
    per_device = 0
    for leaf in jax.tree.leaves(cache.entries):
        shards = [s for s in leaf.addressable_shards if s.device == first] if hasattr(leaf, "addressable_shards") else []
        data = shards[0].data if shards else leaf
        per_device += data.nbytes / (data.shape[1] * data.shape[2])  # [L, B, S, ...]: per row and slot
    return per_device


def mesh_of(shards: int):
    return jspec.make_mesh(data=1, model=shards, devices=jax.devices()[:shards])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="jspec/assets/demo-code-mla")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows of 257 tokens")
    parser.add_argument("--prefix", type=int, default=64, help="tokens prefilled with exact MLA per window")
    parser.add_argument("--calibration", type=int, default=16, help="training-split windows for the PCA transform")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="skip the option sweep and the throughput part")
    parser.add_argument("--write", action="store_true", help="write the tables to <model>/tpla_measurements.md")
    args = parser.parse_args()
    report: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        report.append(line)

    model = jspec.load(args.model, dtype="float32")  # shipped in bf16; measured in float32
    config = model.config
    print(f"# {args.model}: {model.num_parameters():,} parameters, MLA r={config.mla.kv_lora_rank} "
          f"dr={config.mla.qk_rope_head_dim}, {config.num_heads} heads, {config.num_layers} layers; "
          f"{len(jax.devices())} simulated CPU devices; python {sys.version.split()[0]}, jax {jax.__version__}")
    recipe = TrainConfig.from_recipe("demo-code-mla", tokenizer=str(os.path.join(args.model, "tokenizer.json")))
    data = prepare_data(recipe, log=lambda *_: None)
    windows = data_lib.eval_windows(data.heldout_stream, 256, args.windows)
    calibration = data_lib.eval_windows(data.train_stream, 256, args.calibration)[:, :-1]
    targets = windows[:, args.prefix + 1:]

    started = time.perf_counter()
    reference = teacher_forced_logits(model, windows, args.prefix)
    mla_loss, _ = loss_and_agreement(reference, reference, targets)
    emit(f"\n#### 1. Accuracy: {len(windows)} held-out windows, {targets.size:,} decode-path positions "
          f"(prefix {args.prefix} prefilled by MLA, chunks of {CHUNK})\n")
    emit(f"MLA (one device): held-out loss {mla_loss:.4f}\n")
    emit("| g | transform | held-out loss | delta vs MLA | top-1 agreement with MLA |")
    emit("|---|---|---|---|---|")
    results = {}
    for shards in SHARDS:
        for transform in TRANSFORMS:
            tpla = jspec.tpla(model, mesh_of(shards), transform, calibration if transform == "pca" else None)
            loss, agreement = loss_and_agreement(teacher_forced_logits(tpla, windows, args.prefix), reference, targets)
            results[shards, transform] = (loss, agreement)
            emit(f"| {shards} | {transform} | {loss:.4f} | {loss - mla_loss:+.4f} | {agreement:.4f} |")
    if not args.quick:
        best = min(TRANSFORMS, key=lambda t: results[4, t][0])
        emit(f"\nOptions at g = 4, transform {best} (lowest g = 4 loss above):\n")
        emit("| RoPE key | rescale shard logits by g | held-out loss | top-1 agreement |")
        emit("|---|---|---|---|")
        for rope in ("replicated", "split"):
            for rescale in (False, True):
                tpla = jspec.tpla(model, mesh_of(4), best, calibration if best == "pca" else None, rope=rope,
                                  rescale=rescale)
                loss, agreement = loss_and_agreement(teacher_forced_logits(tpla, windows, args.prefix), reference,
                                                     targets)
                emit(f"| {rope} | {rescale} | {loss:.4f} | {agreement:.4f} |")
    emit(f"\n(accuracy part: {time.perf_counter() - started:.0f} s)")

    emit("\n#### 2. KV cache bytes per token per device (all layers, float32 cache)\n")
    emit("| devices on \"model\" | MLA head-parallel | TPLA, RoPE replicated | TPLA, RoPE split |")
    emit("|---|---|---|---|")
    emit(f"| 1 | {kv_bytes_per_token(model):.0f} | - | - |")
    for shards in SHARDS:
        head_parallel = "(6 heads do not split)"
        if config.num_heads % shards == 0:
            head_parallel = f"{kv_bytes_per_token(jspec.shard(model, mesh_of(shards))):.0f}"
        replicated = kv_bytes_per_token(jspec.tpla(model, mesh_of(shards), "none"))
        split = kv_bytes_per_token(jspec.tpla(model, mesh_of(shards), "none", rope="split"))
        emit(f"| {shards} | {head_parallel} | {replicated:.0f} | {split:.0f} |")

    if not args.quick:
        throughput(model, data, args, emit)
    if args.write:
        path = os.path.join(args.model, "tpla_measurements.md")
        with open(path, "w") as handle:
            handle.write(f"Reproduce: `python benchmarks/bench_tpla.py --windows {args.windows} --rounds {args.rounds} --write`"
                         "\n" + "\n".join(report) + "\n")
        print(f"wrote {path}")


def throughput(model, data, args, emit) -> None:
    emit(f"\n#### 3. Greedy decoding, 8 held-out prompts x {args.new_tokens} new tokens, {args.rounds} interleaved rounds\n")
    prompts = [window[:48].tolist() for window in data_lib.eval_windows(data.heldout_stream, 256, 8)]
    variants = {"MLA, 1 device": model}
    for shards in SHARDS:
        variants[f"TPLA g={shards}"] = jspec.tpla(model, mesh_of(shards), "hadamard")
    outputs = {name: jspec.decode(m, prompts, max_new_tokens=args.new_tokens, stop_tokens=[]) for name, m in variants.items()}
    totals = dict.fromkeys(variants, 0.0)
    names = list(variants)
    for round_index in range(args.rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            started = time.perf_counter()
            jax.block_until_ready(jspec.decode(variants[name], prompts, max_new_tokens=args.new_tokens, stop_tokens=[]).tokens)
            totals[name] += time.perf_counter() - started
    tokens = len(prompts) * args.new_tokens * args.rounds
    baseline = totals[names[0]]
    emit("| variant | tokens/s | time vs MLA on 1 device | tokens equal to MLA greedy |")
    emit("|---|---|---|---|")
    reference_tokens = outputs[names[0]].sequences()
    for name in names:
        same = np.mean([a == b for x, y in zip(outputs[name].sequences(), reference_tokens) for a, b in zip(x, y)])
        emit(f"| {name} | {tokens / totals[name]:.1f} | {totals[name] / baseline:.2f}x | {same:.3f} |")
    emit()
    emit("Simulated devices share 2 CPU cores: the times measure partitioning and psum overhead, not a speedup.")


if __name__ == "__main__":
    main()
