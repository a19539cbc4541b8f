"""Attention kinds behind the model protocol: sliding windows with a ring-buffer cache bounded by the window,
per-layer kinds, bad layer configurations, and a toy kind defined here that every strategy decodes with no change
to jspec/strategies/."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import jspec
from conftest import naive_greedy, tiny_model
from jspec import masks
from jspec.cache import move_slots, scatter_layer_rows, take_rows
from jspec.models import transformer
from jspec.models.attention import register_attention_kind
from jspec.strategies.base import resolve_strategy

WINDOW = 5  # conftest's mistral_window family
RAGGED = [[5, 17, 3], [9, 2, 44, 61, 7, 12, 30, 8], [1], [88, 3, 3, 3, 3, 3, 40]]


def init_cache_shape(model, strategy_name, prompts, max_new_tokens, **options):
    """The cache a strategy's init builds (shapes only: nothing is computed)."""
    from jspec.decode import build_prompts

    strategy = resolve_strategy(strategy_name, options)
    request = build_prompts(model, prompts, max_new_tokens, None, [], None, strategy)
    return jax.eval_shape(lambda: strategy.init(model, request, jax.random.key(0))).cache


@pytest.fixture(scope="module")
def window_model():
    return tiny_model("mistral_window", num_layers=3)


def test_ring_buffer_decodes_4w_tokens_bounded_by_the_window(window_model):
    new_tokens = 4 * WINDOW
    out = jspec.decode(window_model, RAGGED, max_new_tokens=new_tokens, stop_tokens=[])
    for prompt, row in zip(RAGGED, out.sequences()):
        assert row == naive_greedy(window_model, prompt, new_tokens)
    cache = init_cache_shape(window_model, "greedy", RAGGED, new_tokens)
    assert cache.capacity == 16 + 32  # logical slots: the padded prompt and the output bucket of 20 new tokens
    assert len(cache.entries) == 3  # one ring per layer (a short stack is unrolled)
    for ring in cache.entries:
        assert ring.keys.shape == (1, len(RAGGED), WINDOW + 1, 2, 8)  # physical slots: the window + one decode token
        assert ring.slots.shape == (len(RAGGED), WINDOW + 1)
    deep = tiny_model("mistral_window", num_layers=6)
    (stacked,) = init_cache_shape(deep, "greedy", RAGGED, new_tokens).entries  # a deep stack: one scanned entry
    assert stacked.keys.shape == (6, len(RAGGED), WINDOW + 1, 2, 8)


