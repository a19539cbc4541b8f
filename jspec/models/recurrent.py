"""Recurrent-depth language models (Huginn-0125 / Raven, Geiping et al. 2025) as pure functions over a parameter
pytree, and `RecurrentModel`, the `jspec.Model` protocol over them.

The computation (seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py):

    e      = prelude(embed(tokens) * sqrt(D))                       prelude layers, run once
    s_0    = init_scale * trunc_normal(std, +-3 std) * sqrt(D)        std = sqrt(2 / (5 D)); init_scale 0: zeros
    s_i+1  = core(adapter([s_i ; e]))                                 the core layers, iterated r times
    logits = head(ln_f(coda(ln_f(s_r))))                              coda layers; ln_f used twice; head tied

Every layer is a sandwich block: x = n2(attn(n1 x) + x); x = n4(mlp(n3 x) + x), with multi-head attention (a
bias on q and k, none on v), RoPE, and a SwiGLU MLP. r is a traced value: the core runs in a `lax.while_loop`,
so changing r never recompiles and compile time does not grow with r.

Parameter pytree (hidden D, heads H, head dim Dh, MLP F, vocab V; each layer stack [L, ...] for its L layers):
    embed    [V, D]
    prelude, core, coda: {norm_1, norm_2, norm_3, norm_4 [L, D], q, k, v [L, D, H*Dh], o [L, H*Dh, D],
                          q_bias, k_bias [L, H*Dh] (qk_bias), gate, up [L, D, F], down [L, F, D]}
    adapter  [2D, D]    (input injection over the concatenation [state ; prelude output])
    final_norm [D]      (ln_f)
    lm_head  [D, V]     (absent when embeddings are tied, as in Huginn-0125)
RoPE runs in the rotate-half convention of `jspec.models.layers`; the Huginn checkpoint's interleaved
(complex) convention is converted on load by a permutation of q/k features (jspec/checkpoint/huginn.py), exact.

The cache (`new_cache`): entries (prelude K/V [P, ...], core K/V [R * C, ...], coda K/V [N, ...]) for P prelude,
C core and N coda layers, each a `KVEntry` indexed by logical slot. Core layer l at recurrence i reads and writes
core entry layer min(i, R - 1) * C + l:
- cache "exact" (R = the recurrences it was made for): every recurrence has its own K/V, as in a model of
  P + R*C + N layers. Guarantee: cached decoding equals full recomputation of the sequence (the no-cache forward)
  at the same r, for any r <= R. When a row exits a token early (adaptive exit, at k recurrences), the K/V of
  recurrences k..R-1 at that position are copies of recurrence k-1's (the reference's "latest" lookup).
- cache "shared" (R = 1; the reference's compressed "compress-s4" scheme for its C = 4 core layers): all
  recurrences share the C core slots and the latest write wins, so the cache is as large as a P + C + N layer
  model's. A later token at recurrence i reads the earlier positions' K/V from their LAST recurrence, not from
  recurrence i. Guarantee: exact (equal to full recomputation) for r = 1, and for every position of one forward
  call (a prefill: all positions are written by the same recurrences); from the second generated token on with
  r > 1 it is an approximation (measured in tests/test_recurrent.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jspec.cache import Cache
from jspec.models.attention.full import FullAttention, KVEntry
from jspec.models.attention.base import kv_axes
from jspec.models.config import DTYPES, TransformerConfig
from jspec.models.kernels import KernelOptions
from jspec.models.layers import rms_norm

Params = dict[str, Any]
CACHE_KINDS = ("exact", "shared")
STACKS = ("prelude", "core", "coda")
ATTENTION = FullAttention()  # XLA grouped-query attention over a slot-indexed cache, reused as is


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """Static description of a recurrent-depth model (hashable: static metadata under jit)."""

    vocab_size: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_prelude_layers: int = 2
    num_core_layers: int = 4
    num_coda_layers: int = 2
    mean_recurrence: int = 32  # r at evaluation, and the default r of a decode
    mean_backprop_depth: int = 8  # training: gradients flow through the last (at most) this many recurrences
    rope_theta: float = 50000.0
    rms_norm_eps: float = 1e-6
    qk_bias: bool = True
    tie_embeddings: bool = True
    dtype: str = "float32"
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    name: str = "recurrent"
    family: str = "recurrent"  # tells config readers (jspec.train) which model family this is

    # what strategies of other families ask a model's config
    mask_token_id = None
    diffusion = None
    shifted_logits = False

    def __post_init__(self):
        for field in ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "num_core_layers",
                      "mean_recurrence", "mean_backprop_depth"):
            _require(_is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "a positive int", getattr(self, field))
        for field in ("num_prelude_layers", "num_coda_layers"):
            _require(_is_int(getattr(self, field)) and getattr(self, field) >= 0, field, "an int >= 0", getattr(self, field))
        _require(self.hidden_size % self.num_heads == 0, "num_heads", f"a divisor of hidden_size={self.hidden_size}",
                 self.num_heads)
        _require(self.head_size % 2 == 0, "num_heads", "a head count giving an even head size (RoPE rotates pairs)",
                 self.num_heads)
        _require(self.dtype in DTYPES, "dtype", f"one of {DTYPES}", self.dtype)
        _require(self.family == "recurrent", "family", "'recurrent'", self.family)
        if isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:  # multi-head attention
        return self.num_heads

    @property
    def num_layers(self) -> int:
        """Physical layers (prelude + core + coda); the effective depth is prelude + r * core + coda."""
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def state_std(self) -> float:
        """Standard deviation of the random initial state (before the sqrt(D) scale), as Huginn's init."""
        return math.sqrt(2 / (5 * self.hidden_size))

    @property
    def attention_config(self) -> TransformerConfig:
        """The attention's view of this model (what `FullAttention` reads: heads, head size, RoPE, dtype)."""
        return TransformerConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=1, num_heads=self.num_heads,
            num_kv_heads=self.num_heads, intermediate_size=self.intermediate_size, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, qkv_bias=True, dtype=self.dtype,
            max_position_embeddings=self.max_position_embeddings)

    def stack_layers(self, stack: str) -> int:
        return {"prelude": self.num_prelude_layers, "core": self.num_core_layers, "coda": self.num_coda_layers}[stack]

    def replace(self, **changes: Any) -> "RecurrentConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RecurrentConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"RecurrentConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> "RecurrentConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def num_parameters(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        per_layer = 4 * d * d + 3 * d * f + 4 * d + (2 * d if self.qk_bias else 0)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + 2 * d * d + embed + d


