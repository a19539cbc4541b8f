"""Tensor-parallel latent attention (TPLA; Tang et al., arXiv 2508.15881) for MLA models.

Under head-parallel tensor parallelism every device keeps the whole MLA latent of every token. `tpla(model, mesh)`
instead splits the latent over the mesh's "model" axis: with g devices on that axis each caches kv_lora_rank / g
latent values per token (plus the RoPE key, replicated by default), attends over its slice with its own softmax,
and one psum combines the partial head outputs (jspec/models/attention/mla.py, `latent_parallel_attention`).

1. An orthogonal transform Q [r, r] is folded into each MLA layer (exact; `fold_latent_rotation`): the latent norm's
   weight moves into kv_b, kv_a's latent columns become kv_a[:, :r] Q, kv_b becomes Q^T diag(gamma) kv_b. Because
   RMSNorm over all r dims commutes with a rotation, the model computes the same function; its cached latent is
   n(z) Q. Transforms: "hadamard" (Sylvester, r a power of two: spreads every direction over all shards), "pca"
   (eigenvectors of the calibration latents' second moment, largest first: shard 0 gets the leading components),
   "none" (identity; the norm weight is still folded).
2. Decode-sized chunks (<= 8 tokens per row: decode, chain and tree verification) attend per shard; prefill attends
   with exact MLA (expanded form) over the same sharded cache. With g = 1 TPLA is MLA. With g > 1 it is an
   approximation (one softmax per shard), measured in benchmarks/bench_tpla.py, never claimed lossless.

Options the paper leaves open: `rope` = "replicated" (each device caches the whole RoPE key and adds the full RoPE
logit to its shard's logits) or "split" (RoPE dims split like the latent); `rescale` = multiply each shard's split
logit parts by g (its partial logits then estimate the full logits) or not. Defaults, from benchmarks/bench_tpla.py
on demo-code-mla (16 held-out windows, MLA loss 5.395; figures in jspec/assets/MODEL_CARD.md): rope="replicated",
rescale=False (at g = 4 with PCA: loss 5.393 / top-1 agreement with MLA 0.978, against 5.503 / 0.679 with the RoPE
key split, 5.545 / 0.625 rescaled). "pca" was the best transform at every g (agreement 0.993 / 0.978 / 0.912 at
g = 2 / 4 / 8, against 0.84 / 0.78 / 0.74 for hadamard and none); "hadamard" stays the default transform only
because it needs no calibration data: pass transform="pca" with calibration tokens when you have them.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jspec.models import transformer
from jspec.models.attention.mla import LatentParallel
from jspec.sharding import shard
from jspec.validation import ArgumentError, check_choice

TRANSFORMS = ("hadamard", "pca", "none")


def tpla(
    model: Any,
    mesh: Any,
    transform: str = "hadamard",
    calibration: Any = None,
    *,
    rope: str = "replicated",
    rescale: bool = False,
    rules: Mapping[str, Any] | None = None,
) -> Any:
    """The model with its MLA layers decoding by TPLA on `mesh` (axes "data", "model": `jspec.make_mesh`): the
    transform folded in, the latent cache and kv_b's latent rows split over "model", the attention head projections
    replicated (each device computes every head on its latent slice), everything else (MLP, vocabulary, batch)
    placed by the usual rules (`jspec.shard`); `rules` overrides any of these. calibration: token ids [N, T] (ints) whose latents give the "pca" transform.
    Raises ArgumentError naming the argument for a model without MLA layers, an unknown transform or rope placement,
    a missing calibration, or a latent (or split RoPE) size the model axis does not divide."""
    config = model.config
    if config.mla is None or "mla" not in config.attention_types:
        raise ArgumentError("model: TPLA needs a model with MLA layers (TransformerConfig.mla)")
    check_choice("transform", transform, TRANSFORMS)
    options = _latent_parallel(rope, rescale)
    rotations = latent_rotations(model, transform, calibration)
    folded = fold_latent_rotation(model, rotations)
    folded = folded.replace(kernels=folded.kernels.replace(latent_parallel=None, sharding=None))
    # every device computes every head on its latent slice: the head projections are replicated over "model"
    plan = {"latent": "model", "rope_dim": "model" if rope == "split" else None, "q_heads": None}
    placed = shard(folded, mesh, {**plan, **dict(rules or {})})
    return placed.replace(kernels=placed.kernels.replace(latent_parallel=options))


def _latent_parallel(rope: str, rescale: Any) -> LatentParallel:
    check_choice("rope", rope, ("replicated", "split"))
    if not isinstance(rescale, bool):
        raise ArgumentError(f"rescale: expected a bool, got {rescale!r}")
    return LatentParallel(rope, rescale)


def mla_layers(config: Any) -> list[int]:
    return [layer for layer, kind in enumerate(config.attention_types) if kind == "mla"]


def latent_rotations(model: Any, transform: str, calibration: Any = None) -> dict[int, np.ndarray]:
    """{MLA layer: orthogonal Q [r, r] (float64)} for `transform` (see the module docstring)."""
    check_choice("transform", transform, TRANSFORMS)
    rank = model.config.mla.kv_lora_rank
    layers = mla_layers(model.config)
    if transform == "none":
        return {layer: np.eye(rank) for layer in layers}
    if transform == "hadamard":
        if rank & (rank - 1):
            raise ArgumentError(f"transform: 'hadamard' needs kv_lora_rank a power of two, got {rank}; use 'pca' or 'none'")
        return {layer: hadamard(rank) for layer in layers}
    if calibration is None:
        raise ArgumentError("calibration: transform='pca' needs calibration token ids [N, T] (ints)")
    second_moments = latent_second_moments(fold_latent_rotation(model, {l: np.eye(rank) for l in layers}), calibration)
    rotations = {}
    for layer, moment in second_moments.items():
        values, vectors = np.linalg.eigh(moment)
        rotations[layer] = vectors[:, np.argsort(values)[::-1]]
    return rotations


def hadamard(size: int) -> np.ndarray:
    """The Sylvester Hadamard matrix H_size / sqrt(size) (orthogonal; size a power of two)."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix / np.sqrt(size)


