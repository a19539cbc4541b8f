"""Multi-head latent attention (DeepSeek-V2/V3): the "mla" layer kind, with a latent-only cache.

Per token a layer caches the RMS-normalised latent c [r] (r = kv_lora_rank) and the rotated RoPE key k^R [dr]
shared by all heads (`LatentEntry`): r + dr values per token and layer, never per-head keys or values.

Equations (one layer; h the normed input, H heads, dn/dr/dv the nope/rope/value head dims):
    q = q_b(RMSNorm(q_a h)) (or q h)  -> per head q^C [dn], q^R [dr] (RoPE applied to q^R)
    [z; k~] = kv_a h ;  c = RMSNorm_kv(z) ;  k^R = RoPE(k~)
    kv_b = [W_UK; W_UV] per head: k^C_h = W_UK,h c, v_h = W_UV,h c ;  o = W_o [o_1 ... o_H]
    score = sigma (q^C . k^C + q^R . k^R),  sigma = (dn + dr)^-1/2 * mscale(yarn)^2

Two exact forms of the same attention:
- expanded (`expanded_attention`): keys and values expanded per head from the latents, ordinary attention. Used
  for prefill-sized chunks (more than MAX_CHAIN_TOKENS tokens per row), where it needs fewer FLOPs.
- absorbed (`absorbed_attention`): W_UK folded into the query (q~ = W_UK,h^T q^C [r]) and W_UV applied after the
  softmax, so the cache is read as one shared "KV head": keys [c ; k^R], values c (MQA with H query heads). Used for
  decode-sized chunks (decode, chain and tree verification), the form a decode kernel serves.

With `KernelOptions(attention_impl="pallas_dense")`, causal decode chunks over a cache (the default mask, at most
MAX_CHAIN_TOKENS tokens per row) attend through the Pallas MLA decode kernel (`pallas_kernels.mla_decode_attention`:
the absorbed form with the latent read once per block, `MLAAttention.kernel_attend`), as `FullAttention.kernel_attend`
does for GQA; custom masks (tree verification) and prefill stay on XLA. Tensor-parallel latent attention (TPLA,
`jspec.tpla`) replaces the absorbed form by `latent_parallel_attention`: the latent split over the mesh's model
axis, one softmax per shard, one psum.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jspec import masks
from jspec.cache import move_slots, scatter_layer_rows, take_rows
from jspec.models.attention.full import FullContext
from jspec.models.config import YarnScaling, yarn_mscale
from jspec.models.layers import MASKED_SCORE, apply_rope, attend, rms_norm, rope_tables
from pallas_kernels import mla_decode_attention

MAX_CHAIN_TOKENS = 8  # longest chunk (tokens per row) that attends in the absorbed (decode) form
ROPE_PLACEMENTS = ("replicated", "split")


@struct.dataclass
class LatentEntry:
    """Per-slot latents and RoPE keys of a group of MLA layers."""

    latent: jax.Array  # [L, B, S, r]
    rope_key: jax.Array  # [L, B, S, dr]

    def write(self, layer: jax.Array, latent: jax.Array, rope_key: jax.Array, slots: jax.Array) -> "LatentEntry":
        """Scatter one layer's chunk latents [B, T, r] and RoPE keys [B, T, dr] to slots [B, T] (out of range:
        dropped)."""
        chunk = LatentEntry(latent=latent, rope_key=rope_key)
        return jax.tree.map(lambda buffer, update: scatter_layer_rows(buffer, layer, update, slots), self, chunk)

    def compact(self, source_slots: jax.Array, destination_start: jax.Array, capacity: int) -> "LatentEntry":
        return jax.tree.map(lambda leaf: move_slots(leaf, source_slots, destination_start), self)  # [L, B, S, ...]

    def gather_rows(self, rows: jax.Array) -> "LatentEntry":
        return jax.tree.map(lambda leaf: take_rows(leaf, rows), self)


@dataclasses.dataclass(frozen=True)
class LatentParallel:
    """TPLA options (set by `jspec.tpla`): how decode chunks attend with the latent split over the model axis.

    rope: "replicated" (every device caches the whole RoPE key and adds the full q^R . k^R to its shard's logits)
    or "split" (the RoPE dims are split over the devices like the latent). rescale: multiply each shard's split
    logit parts by the number of shards g, so a shard's logits estimate the full logits (else each shard sees its
    partial sums, i.e. a softmax at temperature about g for the split part)."""

    rope: str = "replicated"
    rescale: bool = False

    def __post_init__(self):
        if self.rope not in ROPE_PLACEMENTS:
            raise ValueError(f"rope: expected one of {ROPE_PLACEMENTS}, got {self.rope!r}")
        if not isinstance(self.rescale, bool):
            raise ValueError(f"rescale: expected a bool, got {self.rescale!r}")


@dataclasses.dataclass(frozen=True)
class MLAContext(FullContext):
    """FullContext's fields (cos and sin [B, T, dr]) and whether the chunk attends in the absorbed form."""

    absorbed: bool = False  # decode-sized chunk over a cache