def test_ring_buffer_equals_a_full_size_ring(window_model):
    """The bounded ring (window + chunk) gives the logits of a ring as large as the cache, step by step."""
    prompts = np.asarray([[5, 17, 3, 9, 2, 44, 61, 7], [9, 2, 44, 1, 0, 0, 0, 0]])
    lengths = np.asarray([8, 4])
    bounded, full = window_model.new_cache(2, 40, max_chunk=1), window_model.new_cache(2, 40)
    assert bounded.entries[0].keys.shape[2] == WINDOW + 1 and full.entries[0].keys.shape[2] == 40
    positions = np.broadcast_to(np.arange(8), (2, 8))
    slots = np.where(positions < lengths[:, None], positions, 40)
    outputs = []
    for cache in (bounded, full):
        logits, cache = window_model.forward(prompts, positions, cache, write_slots=slots,
                                             output_indices=jnp.asarray(lengths - 1)[:, None])
        cache, token, steps = cache.with_lengths(lengths), jnp.argmax(logits[:, 0], -1), []
        for _ in range(3 * WINDOW):
            logits, cache = window_model.forward(token[:, None], cache.lengths[:, None], cache)
            cache = cache.with_lengths(cache.lengths + 1)
            token = jnp.argmax(logits[:, 0], -1)
            steps.append(np.asarray(logits[:, 0]))
        outputs.append(np.stack(steps))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, options", [
    ("speculative-tree", dict(tree=(2, 2, 1))),
    ("speculative-chain", dict(num_draft_tokens=4)),
    ("self_speculative", dict(skip_layers=(1,), tree=(2, 1))),
    ("prompt_lookup", dict(num_draft_tokens=3)),
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_speculative_with_rollback_over_the_ring_equals_greedy(window_model, name, options, dtype):
    """Lossless in the dtype users run: token-identical to greedy in float32 and in bfloat16 (on this CPU)."""
    new_tokens = 4 * WINDOW
    strategy = name.split("-")[0]
    if dtype != "float32":
        window_model = tiny_model("mistral_window", num_layers=3, dtype=dtype)
    if strategy == "speculative":
        options = dict(options, draft=tiny_model("mistral_window", seed=1, num_layers=1, dtype=dtype))
    want = jspec.decode(window_model, RAGGED, max_new_tokens=new_tokens, stop_tokens=[])
    got = jspec.decode(window_model, RAGGED, strategy, max_new_tokens=new_tokens, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()
    cache = init_cache_shape(window_model, strategy, RAGGED, new_tokens, **options)
    chunk = resolve_strategy(strategy, options).cache_headroom()  # the draft tree + the pending token
    assert all(entry.keys.shape[2] == WINDOW + chunk < cache.capacity for entry in cache.entries)


def test_window_changes_logits_of_long_sequences():
    """The test models are in the regime where the window matters (otherwise the tests above prove nothing)."""
    windowed = tiny_model("mistral_window")
    unwindowed = windowed.replace(config=windowed.config.replace(sliding_window=None))
    tokens = jnp.asarray([list(range(3, 3 + 4 * WINDOW))])
    positions = jnp.arange(4 * WINDOW)[None]
    a, _ = windowed.forward(tokens, positions)
    b, _ = unwindowed.forward(tokens, positions)
    np.testing.assert_allclose(a[:, :WINDOW], b[:, :WINDOW], atol=1e-5)
    assert np.abs(np.asarray(a[:, WINDOW:] - b[:, WINDOW:])).max() > 1e-2


def test_mixed_layer_kinds_group_and_decode():
    config_values = dict(sliding_window=3, layer_types=("full_attention", "sliding_attention", "sliding_attention",
                                                        "full_attention"), num_layers=4)
    model = tiny_model("llama", **config_values)
    assert [(name, start, end) for name, start, end in model.config.layer_groups] == [
        ("full_attention", 0, 1), ("sliding_attention", 1, 3), ("full_attention", 3, 4)]
    out = jspec.decode(model, RAGGED, max_new_tokens=12, stop_tokens=[])
    for prompt, row in zip(RAGGED, out.sequences()):
        assert row == naive_greedy(model, prompt, 12)


@pytest.mark.parametrize("changes, match", [
    (dict(layer_types=("full_attention", "bogus_attention")), "layer_types: layer 1 has unknown kind 'bogus_attention'"),
    (dict(layer_types=("full_attention",)), "layer_types: expected None or one attention kind per layer"),
    (dict(layer_types=("sliding_attention", "full_attention")), "sliding_window: layer 0 is 'sliding_attention'"),
    (dict(sliding_window=9000), "sliding_window: expected None or an int <= max_position_embeddings"),
    (dict(sliding_window=0), "sliding_window: expected None or an int >= 1"),
])
def test_bad_layer_configs_name_the_layer_and_field(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_model("llama", **changes)


def test_a_kernel_that_cannot_serve_a_layer_kind_raises():
    with pytest.raises(ValueError, match="sliding_window: layer 1 is 'sliding_attention'.*pallas_sparse"):
        tiny_model("llama", sliding_window=4, layer_types=("full_attention", "sliding_attention"),
                   attention_impl="pallas_sparse", head_dim=16, sparse_block_size=16, sparse_kernel_size=8,
                   sparse_kernel_stride=4, sparse_init_blocks=1, sparse_local_blocks=1)


def test_logical_axes_cover_every_parameter_and_cache_leaf():
    model = tiny_model("llama", num_layers=3, sliding_window=4, layer_types=("full_attention",) * 2 + ("sliding_attention",))
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(name, str) for name in x)  # noqa: E731
    param_axes = jax.tree.leaves(model.param_axes, is_leaf=is_axes)
    params = jax.tree.leaves(model.params)
    assert len(param_axes) == len(params) and all(len(a) == p.ndim for a, p in zip(param_axes, params))
    cache = model.new_cache(2, 16)
    cache_axes = jax.tree.leaves(model.cache_axes, is_leaf=is_axes)
    leaves = jax.tree.leaves(cache)
    assert len(cache_axes) == len(leaves) and all(len(a) == x.ndim for a, x in zip(cache_axes, leaves))
    assert model.cache_axes.entries[0].keys == ("layers", "batch", "seq", "kv_heads", "head_dim")


# --- a toy attention kind, defined here: no jspec module knows it ------------------------------------------


@struct.dataclass
class ToyEntry:
    values: jax.Array  # [L, B, S, D]

    def compact(self, source_slots, destination_start, capacity):
        return self.replace(values=move_slots(self.values, source_slots, destination_start))

    def gather_rows(self, rows):  # beams, samples, FreeDave's draft rows
        return self.replace(values=take_rows(self.values, rows))


@dataclasses.dataclass(frozen=True)
class ToyContext:
    mask: jax.Array  # [B, T, S]
    write_slots: jax.Array | None


@dataclasses.dataclass(frozen=True)
class ToyAttention:
    """Each query takes the plain average of the values it may see (no queries, no keys, no positions)."""

    def init_params(self, config, normal):
        return {"toy_value": normal((config.hidden_size, config.hidden_size)), "toy_out": normal((config.hidden_size, config.hidden_size))}

    def param_axes(self, config):
        return {"toy_value": ("embed", "embed"), "toy_out": ("embed", "embed")}

    def new_entry(self, config, num_layers, batch_size, capacity, chunk):
        return ToyEntry(jnp.zeros((num_layers, batch_size, capacity, config.hidden_size), config.dtype))

    def entry_axes(self, config):
        return ToyEntry(("layers", "batch", "seq", "embed"))

    def prepare(self, config, entry, positions, write_slots, mask, capacity):
        batch, length = positions.shape
        if mask is None:
            slots = write_slots if entry is not None else jnp.broadcast_to(jnp.arange(length), (batch, length))
            mask = masks.causal_mask(slots, capacity if entry is not None else length)
        return ToyContext(mask, write_slots)

    def apply(self, params, config, normed, entry, layer, context):
        values = normed @ params["toy_value"]  # [B, T, D]
        if entry is not None:
            entry = entry.replace(values=scatter_layer_rows(entry.values, layer, values, context.write_slots))
            values = entry.values[layer]
        weights = context.mask / jnp.maximum(context.mask.sum(-1, keepdims=True), 1)
        return jnp.einsum("bts,bsd->btd", weights.astype(values.dtype), values) @ params["toy_out"], entry

    def finish(self, entry, context):
        return entry


register_attention_kind("toy_attention", lambda config, kernels, layer: ToyAttention())
TOY_LAYERS = ("full_attention", "toy_attention", "toy_attention", "full_attention")


def toy_model(seed=0, **changes):
    return tiny_model("llama", seed=seed, num_layers=4, layer_types=TOY_LAYERS, **changes)


def test_toy_kind_incremental_decode_equals_full_forward():
    model = toy_model()
    tokens = jnp.asarray([[5, 17, 3, 9, 2, 44, 61]])
    full, _ = model.forward(tokens, jnp.arange(7)[None])
    cache = model.new_cache(1, 8)
    _, cache = model.forward(tokens[:, :4], jnp.arange(4)[None], cache)
    cache = cache.with_lengths(cache.lengths + 4)
    tail, _ = model.forward(tokens[:, 4:], jnp.arange(4, 7)[None], cache)
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 4:]), atol=1e-4)
    assert [axes["toy_value"] for axes in model.param_axes["groups"][1]] == [("embed", "embed")] * 2  # unrolled group
    deep = tiny_model("llama", num_layers=6, layer_types=("toy_attention",) * 5 + ("full_attention",))
    assert deep.param_axes["groups"][0]["toy_value"] == ("layers", "embed", "embed")  # stacked and scanned


