"""Dense flash-decoding attention as a Pallas kernel, with a jnp reference.

The kernel is the block-list kernel of `sparse_decode_attention.py` driven by "every block up to seq_len"
(entry e is block e; no block table is built or read): one kernel body and one online-softmax update serve
both. See that module's docstring for the TPU and Triton forms and for ``num_splits`` (flash decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common
from pallas_kernels.sparse_decode_attention import block_list_attention, prepare_call


def decode_attention(q, k, v, seq_lens, *, block_size: int = 128, sm_scale=None, interpret=None,
                     backend: str | None = None, num_splits: int | None = None, num_warps: int | None = None,
                     num_stages: int | None = None, sliding_window: int | None = None):
    """Dense decode attention over the first seq_len cache entries of each row (flash decoding).

    Args:
      q: [B, Hkv, G, D] (one query token; G query heads share each KV head), or [B, Hkv, T, G, D] (T query
        tokens at cache positions seq_len - T ... seq_len - 1, causally masked among themselves).
      k, v: [B, S, Hkv, D] the cache (same dtype as q: float32, bfloat16 or float16), with the query tokens'
        own keys already written.
      seq_lens: [B] int32, valid cache entries per row (including the query tokens), 0 <= seq_len <= S.
      block_size: static power of two >= 16 dividing S: keys per kernel step. On TPU every grid step costs
        ~0.35 us, so prefer 512 or more for long caches there.
      sm_scale: static float, default 1 / sqrt(D).
      interpret: None (True on CPU), bool, or ``pltpu.InterpretParams()`` (TPU interpret mode).
      backend: None, "tpu" or "triton"; the kernel form.
      num_splits: static split count of each (row, head)'s key range (flash decoding); None: 1 on TPU and in
        interpret mode, enough to launch ~128 programs on GPU.
      num_warps, num_stages: Triton compiler settings (GPU only).
      sliding_window: static int or None: the query token at position p sees only keys
        p - sliding_window < key <= p (Mistral convention: the last sliding_window keys, itself included);
        blocks wholly before every row's window are not read.

    Returns:
      out [B, Hkv, G, D] (or [B, Hkv, T, G, D]) in q.dtype and lse [B, Hkv, G] (or [B, Hkv, T, G]) float32.
      Guarantee: equal (to float32 accumulation; bf16 probabilities in the P.V product for bf16 inputs) to
      softmax attention over key positions p < seq_len (p < seq_len - (T - 1 - t) for query token t); that is
      ``decode_attention_reference``. Blocks at or past seq_len are never read. A row with seq_len = 0 gives
      out = 0 and lse = -inf.

    Raises:
      ValueError naming the argument for malformed shapes, dtypes, static arguments or an unsupported
      platform; seq_lens values are checked only when concrete (outside jit, where reading them costs a host
      sync: call it under jit in a decode loop).
    """
    sm_scale, interpret, backend, num_splits, sliding_window, query_tile_rows = prepare_call(
        q, k, v, seq_lens, None, block_size=block_size, sm_scale=sm_scale, interpret=interpret, backend=backend,
        num_splits=num_splits, sliding_window=sliding_window)
    out, lse = block_list_attention(
        _common.as_multi_token(q), k, v, seq_lens, None, block_size=block_size, sm_scale=sm_scale,
        interpret=interpret, backend=backend, num_splits=num_splits, num_warps=num_warps, num_stages=num_stages,
        sliding_window=sliding_window, query_tile_rows=query_tile_rows)
    return _common.from_multi_token(out, q.ndim), _common.from_multi_token(lse, q.ndim)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window"))
def _dense_reference_jit(q, k, v, seq_lens, *, sm_scale, sliding_window):
    q5 = _common.as_multi_token(q)
    mask = _common.causal_key_mask(seq_lens, q5.shape[2], k.shape[1], sliding_window)  # [B, T, S]
    mask = jnp.broadcast_to(mask[:, None], (k.shape[0], k.shape[2]) + mask.shape[1:])  # [B, Hkv, T, S]
    out, lse = _common.masked_attention_reference(q5, k, v, mask, sm_scale)
    return _common.from_multi_token(out, q.ndim), _common.from_multi_token(lse, q.ndim)


def decode_attention_reference(q, k, v, seq_lens, *, block_size: int = 128, sm_scale=None, interpret=None,
                               backend=None, num_splits=None, num_warps=None, num_stages=None,
                               sliding_window: int | None = None):
    """Plain-jnp `decode_attention` (same signature and guarantees; the kernel-only arguments are ignored).

    A dense float32 masked softmax over key positions p < seq_lens[b] - (T - 1 - t) (and, with a sliding
    window, p >= that limit - sliding_window). This is also the XLA baseline of the benchmark.
    """
    del interpret, backend, num_splits, num_warps, num_stages
    _common.validate_decode_inputs(q, k, v, seq_lens, block_size, None)
    sm_scale = _common.resolve_sm_scale(sm_scale, k.shape[-1])
    sliding_window = _common.check_sliding_window(sliding_window)
    return _dense_reference_jit(q, k, v, seq_lens, sm_scale=sm_scale, sliding_window=sliding_window)
