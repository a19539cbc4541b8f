"""Pallas kernels for jspec: dense, block-sparse and MLA (latent) decode attention, and InfLLM-v2 block selection.

Every kernel has a plain-jnp ``*_reference`` with the same signature. Kernels run compiled on TPU (Mosaic)
and GPU (Triton), and in interpret mode on CPU (the default there).
"""

from pallas_kernels.block_selection import (
    compress_keys,
    init_compressed_keys,
    num_full_kernels,
    select_blocks,
    update_compressed_keys,
)
from pallas_kernels.decode_attention import decode_attention, decode_attention_reference
from pallas_kernels.mla_decode_attention import mla_decode_attention, mla_decode_attention_reference
from pallas_kernels.sparse_decode_attention import (
    merge_attention_partials,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)

__all__ = [
    "compress_keys",
    "decode_attention",
    "decode_attention_reference",
    "init_compressed_keys",
    "merge_attention_partials",
    "mla_decode_attention",
    "mla_decode_attention_reference",
    "num_full_kernels",
    "select_blocks",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
    "update_compressed_keys",
]
