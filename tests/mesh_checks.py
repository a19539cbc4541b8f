"""Checks that need several devices, run by tests/test_sharded_decode.py in a subprocess with simulated CPU devices
(`JAX_NUM_CPU_DEVICES=8`): the test process itself keeps one device. Prints one JSON object of results.

    JAX_NUM_CPU_DEVICES=8 python tests/mesh_checks.py [strategies|layout|errors|multihost ...]
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import traceback

import jax
import numpy as np

import jspec
from jspec.models.kernels import KernelOptions
from jspec.strategies.base import resolve_strategy

decode_module = importlib.import_module("jspec.decode")

MESHES = ((1, 8), (2, 4), (8, 1))
BOTH_AXES = ((2, 4),)  # the mesh every case runs on; the core families (CORE_CASES) run on every one of MESHES
CORE_CASES = ("greedy", "sample", "speculative-chain", "speculative-tree", "dllm-static", "block-diffusion")
MASK = 255
# Ragged: 8 rows of 1..7 tokens (bucketed to one compiled batch of 8); stop tokens end some rows early.
PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [9, 9, 9, 9, 9, 9], [3], [4, 5], [6, 7, 8], [10, 11, 12, 13, 14, 15, 16], [12]]


def config(**overrides) -> jspec.TransformerConfig:
    """8 heads and 2 KV heads: heads split over a model axis of 8, KV heads replicated on model axes 4 and 8."""
    values = dict(name="mesh-tiny", vocab_size=256, hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                  intermediate_size=256, max_position_embeddings=512, dtype="float32", eos_token_ids=())
    values.update(overrides)
    return jspec.TransformerConfig(**values)


def random_model(seed: int, kernels: KernelOptions | None = None, **overrides) -> jspec.Model:
    return jspec.Model.random(config(**overrides), jax.random.key(seed), init_scale=0.3, kernels=kernels)


def cases() -> dict[str, tuple[jspec.Model, str, dict, int]]:
    """name -> (model, strategy, options, max_new_tokens): every registered strategy family."""
    target, draft = random_model(0), random_model(1, num_layers=1)
    masked = random_model(2, diffusion="masked", mask_token_id=MASK)
    block = random_model(3, diffusion="block", diffusion_block_size=8, mask_token_id=MASK, shifted_logits=True)
    dense = random_model(0, KernelOptions(attention_impl="pallas_dense", dense_block_size=16))
    sparse = random_model(0, KernelOptions(attention_impl="pallas_sparse", sparse_block_size=16, sparse_kernel_size=16,
                                           sparse_kernel_stride=8, sparse_local_blocks=1, sparse_top_k=2,
                                           sparse_dense_len=0))
    return {
        "greedy": (target, "greedy", {}, 12),
        "sample": (target, "sample", dict(temperature=0.8, top_k=50), 12),
        "speculative-chain": (target, "speculative", dict(draft=draft, num_draft_tokens=3), 12),
        "speculative-chain-sampling": (target, "speculative", dict(draft=draft, num_draft_tokens=3, temperature=0.8), 12),
        "speculative-tree": (target, "speculative", dict(draft=draft, tree=(2, 2, 1)), 12),
        "prompt-lookup": (target, "prompt_lookup", dict(num_draft_tokens=3), 12),
        "self-speculative": (target, "self_speculative", dict(skip_layers=(1,), num_draft_tokens=2), 12),
        "dllm-static": (masked, "dllm_static", dict(block_size=8), 16),
        "dllm-threshold": (masked, "dllm_threshold", dict(block_size=8, threshold=0.5), 16),
        "freedave": (masked, "freedave", dict(block_size=8), 16),
        "block-diffusion": (block, "block_diffusion", dict(), 16),
        "greedy-pallas-dense": (dense, "greedy", {}, 12),
        "speculative-pallas-dense": (dense, "speculative", dict(draft=draft, num_draft_tokens=3), 12),
        "greedy-pallas-sparse": (sparse, "greedy", {}, 12),
    }


def _as_lists(out) -> dict:
    return dict(tokens=np.asarray(out.tokens).tolist(), lengths=np.asarray(out.lengths).tolist(),
                finish=np.asarray(out.finish_reason).tolist())


def check_strategies() -> dict:
    """Every strategy on a mesh with both axes split (2x4), and the core families on every mesh, against one
    device: tokens, lengths and finish reasons. (Every case on every mesh cost CI 4 minutes.)"""
    results = {}
    for name, (model, strategy, options, new_tokens) in cases().items():
        reference = jspec.decode(model, PROMPTS, strategy, max_new_tokens=new_tokens, key=7, **options)
        stop = _early_stop_token(reference)
        reference = jspec.decode(model, PROMPTS, strategy, max_new_tokens=new_tokens, key=7, stop_tokens=[stop], **options)
        row = {"reference": _as_lists(reference)}
        for data, model_axis in MESHES if name in CORE_CASES else BOTH_AXES:
            mesh = jspec.make_mesh(data=data, model=model_axis)
            got = jspec.decode(model, PROMPTS, strategy, max_new_tokens=new_tokens, key=7, stop_tokens=[stop],
                               mesh=mesh, **options)
            row[f"{data}x{model_axis}"] = _as_lists(got)
        results[name] = row
    mesh = jspec.make_mesh(data=2, model=4)
    model, strategy, options, new_tokens = cases()["greedy"]
    streamed = jspec.stream(model, PROMPTS, strategy, max_new_tokens=new_tokens, mesh=mesh)
    list(streamed)
    results["stream-2x4"] = {"reference": _as_lists(jspec.decode(model, PROMPTS, max_new_tokens=new_tokens)),
                             "2x4": _as_lists(streamed.output)}
    return results


def _early_stop_token(output) -> int:
    """A token that several rows emit before their last position (so with it as a stop token they end early)."""
    tokens = np.asarray(output.tokens)[:, 1:-2]
    values, counts = np.unique(tokens[tokens >= 0], return_counts=True)
    return int(values[np.argmax(counts)])


def check_layout() -> dict:
    """Parameter and cache shardings, and the all-gathers in the compiled decode loop."""
    mesh = jspec.make_mesh(data=2, model=4)
    model = jspec.shard(random_model(0), mesh)
    params = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): str(leaf.sharding.spec)
              for path, leaf in jax.tree_util.tree_leaves_with_path(model.params)}
    cache = jax.jit(lambda m: m.new_cache(8, 64))(model)
    cache_specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(cache)]
    mha = jspec.shard(random_model(0, num_kv_heads=8), mesh)
    mha_cache = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(jax.jit(lambda m: m.new_cache(8, 64))(mha))]
    gathers = {}
    for name in ("greedy", "speculative-chain", "speculative-tree", "greedy-pallas-dense", "dllm-static"):
        case_model, strategy, options, new_tokens = cases()[name]
        gathers[name] = _all_gathers(case_model, strategy, options, new_tokens, mesh)
    return dict(params=params, cache=cache_specs, mha_cache=mha_cache, gathers=gathers)


def _all_gathers(model, strategy, options, new_tokens, mesh) -> dict:
    """The all-gathers of the compiled decode loop (result shapes), with the cache's slot count and head dim."""
    strategy = resolve_strategy(strategy, dict(options))
    model, strategy = decode_module.on_mesh(model, strategy, mesh)
    request = decode_module.build_prompts(model, PROMPTS, new_tokens, None, [], None, strategy)
    strategy.validate(model, request)
    placed = decode_module._placed(model, request, jax.random.key(0))
    text = jax.jit(decode_module._decode_loop).lower(model, strategy, *placed).compile().as_text()
    shapes = [[int(d) for d in dims.split(",") if d] for dims in re.findall(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", text)]
    cache = jax.eval_shape(lambda: model.new_cache(request.batch_size, request.cache_size))
    return dict(shapes=shapes, capacity=cache.capacity, head_dim=model.config.head_size,
                cache_leaf=[list(leaf.shape) for leaf in jax.tree.leaves(cache) if leaf.ndim >= 4][0])


def check_errors() -> dict:
    """Bad meshes and batches: the error messages."""
    target = random_model(0)
    messages = {}

    def attempt(name, function):
        try:
            function()
            messages[name] = None
        except Exception as error:  # noqa: BLE001 - reported to the test
            messages[name] = f"{type(error).__name__}: {error}"

    devices = np.array(jax.devices()).reshape(2, 4)
    other_names = jax.sharding.Mesh(devices, ("x", "y"))
    attempt("axes", lambda: jspec.decode(target, PROMPTS, max_new_tokens=2, mesh=other_names))
    attempt("heads", lambda: jspec.shard(random_model(0, num_heads=6, num_kv_heads=2, hidden_size=96),
                                         jspec.make_mesh(data=2, model=4)))
    attempt("batch", lambda: jspec.decode(random_model(2, diffusion="masked", mask_token_id=MASK), PROMPTS[:3],
                                          "dllm_static", block_size=8, max_new_tokens=8, mesh=jspec.make_mesh(data=2, model=4)))
    sharded = jspec.shard(target, jspec.make_mesh(data=2, model=4))
    attempt("other-mesh", lambda: jspec.decode(sharded, PROMPTS, max_new_tokens=2, mesh=jspec.make_mesh(data=4, model=2)))
    attempt("make-mesh", lambda: jspec.make_mesh(data=3, model=2))
    attempt("mesh-type", lambda: jspec.decode(target, PROMPTS, max_new_tokens=2, mesh="data=2"))
    return messages


CHECKS = {"strategies": check_strategies, "layout": check_layout, "errors": check_errors}


def main(names: list[str]) -> None:
    results = {}
    for name in names:
        try:
            results[name] = CHECKS[name]()
        except Exception:  # noqa: BLE001 - the test shows the traceback
            results[name] = {"error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CHECKS))