@pytest.mark.parametrize("strategy, options", [
    ("speculative", dict(num_draft_tokens=3)),
    ("speculative", dict(tree=(2, 2))),
    ("self_speculative", dict(skip_layers=(1,), num_draft_tokens=3)),
    ("prompt_lookup", dict(num_draft_tokens=3)),
])
def test_every_autoregressive_strategy_decodes_a_toy_kind_model(strategy, options):
    model = toy_model()
    want = jspec.decode(model, RAGGED, max_new_tokens=10, stop_tokens=[])
    for prompt, row in zip(RAGGED, want.sequences()):
        assert row == naive_greedy(model, prompt, 10)
    if strategy == "speculative":
        options = dict(options, draft=toy_model(seed=1, intermediate_size=32))
    got = jspec.decode(model, RAGGED, strategy, max_new_tokens=10, stop_tokens=[], **options)
    assert got.sequences() == want.sequences()
    sampled = jspec.decode(model, RAGGED, "sample", max_new_tokens=10, stop_tokens=[], key=1)
    assert all(len(row) == 10 for row in sampled.sequences())


def test_diffusion_strategies_decode_a_toy_kind_model():
    masked = toy_model(vocab_size=98, mask_token_id=97, diffusion="masked")
    static = jspec.decode(masked, RAGGED, "dllm_static", block_size=4, max_new_tokens=8, stop_tokens=[])
    for cache in ("none", "dual"):
        freedave = jspec.decode(masked, RAGGED, "freedave", block_size=4, draft_steps=3, cache=cache, max_new_tokens=8,
                                stop_tokens=[])
        if cache == "none":
            assert freedave.sequences() == static.sequences()
        assert all(len(row) == 8 for row in freedave.sequences())
    threshold_one = jspec.decode(masked, RAGGED, "dllm_threshold", threshold=1.0, block_size=4, max_new_tokens=8,
                                 stop_tokens=[])
    assert threshold_one.sequences() == static.sequences()
    block = toy_model(vocab_size=98, mask_token_id=97, diffusion="block", diffusion_block_size=4, shifted_logits=True)
    reference = jspec.decode(block, RAGGED, "block_diffusion", cache="none", sub_block_size=2, max_new_tokens=8, stop_tokens=[])
    cached = jspec.decode(block, RAGGED, "block_diffusion", cache="block", sub_block_size=2, max_new_tokens=8, stop_tokens=[])
    assert cached.sequences() == reference.sequences()


def test_layers_are_scanned_so_compile_time_stays_flat_in_depth():
    """The lowered decode loop of a 32-layer model has no more operations than a 2-layer or an 8-layer one's
    (groups of SCAN_MIN_LAYERS or more run in a lax.scan, not unrolled)."""
    from jspec.decode import _decode_loop, build_prompts

    def lowered_size(num_layers):
        model = tiny_model("llama", num_layers=num_layers)
        strategy = resolve_strategy("greedy", {})
        request = build_prompts(model, RAGGED, 4, None, [], None, strategy)
        return len(jax.jit(_decode_loop).lower(model, strategy, request, jax.random.key(0)).as_text())

    assert transformer.SCAN_MIN_LAYERS <= 8
    assert lowered_size(32) <= min(lowered_size(2), lowered_size(8)) * 1.05
