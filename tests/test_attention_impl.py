"""`attention_impl`: decode attention through the Pallas kernels (interpret mode on CPU) against the XLA path."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from conftest import tiny_model
from jspec.models import transformer
from jspec import masks
from jspec.models.kernels import KernelOptions
from jspec.models.layers import attend
from pallas_kernels import compress_keys, num_full_kernels, select_blocks

PROMPTS = [[5, 17, 3], [9, 2, 44, 61, 7, 12, 30, 8], [1], [88, 3, 3, 3, 3, 3]]
# Tiny InfLLM v2 geometry: blocks of 16 keys, compressed kernels of 8 every 4, one sink and one local block.
SPARSE = dict(
    head_dim=16, attention_impl="pallas_sparse", sparse_block_size=16, sparse_kernel_size=8, sparse_kernel_stride=4,
    sparse_init_blocks=1, sparse_local_blocks=1,
)
DENSE = dict(head_dim=16, attention_impl="pallas_dense", dense_block_size=16)


def greedy(model, **options):
    out = jspec.decode(model, PROMPTS, max_new_tokens=30, cache_size=64, **options)
    return out.sequences(), out.finish_reasons()


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_pallas_dense_greedy_equals_xla(family):
    # stop token 38 finishes some rows early: their later writes go to slot = capacity (clamped in the kernel call)
    reference = greedy(tiny_model(family, head_dim=16), stop_tokens=[38])
    assert family != "llama" or {"eos", "length"} <= set(reference[1])
    assert greedy(tiny_model(family, **DENSE), stop_tokens=[38]) == reference


def test_pallas_sparse_with_full_top_k_equals_xla():
    # top_k = 4 blocks covers the 64-slot cache; dense_len 8: short rows start dense and switch to sparse
    sparse = tiny_model("llama", **SPARSE, sparse_top_k=4, sparse_dense_len=8)
    assert greedy(sparse) == greedy(tiny_model("llama", head_dim=16))


def test_default_cache_size_is_rounded_to_the_kernel_block():
    model = tiny_model("llama", **DENSE)
    out = jspec.decode(model, PROMPTS[:2], max_new_tokens=5)  # 16 + 5 slots would not be a multiple of 16
    assert out.sequences() == jspec.decode(tiny_model("llama", head_dim=16), PROMPTS[:2], max_new_tokens=5).sequences()
    with pytest.raises(ValueError, match="cache"):
        jspec.decode(model, PROMPTS[:2], max_new_tokens=5, cache_size=40)


@jax.jit
def _forward(model, tokens, positions, cache, slots, mask):
    return model.forward(tokens, positions, cache, mask, write_slots=slots)


def decode_session(model, prompts, capacity=128):
    """Prefill, single-token steps, a 3-token chain rolled back to 1, a tree verification with compaction.

    Returns (logits of the single-token steps [steps, B, V], the cache, its lengths [B]).
    """
    batch, width = len(prompts), 48
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((batch, width), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (batch, width))
    cache = model.new_cache(batch, capacity)
    slots = np.where(positions < lengths[:, None], positions, capacity)
    logits, cache = _forward(model, tokens, positions, cache, slots, None)  # 48 tokens: XLA, compressed from scratch
    cache = cache.with_lengths(lengths)
    pending = np.asarray(jnp.argmax(logits[np.arange(batch), lengths - 1], -1), np.int32)
    step_logits = []

    def step():
        nonlocal cache, lengths, pending
        logits, cache = _forward(model, pending[:, None], lengths[:, None], cache, lengths[:, None], None)
        lengths = lengths + 1
        cache = cache.with_lengths(lengths)
        pending = np.asarray(jnp.argmax(logits[:, 0], -1), np.int32)
        step_logits.append(np.asarray(logits[:, 0]))

    for _ in range(4):
        step()
    # a 3-token causal chain (kernel path), then roll back to keep only its first token
    chain = np.stack([pending, (pending + 1) % 97, (pending + 2) % 97], axis=1)
    chain_slots = lengths[:, None] + np.arange(3, dtype=np.int32)
    _, cache = _forward(model, chain, chain_slots, cache, chain_slots, None)
    lengths = lengths + 1
    cache = cache.with_lengths(lengths)
    pending = (pending + 1) % 97  # overwrites the rolled-back slots from here on
    for _ in range(3):
        step()
    # tree verification (custom mask: XLA) of [pending, a, b, c] with parents (-, 0, 0, 2); keep path 0 -> 2 -> 3
    ancestors = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
    tree = np.stack([pending, (pending + 3) % 97, (pending + 5) % 97, (pending + 7) % 97], axis=1)
    tree_slots = lengths[:, None] + np.arange(4, dtype=np.int32)
    starts = jnp.asarray(lengths)
    tree_mask = masks.prefix_and_block_mask(starts, jnp.asarray(ancestors), starts, capacity)
    _, cache = _forward(model, tree, lengths[:, None] + np.array([0, 1, 1, 2], np.int32), cache, tree_slots, tree_mask)
    cache = cache.compact(jnp.asarray(lengths[:, None] + np.array([2, 3], np.int32)), jnp.asarray(lengths + 1))
    lengths = lengths + 3
    cache = cache.with_lengths(lengths)
    pending = tree[:, 3]
    for _ in range(3):
        step()
    return np.stack(step_logits), cache, lengths


LONG_PROMPTS = [list(np.random.default_rng(1).integers(0, 97, 40)), list(np.random.default_rng(2).integers(0, 97, 21))]


@pytest.fixture(scope="module")
def small_top_k_session():
    model = tiny_model("llama", **SPARSE, sparse_top_k=2, sparse_dense_len=28)
    return model, decode_session(model, LONG_PROMPTS)


def test_compressed_keys_after_incremental_decoding_equal_recomputed(small_top_k_session):
    model, (_, cache, lengths) = small_top_k_session
    config = model.kernels
    expected_count = num_full_kernels(jnp.asarray(lengths), config.sparse_kernel_size, config.sparse_kernel_stride)
    assert len(cache.entries) == model.config.num_layers  # a short stack: one entry per layer
    for entry in cache.entries:
        reference, count = compress_keys(
            entry.keys[0], jnp.asarray(lengths), config.sparse_kernel_size, config.sparse_kernel_stride)
        np.testing.assert_array_equal(entry.num_compressed[0], expected_count)
        for b, n in enumerate(np.asarray(count)):
            np.testing.assert_allclose(entry.compressed_keys[0][b, :n], reference[b, :n], rtol=1e-6, atol=1e-6)


def test_small_top_k_changes_logits_of_long_rows(small_top_k_session):
    _, (sparse_logits, _, _) = small_top_k_session
    xla_logits, _, _ = decode_session(tiny_model("llama", head_dim=16), LONG_PROMPTS)
    # row 0 (40+ tokens, 3+ blocks, 2 attended) differs; row 1 is dense (< 28 tokens) for its first step
    assert np.abs(sparse_logits[:, 0] - xla_logits[:, 0]).max() > 1e-3
    np.testing.assert_allclose(sparse_logits[0, 1], xla_logits[0, 1], atol=1e-4)


def test_sparse_attention_reads_exactly_the_selected_blocks(small_top_k_session):
    """kernel_attend on a 2-token chain equals XLA `attend` masked to the blocks that `select_blocks` picks
    from compressed keys recomputed from scratch (every block below sparse_dense_len)."""
    model, (_, cache, lengths) = small_top_k_session
    config, kernels = model.config, model.kernels
    (kind, _, _), = transformer.group_kinds(config, kernels)
    batch, chain = len(lengths), 2
    group = config.queries_per_kv_head
    queries = jax.random.normal(jax.random.key(3), (batch, chain, config.num_heads, config.head_size))
    slots = jnp.asarray(lengths[:, None] - chain + np.arange(chain), jnp.int32)  # the last two committed tokens
    num_blocks = cache.capacity // kernels.sparse_block_size
    for entry in cache.entries:
        got = kind.kernel_attend(config, queries, entry, 0, slots)
        keys, values = entry.keys[0], entry.values[0]
        for t in range(chain):
            seq = jnp.asarray(lengths - (chain - 1 - t), jnp.int32)
            compressed, _ = compress_keys(keys, seq, kernels.sparse_kernel_size, kernels.sparse_kernel_stride)
            q = queries[:, t].reshape(batch, config.num_kv_heads, group, -1)
            chosen = select_blocks(
                q, compressed, seq, kernel_size=kernels.sparse_kernel_size, kernel_stride=kernels.sparse_kernel_stride,
                block_size=kernels.sparse_block_size, init_blocks=1, local_blocks=1, top_k=2, num_blocks=num_blocks)
            for b in range(batch):
                for h in range(config.num_kv_heads):
                    if seq[b] < kernels.sparse_dense_len:
                        blocks = set(range(-(-int(seq[b]) // kernels.sparse_block_size)))
                    else:
                        blocks = set(np.asarray(chosen[b, h]).tolist()) - {-1}
                    visible = [s < seq[b] and s // kernels.sparse_block_size in blocks for s in range(cache.capacity)]
                    heads = slice(h * group, (h + 1) * group)
                    expected = attend(queries[b : b + 1, t : t + 1, heads], keys[b : b + 1, :, h : h + 1],
                                      values[b : b + 1, :, h : h + 1], jnp.asarray(visible)[None, None])
                    np.testing.assert_allclose(got[b, t, heads], expected[0, 0], rtol=1e-5, atol=1e-5)


def test_self_speculative_tree_with_sparse_target_equals_xla():
    """Verification and draft-tree levels use custom masks (XLA); each step's skip-layer root draft is a
    single-token causal call on the target's own cache: the sparse kernel, over compressed keys that tree
    compaction rewrites. Exact attention (top-k covers the cache) gives the same drafts as XLA, hence the same
    tokens and the same acceptance histogram."""
    def run(**impl_options):
        target = tiny_model("llama", head_dim=16, **impl_options)
        out = jspec.decode(target, PROMPTS, "self_speculative", skip_layers=(1,), tree=(2, 2), max_new_tokens=16,
                           cache_size=64, stop_tokens=[])
        return out.sequences(), np.asarray(out.stats["accepted_histogram"]).tolist()

    sparse = {k: v for k, v in SPARSE.items() if k != "head_dim"}
    assert run(**sparse, sparse_top_k=4, sparse_dense_len=8) == run()


def test_speculative_chains_verify_through_the_dense_kernel(monkeypatch):
    """A chain passes no mask (its tree mask is the causal mask by slot), so its verification chunk, the draft
    model's [last committed, pending] chunk and each drafting level run through the decode kernel; rows that
    stop early write to slot = capacity. Same tokens and acceptance histograms as XLA."""
    from jspec.models.attention.full import FullAttention

    chunk_sizes = set()
    kernel_attend = FullAttention.kernel_attend

    def counting(self, config, queries, *args):
        chunk_sizes.add(queries.shape[1])
        return kernel_attend(self, config, queries, *args)

    def run(**impl_options):
        target = tiny_model("llama", **impl_options)
        draft = tiny_model("llama", seed=1, num_layers=1, **impl_options)
        results = []
        for strategy, options in [("speculative", dict(draft=draft)), ("self_speculative", dict(skip_layers=(1,)))]:
            out = jspec.decode(target, PROMPTS, strategy, num_draft_tokens=3, max_new_tokens=20, cache_size=64,
                               stop_tokens=[38], **options)
            results.append((out.sequences(), np.asarray(out.stats["accepted_histogram"]).tolist()))
        return results

    monkeypatch.setattr(FullAttention, "kernel_attend", counting)
    jax.clear_caches()
    try:
        assert run(**DENSE) == run(head_dim=16)
    finally:
        jax.clear_caches()
    assert chunk_sizes == {1, 2, 4}  # drafting levels and decode, the draft's re-feed, verification of 1 + 3


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention_impl", "flash"),
        ("attention_interpret", "yes"),
        ("head_copy", "cpu"),
        ("dense_block_size", 100),
        ("sparse_block_size", 8),
        ("sparse_kernel_stride", 5),
        ("sparse_init_blocks", -1),
        ("sparse_local_blocks", 0),
        ("sparse_top_k", 32),
        ("sparse_dense_len", -1),
    ],
)
def test_bad_attention_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"KernelOptions.{field}"):
        KernelOptions(**{field: value})


def test_sparse_with_sliding_window_raises():
    with pytest.raises(ValueError, match="sliding_window.*pallas_sparse"):
        tiny_model("mistral_window", **SPARSE)


def test_cache_capacity_must_be_a_multiple_of_the_kernel_block():
    model = tiny_model("llama", **DENSE)
    assert model.new_cache(1, 40).capacity == 48  # the model rounds capacities up to the kernel block
    with pytest.raises(ValueError, match="cache_size: 46 is not a multiple of the attention kernel block size 16"):
        jspec.decode(model, PROMPTS, max_new_tokens=4, cache_size=46)
    too_small = model.new_cache(1, 16).replace(capacity=40)  # a cache built around the model's rounding
    with pytest.raises(ValueError, match=r"cache_size\) 40 is not a multiple of the attention kernel block size 16"):
        model.forward(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), too_small)
    sparse = tiny_model("llama", **SPARSE, sparse_top_k=2)
    with pytest.raises(ValueError, match="compressed keys"):  # a cache made for another attention_impl
        sparse.forward(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), model.new_cache(1, 32))


def test_kernel_choice_leaves_the_config_unchanged():
    sparse = tiny_model("llama", **SPARSE, sparse_top_k=3, attention_interpret=True)
    assert sparse.config == tiny_model("llama", head_dim=16).config  # what the model is does not name its kernel
    assert "attention_impl" not in sparse.config.to_dict()
    assert sparse.cache_size_multiple == 16 and sparse.with_kernels(attention_impl="xla").cache_size_multiple == 1
