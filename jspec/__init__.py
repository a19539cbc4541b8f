"""jspec: fast LLM decoding in JAX. Every decoding algorithm is a pure, jit-compiled state transition over
explicit KV/state pytrees, behind one call: `jspec.decode(model, prompts, strategy=...)`."""

from jspec import distributed, images, sampling, sharding, strategies
from jspec.cache import KVCache
from jspec.decode import Stream, decode, enable_compilation_cache, stream, trace_count
from jspec.loading import load, save
from jspec.models import Model, RopeScaling, TransformerConfig
from jspec.sharding import make_mesh, shard
from jspec.strategies import Autoregressive, DecodeOutput, FinishReason, register_strategy, strategy_names
from jspec.tokenizer import ByteTokenizer
from jspec.tpla import tpla
from jspec.validation import ArgumentError

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "Autoregressive",
    "ByteTokenizer",
    "DecodeOutput",
    "FinishReason",
    "KVCache",
    "Model",
    "RopeScaling",
    "Stream",
    "TransformerConfig",
    "decode",
    "distributed",
    "enable_compilation_cache",
    "images",
    "load",
    "make_mesh",
    "register_strategy",
    "sampling",
    "save",
    "shard",
    "sharding",
    "stream",
    "strategies",
    "strategy_names",
    "tpla",
    "trace_count",
]