def softmax_scale(config: Any) -> float:
    """sigma = (dn + dr)^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim (DeepSeek)."""
    scale = config.mla.qk_head_dim ** -0.5
    scaling = config.rope_scaling
    if isinstance(scaling, YarnScaling) and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def split_kv_b(kv_b: jax.Array, config: Any) -> tuple[jax.Array, jax.Array]:
    """kv_b [r, H * (dn + dv)] -> W_UK [r, H, dn], W_UV [r, H, dv]."""
    mla = config.mla
    per_head = kv_b.reshape(kv_b.shape[0], config.num_heads, mla.qk_nope_head_dim + mla.v_head_dim)
    return per_head[..., :mla.qk_nope_head_dim], per_head[..., mla.qk_nope_head_dim:]


def expanded_attention(
    q_nope: jax.Array,  # [B, T, H, dn]
    q_rope: jax.Array,  # [B, T, H, dr]
    latent: jax.Array,  # [B, S, r]
    rope_key: jax.Array,  # [B, S, dr]
    kv_b: jax.Array,  # [r, H * (dn + dv)]
    mask: jax.Array,  # [B, T, S] bool
    config: Any,
) -> jax.Array:  # [B, T, H, dv]
    """Attention with per-head keys [k^C ; k^R] and values expanded from the latents (`layers.attend`)."""
    w_uk, w_uv = split_kv_b(kv_b, config)
    keys_nope = jnp.einsum("bsr,rhn->bshn", latent, w_uk)
    values = jnp.einsum("bsr,rhv->bshv", latent, w_uv)
    rope = jnp.broadcast_to(rope_key[:, :, None, :].astype(keys_nope.dtype), (*keys_nope.shape[:3], rope_key.shape[-1]))
    keys = jnp.concatenate([keys_nope, rope], axis=-1)
    queries = jnp.concatenate([q_nope, q_rope], axis=-1)
    return attend(queries, keys, values, mask, scale=softmax_scale(config))