def latent_second_moments(model: Any, calibration: Any) -> dict[int, np.ndarray]:
    """{MLA layer: E[c c^T] [r, r] (float64)} over every token of `calibration` [N, T], c the cached latent."""
    tokens = np.asarray(calibration)
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ArgumentError(f"calibration: expected token ids [N, T] (a non-empty 2-d int array), got shape "
                            f"{tokens.shape} of {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= model.config.vocab_size:
        raise ArgumentError(f"calibration: token ids must lie in [0, {model.config.vocab_size})")

    @jax.jit
    def cached(model, tokens):
        cache = model.new_cache(tokens.shape[0], tokens.shape[1])
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.forward(tokens, positions, cache)[1]

    cache = cached(model.without_tokenizer(), jnp.asarray(tokens, jnp.int32))
    latents = {}
    entries = iter(cache.entries)
    for kind, start, end in transformer.group_kinds(model.config, model.kernels):
        per_entry = [range(start, end)] if transformer.is_scanned(start, end) else [[layer] for layer in range(start, end)]
        for layers in per_entry:
            entry = next(entries)
            for index, layer in enumerate(layers):
                if model.config.attention_types[layer] == "mla":
                    latent = np.asarray(entry.latent[index], np.float64).reshape(-1, entry.latent.shape[-1])
                    latents[layer] = latent.T @ latent / len(latent)
    return latents


def fold_latent_rotation(model: Any, rotations: dict[int, np.ndarray]) -> Any:
    """The same model (exactly, up to float rounding) with each MLA layer's latent rotated by rotations[layer]
    [r, r] (orthogonal) and its latent norm weight folded into kv_b (norm weight 1 after). See the module docstring."""
    config = model.config
    layers = [dict(transformer.layer_params(config, model.params, i)) for i in range(config.num_layers)]
    rank = config.mla.kv_lora_rank
    for layer, rotation in rotations.items():
        params = layers[layer]
        dtype = params["kv_a"].dtype
        rotation = np.asarray(rotation, np.float64)
        if rotation.shape != (rank, rank) or not np.allclose(rotation @ rotation.T, np.eye(rank), atol=1e-6):
            raise ArgumentError(f"rotations: layer {layer} needs an orthogonal [{rank}, {rank}] matrix")
        kv_a = np.asarray(params["kv_a"], np.float64)
        gamma = np.asarray(params["kv_a_norm"], np.float64)
        kv_b = np.asarray(params["kv_b"], np.float64)
        kv_a = np.concatenate([kv_a[:, :rank] @ rotation, kv_a[:, rank:]], axis=1)
        params.update(kv_a=jnp.asarray(kv_a, dtype), kv_b=jnp.asarray(rotation.T @ (gamma[:, None] * kv_b), dtype),
                      kv_a_norm=jnp.ones((rank,), dtype))
    params = {**model.params, "groups": transformer.stack_layers(config, layers)}
    return model.replace(params=params)


__all__ = ["TRANSFORMS", "fold_latent_rotation", "hadamard", "latent_rotations", "latent_second_moments", "tpla"]