def is_recurrent_config(values: dict[str, Any]) -> bool:
    """Whether a config dict (a training recipe's "model") describes a recurrent-depth model."""
    return values.get("family") == "recurrent"


# --- parameters -------------------------------------------------------------------------------------------


def init_params(config: RecurrentConfig, key: jax.Array, init_scale: float = 0.02) -> Params:
    """Random parameters: weights ~ N(0, init_scale^2), output projections (o, down) scaled by
    1/sqrt(2 * effective depth) as Huginn's init does, norms = 1, q/k biases = 0."""
    dtype = jnp.dtype(config.dtype)
    d, f, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_heads * config.head_size
    depth = config.num_prelude_layers + config.num_coda_layers + config.num_core_layers * config.mean_recurrence
    out_scale = 1.0 / math.sqrt(2 * depth)
    keys = iter(jax.random.split(key, 3 + 7 * config.num_layers))

    def normal(shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
        return (init_scale * scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def layer() -> Params:
        params = {"norm_1": jnp.ones((d,), dtype), "q": normal((d, hd)), "k": normal((d, hd)), "v": normal((d, hd)),
                  "o": normal((hd, d), out_scale), "norm_2": jnp.ones((d,), dtype), "norm_3": jnp.ones((d,), dtype),
                  "gate": normal((d, f)), "up": normal((d, f)), "down": normal((f, d), out_scale),
                  "norm_4": jnp.ones((d,), dtype)}
        if config.qk_bias:
            params.update(q_bias=jnp.zeros((hd,), dtype), k_bias=jnp.zeros((hd,), dtype))
        return params

    params: Params = {"embed": normal((v, d))}
    for stack in STACKS:
        params[stack] = stack_layers([layer() for _ in range(config.stack_layers(stack))], d, dtype, config)
    params["adapter"] = normal((2 * d, d))
    params["final_norm"] = jnp.ones((d,), dtype)
    if not config.tie_embeddings:
        params["lm_head"] = normal((d, v))
    return params


def stack_layers(layers: list[Params], hidden: int, dtype: Any, config: RecurrentConfig) -> Params:
    """Per-layer dicts -> one dict of leaves stacked over the layers (an empty stack keeps [0, ...] leaves)."""
    if layers:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    hd, f = config.num_heads * config.head_size, config.intermediate_size
    shapes = {"norm_1": (hidden,), "q": (hidden, hd), "k": (hidden, hd), "v": (hidden, hd), "o": (hd, hidden),
              "norm_2": (hidden,), "norm_3": (hidden,), "gate": (hidden, f), "up": (hidden, f), "down": (f, hidden),
              "norm_4": (hidden,)}
    if config.qk_bias:
        shapes.update(q_bias=(hd,), k_bias=(hd,))
    return {name: jnp.zeros((0, *shape), dtype) for name, shape in shapes.items()}


def param_logical_axes(config: RecurrentConfig) -> Params:
    """Logical axis names per parameter leaf (see `jspec.sharding`); layer stacks lead with "layers"."""
    layer = {"norm_1": ("embed",), "q": ("embed", "q_heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"),
             "o": ("q_heads", "embed"), "norm_2": ("embed",), "norm_3": ("embed",), "gate": ("embed", "mlp"),
             "up": ("embed", "mlp"), "down": ("mlp", "embed"), "norm_4": ("embed",)}
    if config.qk_bias:
        layer.update(q_bias=("q_heads",), k_bias=("kv_heads",))
    stacked = {name: ("layers", *axes) for name, axes in layer.items()}
    axes: Params = {"embed": ("vocab", "embed"), **{stack: dict(stacked) for stack in STACKS},
                    "adapter": ("embed", "embed"), "final_norm": ("embed",)}
    if not config.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


# --- the cache --------------------------------------------------------------------------------------------


def cache_recurrence_slots(kind: str, recurrences: int) -> int:
    """R, the core K/V copies a cache holds: one per recurrence ("exact"), or one shared ("shared")."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache: expected one of {CACHE_KINDS}, got {kind!r}")
    return int(recurrences) if kind == "exact" else 1


def new_cache(config: RecurrentConfig, batch_size: int, capacity: int, recurrence_slots: int) -> Cache:
    """An empty cache of `capacity` slots per row whose core entry holds `recurrence_slots` K/V copies per core
    layer (see the module docstring)."""
    from jspec.validation import check_int

    check_int("capacity", capacity, minimum=1)
    check_int("recurrence_slots", recurrence_slots, minimum=1)
    attention = config.attention_config
    layers = (config.num_prelude_layers, recurrence_slots * config.num_core_layers, config.num_coda_layers)
    entries = tuple(ATTENTION.new_entry(attention, max(count, 1), batch_size, int(capacity), int(capacity))
                    for count in layers)
    return Cache(entries=entries, lengths=jnp.zeros((batch_size,), jnp.int32), capacity=int(capacity))


def cache_logical_axes() -> Cache:
    entry = KVEntry(keys=kv_axes(), values=kv_axes())
    return Cache(entries=(entry, entry, entry), lengths=("batch",), capacity=0)


def core_recurrence_slots(cache: Cache, config: RecurrentConfig) -> int:
    """R of a cache: the core K/V copies per core layer it holds."""
    return cache.entries[1].keys.shape[0] // config.num_core_layers


# --- the computation --------------------------------------------------------------------------------------


def attention_context(
    config: RecurrentConfig,
    positions: jax.Array,  # [B, T]
    cache: Cache | None,
    write_slots: jax.Array | None,  # [B, T]
    mask: jax.Array | None,  # [B, T, S]
) -> Any:
    """What every layer of one forward shares: rotary tables and the mask (causal by slot unless given)."""
    if cache is not None and write_slots is None:
        write_slots = cache.lengths[:, None] + jnp.arange(positions.shape[1], dtype=jnp.int32)[None, :]
    entry = None if cache is None else cache.entries[0]
    capacity = None if cache is None else cache.capacity
    return ATTENTION.prepare(config.attention_config, entry, positions, write_slots, mask, capacity)


def sandwich_block(
    layer: Params,  # one layer's leaves
    config: RecurrentConfig,
    hidden: jax.Array,  # [B, T, D]
    entry: KVEntry | None,
    entry_layer: jax.Array | int,  # the layer of `entry` this block reads and writes
    context: Any,
) -> tuple[jax.Array, KVEntry | None]:
    """x = n2(attn(n1 x) + x); x = n4(mlp(n3 x) + x)."""
    eps = config.rms_norm_eps
    attention = {name: layer[name] for name in ("q", "k", "v", "o")}
    hd = config.num_heads * config.head_size
    zeros = jnp.zeros((hd,), hidden.dtype)
    attention.update(q_bias=layer.get("q_bias", zeros), k_bias=layer.get("k_bias", zeros), v_bias=zeros)
    attended, entry = ATTENTION.apply(attention, config.attention_config, rms_norm(hidden, layer["norm_1"], eps),
                                      entry, entry_layer, context)
    hidden = rms_norm(attended + hidden, layer["norm_2"], eps)
    normed = rms_norm(hidden, layer["norm_3"], eps)
    mlp = (jax.nn.silu(normed @ layer["gate"]) * (normed @ layer["up"])) @ layer["down"]
    return rms_norm(mlp + hidden, layer["norm_4"], eps), entry


def _run_stack(params: Params, config: RecurrentConfig, stack: str, hidden: jax.Array, cache: Cache | None,
               context: Any, first_entry_layer: jax.Array | int = 0) -> tuple[jax.Array, Cache | None]:
    """The layers of one stack in order (unrolled: a stack is a few layers; the core's recurrence is the loop)."""
    index = STACKS.index(stack)
    entry = None if cache is None else cache.entries[index]
    for layer in range(config.stack_layers(stack)):
        leaves = jax.tree.map(lambda x: x[layer], params[stack])
        hidden, entry = sandwich_block(leaves, config, hidden, entry, first_entry_layer + layer, context)
    if cache is not None:
        entries = list(cache.entries)
        entries[index] = entry
        cache = cache.replace(entries=tuple(entries))
    return hidden, cache


def embed(params: Params, config: RecurrentConfig, tokens: jax.Array, cache: Cache | None, context: Any
          ) -> tuple[jax.Array, Cache | None]:  # tokens [B, T] -> e [B, T, D]
    """The prelude output e: embeddings scaled by sqrt(D), then the prelude layers (writing their K/V)."""
    hidden = params["embed"][tokens] * jnp.asarray(config.embed_scale, params["embed"].dtype)
    return _run_stack(params, config, "prelude", hidden, cache, context)


def initial_state(
    config: RecurrentConfig,
    key: jax.Array | None,
    positions: jax.Array,  # [B, T]
    init_scale: Any,
    dtype: Any,
) -> jax.Array:  # [B, T, D]
    """s_0: init_scale * std * trunc_normal(-3, 3) * sqrt(D) per position (Huginn's "like-init"); zeros when
    init_scale is 0 or key is None. The draw of row b at position p depends only on (key, b, p), so a row's
    state does not depend on the chunk it is computed in."""
    shape = (*positions.shape, config.hidden_size)
    if key is None:
        return jnp.zeros(shape, dtype)

    def draw(row: jax.Array, position: jax.Array) -> jax.Array:
        return jax.random.truncated_normal(jax.random.fold_in(jax.random.fold_in(key, row), position), -3.0, 3.0,
                                           (config.hidden_size,), jnp.float32)

    rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    noise = jax.vmap(jax.vmap(draw))(rows, positions)
    scale = jnp.asarray(init_scale, jnp.float32) * config.state_std * config.embed_scale
    return (noise * scale).astype(dtype)


def core_step(
    params: Params,
    config: RecurrentConfig,
    state: jax.Array,  # [B, T, D]
    embedded: jax.Array,  # [B, T, D]: the prelude output e
    recurrence: jax.Array | int,  # which recurrence this is (selects the core K/V copy)
    cache: Cache | None,
    context: Any,
) -> tuple[jax.Array, Cache | None]:
    """One recurrence: core(adapter([s ; e]))."""
    injected = jnp.concatenate([state, embedded], axis=-1) @ params["adapter"]
    first = None
    if cache is not None:
        slots = core_recurrence_slots(cache, config)
        first = jnp.minimum(jnp.asarray(recurrence, jnp.int32), slots - 1) * config.num_core_layers
    return _run_stack(params, config, "core", injected, cache, context, 0 if first is None else first)


def readout(params: Params, config: RecurrentConfig, state: jax.Array, cache: Cache | None, context: Any,
            output_indices: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    """head(ln_f(coda(ln_f(s)))) -> logits [B, T or K, V] float32. The coda runs on every position of the chunk
    (writing its K/V); the head only at `output_indices` [B, K] when given."""
    eps = config.rms_norm_eps
    hidden, cache = _run_stack(params, config, "coda", rms_norm(state, params["final_norm"], eps), cache, context)
    if output_indices is not None:
        hidden = jnp.take_along_axis(hidden, output_indices[:, :, None], axis=1)
    hidden = rms_norm(hidden, params["final_norm"], eps)
    head = params["embed"].T if config.tie_embeddings else params["lm_head"]
    return jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32), cache


def relative_change(new: jax.Array, old: jax.Array) -> jax.Array:  # [B, T, D] x2 -> [B]
    """||s_new - s_old|| / ||s_new|| per position, averaged over the chunk's positions (Huginn's latent-diff)."""
    new32, old32 = new.astype(jnp.float32), old.astype(jnp.float32)
    change = jnp.linalg.norm(new32 - old32, axis=-1) / jnp.maximum(jnp.linalg.norm(new32, axis=-1), 1e-30)
    return jnp.mean(change, axis=-1)


def readout_kl(new_logits: jax.Array, old_logprobs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KL(p_old || p_new) at the chunk's last position [B] (Huginn's "kl" exit) and the new log-probabilities."""
    logprobs = jax.nn.log_softmax(new_logits[:, -1].astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(old_logprobs) * (old_logprobs - logprobs), axis=-1)
    return kl, logprobs


EXIT_CRITERIA = ("none", "latent", "kl")


def recur(
    params: Params,
    config: RecurrentConfig,
    embedded: jax.Array,  # [B, T, D]
    state: jax.Array,  # [B, T, D]: s_0
    num_recurrences: Any,  # traced int: r (the most, with an exit criterion)
    cache: Cache | None,
    context: Any,
    criterion: str = "none",  # static: "none", "latent" (relative change of s), "kl" (between readouts)
    threshold: Any = 0.0,  # a row exits once its criterion value is below this (strictly)
    running: jax.Array | None = None,  # [B] bool: rows that compute (others keep s_0 and write nothing)
) -> tuple[jax.Array, Cache | None, jax.Array, jax.Array | None]:
    """Iterate the core up to r times in one `lax.while_loop`; each row stops at its own exit (per row: the chunk's
    positions of a row exit together). Returns (s, cache, recurrences run per row [B], the readout logits at the
    exit for "kl" or None). A row that has exited keeps its state and writes no more K/V (its write slots are
    dropped), so what it computes never depends on the other rows of the batch."""
    batch = state.shape[0]
    running = jnp.ones((batch,), bool) if running is None else running
    r = jnp.asarray(num_recurrences, jnp.int32)
    vocab = config.vocab_size
    old_logprobs = jnp.full((batch, vocab), -math.log(vocab), jnp.float32)
    exit_logits = jnp.zeros((batch, state.shape[1], vocab), jnp.float32) if criterion == "kl" else None
    base_slots = None if cache is None else context.write_slots

    def iterating_context(active: jax.Array) -> Any:  # rows not iterating write nowhere
        if base_slots is None:
            return context
        return dataclasses.replace(context, write_slots=jnp.where(active[:, None], base_slots, cache.capacity))

    def body(carry):
        i, s, cache, active, count, old_logprobs, exit_logits = carry
        step_context = iterating_context(active)
        new, cache = core_step(params, config, s, embedded, i, cache, step_context)
        keep = active[:, None, None]
        new = jnp.where(keep, new, s)
        if criterion == "latent":
            exits = relative_change(new, s) < threshold
        elif criterion == "kl":
            logits, cache = readout(params, config, new, cache, step_context)
            kl, logprobs = readout_kl(logits, old_logprobs)
            exit_logits = jnp.where(keep, logits, exit_logits)
            old_logprobs = jnp.where(active[:, None], logprobs, old_logprobs)
            exits = kl < threshold
        else:
            exits = jnp.zeros((batch,), bool)
        count = count + active.astype(jnp.int32)
        return i + 1, new, cache, active & ~exits, count, old_logprobs, exit_logits

    def cond(carry):
        i, _, _, active, *_ = carry
        return (i < r) & jnp.any(active)

    carry = (jnp.int32(0), state, cache, running, jnp.zeros((batch,), jnp.int32), old_logprobs, exit_logits)
    _, state, cache, _, count, _, exit_logits = jax.lax.while_loop(cond, body, carry)
    if cache is not None and criterion != "none" and core_recurrence_slots(cache, config) > 1:
        cache = fill_skipped_recurrences(cache, config, base_slots, count)
    return state, cache, count, exit_logits


def fill_skipped_recurrences(
    cache: Cache, config: RecurrentConfig, write_slots: jax.Array, count: jax.Array  # [B, T], [B]
) -> Cache:
    """Exact cache after an early exit: at the chunk's slots, core K/V copy i >= count[b] of row b becomes a copy of
    copy count[b] - 1 (the latest recurrence the row ran), so later tokens at any r read the row's latest state."""
    entry = cache.entries[1]
    layers, core = entry.keys.shape[0], config.num_core_layers
    recurrence = jnp.arange(layers) // core  # [L]
    source_recurrence = jnp.minimum(recurrence[None, :], jnp.maximum(count, 1)[:, None] - 1)  # [B, L]
    source = source_recurrence * core + (jnp.arange(layers) % core)[None, :]  # [B, L]
    slots = jnp.clip(write_slots, 0, cache.capacity - 1)  # [B, T]
    rows = jnp.arange(slots.shape[0])[:, None]
    valid = (write_slots >= 0) & (write_slots < cache.capacity)

    def fixed(buffer: jax.Array) -> jax.Array:  # [L, B, S, H, Dh]
        chunk = buffer[:, rows, slots]  # [L, B, T, H, Dh]
        moved = jnp.take_along_axis(chunk, source.T[:, :, None, None, None], axis=0)
        moved = jnp.where(valid[None, :, :, None, None], moved, chunk)
        return buffer.at[:, rows, slots].set(moved)

    entries = list(cache.entries)
    entries[1] = KVEntry(keys=fixed(entry.keys), values=fixed(entry.values))
    return cache.replace(entries=tuple(entries))


def run(
    params: Params,
    config: RecurrentConfig,
    tokens: jax.Array,  # [B, T] int32
    positions: jax.Array,  # [B, T] int32
    cache: Cache | None = None,
    mask: jax.Array | None = None,  # [B, T, S] over key slots; None: causal by slot
    *,
    write_slots: jax.Array | None = None,  # [B, T]; None: lengths + t
    output_indices: jax.Array | None = None,  # [B, K] chunk indices whose logits are wanted; None: all
    num_recurrences: Any = None,  # traced int r (the most, with an exit criterion); None: config.mean_recurrence
    init_scale: Any = 0.0,
    key: jax.Array | None = None,  # for s_0 when init_scale is not 0
    criterion: str = "none",  # static exit criterion (see `recur`)
    threshold: Any = 0.0,
    running: jax.Array | None = None,  # [B] bool: rows that compute (others write nothing)
) -> tuple[jax.Array, Cache | None, jax.Array]:  # logits [B, T or K, V] float32, cache, recurrences run [B]
    """The whole model on a chunk: prelude, up to r recurrences from s_0 (each row to its own exit), coda and head.
    With a cache, the chunk's K/V are written at `write_slots` (lengths are not changed: the caller commits), as
    `transformer.forward` does."""
    r = config.mean_recurrence if num_recurrences is None else num_recurrences
    context = attention_context(config, positions, cache, write_slots, mask)
    if running is not None and cache is not None:
        context = dataclasses.replace(context, write_slots=jnp.where(running[:, None], context.write_slots, cache.capacity))
    embedded, cache = embed(params, config, tokens, cache, context)
    state = initial_state(config, key if _nonzero(init_scale) else None, positions, init_scale, embedded.dtype)
    state, cache, count, exit_logits = recur(params, config, embedded, state, r, cache, context, criterion, threshold,
                                             running)
    if exit_logits is None:
        logits, cache = readout(params, config, state, cache, context, output_indices)
    else:  # the "kl" criterion read out (and wrote the coda's K/V) at each row's exit
        logits = exit_logits if output_indices is None else jnp.take_along_axis(exit_logits, output_indices[:, :, None], axis=1)
    return logits, cache, count


def forward(params: Params, config: RecurrentConfig, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None,
            mask: jax.Array | None = None, **options: Any) -> tuple[jax.Array, Cache | None]:
    """`run` without its recurrence counts: the `transformer.forward` signature (logits, cache)."""
    logits, cache, _ = run(params, config, tokens, positions, cache, mask, **options)
    return logits, cache


def _nonzero(value: Any) -> bool:
    """False only for a concrete zero (a traced value may be anything)."""
    try:
        return float(value) != 0.0
    except (TypeError, jax.errors.ConcretizationTypeError):
        return True


# --- the model --------------------------------------------------------------------------------------------


@struct.dataclass
class RecurrentOptions:
    """How `RecurrentModel.forward` runs when a strategy does not say: r, the initial state and the cache."""

    num_recurrences: Any = None  # traced; None: config.mean_recurrence
    init_scale: Any = 0.0  # traced; 0: s_0 = 0 (deterministic)
    key: Any = None  # PRNG key for s_0 (with init_scale > 0)
    cache: str = struct.field(pytree_node=False, default="exact")
    cache_recurrences: int | None = struct.field(pytree_node=False, default=None)  # R of an exact cache; None: r


@struct.dataclass
class RecurrentModel:
    """A recurrent-depth model behind the `jspec.Model` protocol (forward, new_cache, param/cache axes), so
    `jspec.decode` / `stream`, `jspec.load` / `save` and every strategy take it. Generic strategies run it at
    `options` (default: r = config.mean_recurrence, s_0 = 0, the exact cache); the recurrent strategies
    (jspec/strategies/recurrent.py) drive its pieces directly."""

    params: Params
    config: RecurrentConfig = struct.field(pytree_node=False)
    tokenizer: Any = struct.field(pytree_node=False, default=None)
    kernels: KernelOptions = struct.field(pytree_node=False, default=KernelOptions())
    options: RecurrentOptions = RecurrentOptions()

    def __post_init__(self):
        if self.kernels.attention_impl != "xla":
            raise ValueError(f"kernels: a recurrent-depth model attends with XLA only, got attention_impl="
                             f"{self.kernels.attention_impl!r}")

    @classmethod
    def random(cls, config: RecurrentConfig, key: jax.Array | int = 0, init_scale: float = 0.02, tokenizer: Any = None,
               kernels: KernelOptions | None = None) -> "RecurrentModel":
        if isinstance(key, int):
            key = jax.random.key(key)
        return cls(params=init_params(config, key, init_scale), config=config, tokenizer=tokenizer,
                   kernels=kernels or KernelOptions())

    @property
    def num_recurrences(self) -> Any:
        return self.config.mean_recurrence if self.options.num_recurrences is None else self.options.num_recurrences

    def forward(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None,
                mask: jax.Array | None = None, **options: Any) -> tuple[jax.Array, Cache | None]:
        """`recurrent.forward` with this model's parameters and options (keyword options override them).
        `skip_layers` is refused (a recurrent model has no layer to skip)."""
        if options.pop("skip_layers", ()):
            raise ValueError("skip_layers: a recurrent-depth model has no layers to skip")
        logits, cache, _ = self.run(tokens, positions, cache, mask, **options)
        return logits, cache

    def run(self, tokens: jax.Array, positions: jax.Array, cache: Cache | None = None, mask: jax.Array | None = None,
            **options: Any) -> tuple[jax.Array, Cache | None, jax.Array]:
        """`recurrent.run` (logits, cache, recurrences per row) with this model's parameters and options."""
        bound = dict(num_recurrences=self.num_recurrences, init_scale=self.options.init_scale, key=self.options.key)
        logits, cache, count = run(self.params, self.config, tokens, positions, cache, mask, **{**bound, **options})
        if self.sharding is not None and cache is not None:
            cache = self.sharding.constrain(cache, self.cache_axes)
        return logits, cache, count

    def new_cache(self, batch_size: int, capacity: int, *, max_chunk: int | None = None,
                  cache: str | None = None, recurrences: int | None = None) -> Cache:
        """An empty cache (see the module docstring): kind `cache` ("exact" / "shared"; default the options'),
        with R = `recurrences` core copies when exact (default the options' cache_recurrences, else r, which must
        then be a concrete int)."""
        del max_chunk  # full attention: no ring buffer to bound
        kind = cache or self.options.cache
        if recurrences is None:
            recurrences = self.options.cache_recurrences
        if recurrences is None and kind == "exact":
            recurrences = int(self.num_recurrences)
        made = new_cache(self.config, batch_size, capacity, cache_recurrence_slots(kind, recurrences))
        if self.sharding is not None:
            made = self.sharding.constrain(made, self.cache_axes)
        return made

    def with_options(self, **options: Any) -> "RecurrentModel":
        """The same model running generic strategies with other `RecurrentOptions` (num_recurrences, init_scale,
        key, cache, cache_recurrences)."""
        return self.replace(options=self.options.replace(**options))

    def with_kernels(self, **options: Any) -> "RecurrentModel":
        return self.replace(kernels=self.kernels.replace(**options))

    def without_tokenizer(self) -> "RecurrentModel":
        return self if self.tokenizer is None else self.replace(tokenizer=None)

    @property
    def sharding(self) -> Any:
        return self.kernels.sharding

    @property
    def param_axes(self) -> Params:
        return param_logical_axes(self.config)

    @property
    def cache_axes(self) -> Cache:
        return cache_logical_axes()

    @property
    def cache_size_multiple(self) -> int:
        return 1

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def num_parameters(self) -> int:
        return sum(leaf.size for leaf in jax.tree.leaves(self.params))


def is_recurrent(model: Any) -> bool:
    return isinstance(model, RecurrentModel)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(ok: bool, name: str, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"RecurrentConfig.{name}: expected {expected}, got {got!r}")