def absorbed_attention(
    q_nope: jax.Array,  # [B, T, H, dn]
    q_rope: jax.Array,  # [B, T, H, dr']
    latent: jax.Array,  # [B, S, r']
    rope_key: jax.Array,  # [B, S, dr']
    w_uk: jax.Array,  # [r', H, dn]
    w_uv: jax.Array,  # [r', H, dv]
    mask: jax.Array,  # [B, T, S] bool
    scale: float,
    nope_scale: float = 1.0,
    rope_scale: float = 1.0,
) -> jax.Array:  # [B, T, H, dv]
    """The absorbed form: one shared KV head with keys [c ; k^R] and values c; W_UK folded into the queries and W_UV
    applied after the softmax. Scores and softmax in float32. `nope_scale`/`rope_scale` multiply the two logit parts
    (1 for MLA; TPLA's rescale option). r' and dr' may be slices of the latent and RoPE dims (TPLA shards)."""
    q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
    scores = jnp.einsum("bthr,bsr->bhts", q_latent, latent, preferred_element_type=jnp.float32) * nope_scale
    scores += jnp.einsum("bthd,bsd->bhts", q_rope, rope_key, preferred_element_type=jnp.float32) * rope_scale
    scores = jnp.where(mask[:, None], scores * scale, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(latent.dtype)
    context = jnp.einsum("bhts,bsr->bthr", probs, latent)
    return jnp.einsum("bthr,rhv->bthv", context, w_uv)


@dataclasses.dataclass(frozen=True)
class MLAAttention:
    """The "mla" kind: causal multi-head latent attention over a latent-only cache (see the module docstring)."""

    sharding: Any = None  # the model's `MeshSharding`
    latent_parallel: LatentParallel | None = None  # TPLA (jspec.tpla): decode chunks attend per latent shard
    impl: str = "xla"  # "xla" | "pallas_dense" (the MLA decode kernel serves causal decode chunks)
    interpret: bool | None = None
    block_size: int = 64  # slots per step of the MLA decode kernel; cache capacities are multiples of it

    @property
    def cache_size_multiple(self) -> int:
        return 1 if self.impl == "xla" else self.block_size

    def init_params(self, config: Any, normal) -> dict[str, jax.Array]:
        """q_a [D, q_lora], q_a_norm [q_lora], q_b [q_lora, H*(dn+dr)] (or q [D, H*(dn+dr)]); kv_a [D, r+dr],
        kv_a_norm [r], kv_b [r, H*(dn+dv)], o [H*dv, D]; norms = 1."""
        mla, d, h = config.mla, config.hidden_size, config.num_heads
        dtype = jnp.dtype(config.dtype)
        params = {}
        if mla.q_lora_rank is None:
            params["q"] = normal((d, h * mla.qk_head_dim))
        else:
            params.update(q_a=normal((d, mla.q_lora_rank)), q_a_norm=jnp.ones((mla.q_lora_rank,), dtype),
                          q_b=normal((mla.q_lora_rank, h * mla.qk_head_dim)))
        params.update(kv_a=normal((d, mla.kv_lora_rank + mla.qk_rope_head_dim)),
                      kv_a_norm=jnp.ones((mla.kv_lora_rank,), dtype),
                      kv_b=normal((mla.kv_lora_rank, h * (mla.qk_nope_head_dim + mla.v_head_dim))),
                      o=normal((h * mla.v_head_dim, d)))
        return params

    def param_axes(self, config: Any) -> dict[str, tuple[str, ...]]:
        """Heads split like GQA heads ("q_heads"); the latent projections are replicated, kv_b's latent rows
        follow the "latent" rule (split over the model axis under TPLA, where it takes precedence over heads)."""
        axes = {"q": ("embed", "q_heads")} if config.mla.q_lora_rank is None else {
            "q_a": ("embed", "q_lora"), "q_a_norm": ("q_lora",), "q_b": ("q_lora", "q_heads")}
        axes.update(kv_a=("embed", "latent_rope"), kv_a_norm=("latent",), kv_b=("latent", "q_heads"),
                    o=("q_heads", "embed"))
        return axes

    def new_entry(self, config: Any, num_layers: int, batch_size: int, capacity: int, chunk: int) -> LatentEntry:
        mla = config.mla
        return LatentEntry(latent=jnp.zeros((num_layers, batch_size, capacity, mla.kv_lora_rank), config.dtype),
                           rope_key=jnp.zeros((num_layers, batch_size, capacity, mla.qk_rope_head_dim), config.dtype))

    def entry_axes(self, config: Any) -> LatentEntry:
        return LatentEntry(latent=("layers", "batch", "seq", "latent"), rope_key=("layers", "batch", "seq", "rope_dim"))

    def prepare(self, config, entry, positions, write_slots, mask, capacity) -> MLAContext:
        cos, sin = rope_tables(positions, config, config.mla.qk_rope_head_dim)
        batch, length = positions.shape
        if entry is None:
            if mask is None:
                query_slots = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
                mask = masks.causal_mask(query_slots, length)
            return MLAContext(cos, sin, mask, None, use_kernels=False, absorbed=False)
        if type(entry) is not LatentEntry:
            raise ValueError(f"cache: an MLA layer needs a LatentEntry, the cache holds {type(entry).__name__}; "
                             "create caches with model.new_cache(...)")
        if capacity % self.cache_size_multiple:
            raise ValueError(f"cache capacity (cache_size) {capacity} is not a multiple of the MLA kernel block size "
                             f"{self.cache_size_multiple}; create caches with model.new_cache(...)")
        absorbed = length <= MAX_CHAIN_TOKENS
        use_kernels = self.impl != "xla" and mask is None and absorbed
        if mask is None and not use_kernels:
            mask = masks.causal_mask(write_slots, capacity)
        return MLAContext(cos, sin, mask, write_slots, use_kernels=use_kernels, absorbed=absorbed)

    def apply(self, params, config, normed, entry, layer, context: MLAContext):
        q_nope, q_rope = self.queries(params, config, normed, context)
        latent, rope_key = self.latents(params, config, normed, context)
        if entry is None:
            attended = expanded_attention(q_nope, q_rope, latent, rope_key, params["kv_b"], context.mask, config)
        else:
            entry = entry.write(layer, latent, rope_key, context.write_slots)
            cached_latent, cached_rope = entry.latent[layer], entry.rope_key[layer]
            if not context.absorbed:
                attended = expanded_attention(q_nope, q_rope, cached_latent, cached_rope, params["kv_b"], context.mask,
                                              config)
            elif self.latent_parallel is not None:
                attended = latent_parallel_attention(self.sharding, self.latent_parallel, config, q_nope, q_rope,
                                                     cached_latent, cached_rope, params["kv_b"], context.mask,
                                                     self.chain_kernel(config) if context.use_kernels else None,
                                                     context.write_slots)
            elif context.use_kernels:
                attended = self.kernel_attend(config, params, q_nope, q_rope, cached_latent, cached_rope,
                                              context.write_slots)
            else:
                w_uk, w_uv = split_kv_b(params["kv_b"], config)
                attended = absorbed_attention(q_nope, q_rope, cached_latent, cached_rope, w_uk, w_uv, context.mask,
                                              softmax_scale(config))
        batch, length = normed.shape[:2]
        return attended.reshape(batch, length, -1) @ params["o"], entry

    def queries(self, params, config, normed, context) -> tuple[jax.Array, jax.Array]:
        """q^C [B, T, H, dn] and RoPE-rotated q^R [B, T, H, dr] of the chunk normed [B, T, D]."""
        mla = config.mla
        if mla.q_lora_rank is None:
            q = normed @ params["q"]
        else:
            q = rms_norm(normed @ params["q_a"], params["q_a_norm"], mla.norm_eps) @ params["q_b"]
        q = q.reshape(*normed.shape[:2], config.num_heads, mla.qk_head_dim)
        return q[..., :mla.qk_nope_head_dim], apply_rope(q[..., mla.qk_nope_head_dim:], context.cos, context.sin)

    def latents(self, params, config, normed, context) -> tuple[jax.Array, jax.Array]:
        """The chunk's normalised latents c [B, T, r] and rotated RoPE keys k^R [B, T, dr]: what the cache holds."""
        mla = config.mla
        compressed = normed @ params["kv_a"]
        latent = rms_norm(compressed[..., :mla.kv_lora_rank], params["kv_a_norm"], mla.norm_eps)
        rope_key = apply_rope(compressed[..., None, mla.kv_lora_rank:], context.cos, context.sin)[:, :, 0]
        return latent, rope_key

    def kernel_attend(
        self,
        config: Any,
        params: dict[str, jax.Array],
        q_nope: jax.Array,  # [B, T, H, dn], T <= MAX_CHAIN_TOKENS
        q_rope: jax.Array,  # [B, T, H, dr]
        latent: jax.Array,  # [B, S, r], this chunk's latents already written
        rope_key: jax.Array,  # [B, S, dr]
        write_slots: jax.Array,  # [B, T] int32
    ) -> jax.Array:  # [B, T, H, dv]
        """Causal-chain decode attention through the MLA kernel: W_UK folded into the queries, the cache read as one
        KV head (keys [c ; k^R], values c), W_UV applied after. Row b's token t sits at slot write_slots[b, 0] + t
        (see jspec/models/attention/full.py for when that is the default causal mask). Guarantee: equals
        `absorbed_attention` with the causal-by-slot mask (to float32 accumulation). On a mesh the query heads split
        over the model axis (the latent, shared by every head, stays whole on each device) and rows over data."""
        w_uk, w_uv = split_kv_b(params["kv_b"], config)
        kernel = self.chain_kernel(config)

        def attend_heads(q_nope, q_rope, latent, rope_key, w_uk, w_uv, write_slots):
            q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
            return jnp.einsum("bthr,rhv->bthv", kernel(q_latent, q_rope, latent, rope_key, write_slots), w_uv)

        if self.sharding is None:
            return attend_heads(q_nope, q_rope, latent, rope_key, w_uk, w_uv, write_slots)
        rows = self.sharding.spec(("batch",))[0] if q_nope.shape[0] % self.sharding.axis_size("batch") == 0 else None
        heads = self.sharding.spec(("q_heads",), (config.num_heads,))[0]
        by_head = P(rows, None, heads)
        return jax.shard_map(attend_heads, mesh=self.sharding.mesh, out_specs=by_head, check_vma=False,
                             in_specs=(by_head, by_head, P(rows), P(rows), P(None, heads), P(None, heads), P(rows)))(
            q_nope, q_rope, latent, rope_key, w_uk, w_uv, write_slots)

    def chain_kernel(self, config: Any):
        """(q_latent [B, T, H, r'], q_rope [B, T, H, dr'], latent [B, S, r'], rope_key [B, S, dr'], write_slots [B, T])
        -> [B, T, H, r']: the MLA decode kernel over a causal chain at write_slots[b, 0] + t (r', dr' may be TPLA
        slices)."""
        scale = softmax_scale(config)

        def kernel(q_latent, q_rope, latent, rope_key, write_slots):
            seq_lens = jnp.clip(write_slots[:, 0] + q_latent.shape[1], 0, latent.shape[1]).astype(jnp.int32)
            return mla_decode_attention(q_latent, q_rope, latent, rope_key, seq_lens, scale=scale,
                                        block_size=self.block_size, interpret=self.interpret)[0]

        return kernel

    def finish(self, entry: Any, context: Any) -> Any:
        return entry


def latent_parallel_attention(
    sharding: Any,
    options: LatentParallel,
    config: Any,
    q_nope: jax.Array,  # [B, T, H, dn]
    q_rope: jax.Array,  # [B, T, H, dr]
    latent: jax.Array,  # [B, S, r], split over the model axis on r
    rope_key: jax.Array,  # [B, S, dr], replicated or split on dr
    kv_b: jax.Array,  # [r, H * (dn + dv)], split on r
    mask: jax.Array | None,  # [B, T, S]; None with `kernel`
    kernel: Any = None,  # `MLAAttention.chain_kernel`: each shard attends through the MLA decode kernel
    write_slots: jax.Array | None = None,  # [B, T], the chain's slots (with `kernel`)
) -> jax.Array:  # [B, T, H, dv]
    """TPLA decode attention: under `jax.shard_map` each device of the model axis attends over its latent slice
    (r/g values per token: its own softmax over its partial logits, plus the RoPE term, replicated or split), applies
    its slice of W_UV, and one psum sums the g partial head outputs. Exact for g = 1; an approximation for g > 1
    (one softmax per shard). Rows split over the data axis when it divides the batch. With `kernel`, each shard runs
    the MLA decode kernel over its slices (causal chain at `write_slots`) instead of the XLA absorbed form."""
    w_uk, w_uv = split_kv_b(kv_b, config)
    axis = dict(sharding.rules).get("latent")
    shards = sharding.axis_size("latent")
    rows = sharding.spec(("batch",))[0] if q_nope.shape[0] % sharding.axis_size("batch") == 0 else None
    split_rope = options.rope == "split"
    rope_axis = axis if split_rope else None
    nope_scale = float(shards) if options.rescale else 1.0
    rope_scale = nope_scale if split_rope else 1.0
    scale = softmax_scale(config)

    def shard(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask_or_slots):
        if kernel is None:
            out = absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask_or_slots, scale, nope_scale,
                                     rope_scale)
        else:
            q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk) * nope_scale
            out = jnp.einsum("bthr,rhv->bthv", kernel(q_latent, q_rope * rope_scale, latent, rope_key, mask_or_slots),
                             w_uv)
        return jax.lax.psum(out, axis)

    in_specs = (P(rows), P(rows, None, None, rope_axis), P(rows, None, axis), P(rows, None, rope_axis), P(axis),
                P(axis), P(rows))
    return jax.shard_map(shard, mesh=sharding.mesh, in_specs=in_specs, out_specs=P(rows), check_vma=False)(
        q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask if kernel is None else write_slots)


def mla_attention(config: Any, kernels: Any, layer: int) -> MLAAttention:
    """The "mla" kind for `kernels`: XLA, or the Pallas MLA decode kernel (attention_impl="pallas_dense")."""
    if config.mla is None:
        raise ValueError(f"layer_types: layer {layer} is 'mla', which needs TransformerConfig.mla, got None")
    if kernels.attention_impl not in ("xla", "pallas_dense"):
        raise ValueError(f"attention_impl: layer {layer} is 'mla', which attention_impl={kernels.attention_impl!r} "
                         "cannot serve (MLA has a dense decode kernel, no sparse one); use 'xla' or 'pallas_dense'")
    latent_parallel = getattr(kernels, "latent_parallel", None)
    if latent_parallel is not None and kernels.sharding is None:
        raise ValueError("latent_parallel: TPLA needs a mesh (build the model with jspec.tpla(model, mesh))")
    return MLAAttention(kernels.sharding, latent_parallel, kernels.attention_impl, kernels.attention_interpret,
                        kernels.mla_block_size)
