"""jspec: fast LLM decoding in JAX. Every decoding algorithm is a pure, jit-compiled state transition over
explicit KV/state pytrees, behind one call: `jspec.decode(model, prompts, strategy=...)`."""

from jspec import sampling, strategies
from jspec.cache import KVCache
from jspec.decode import Stream, decode, stream, trace_count
from jspec.loading import load, save
from jspec.models import Model, RopeScaling, TransformerConfig
from jspec.strategies import Autoregressive, DecodeOutput, FinishReason, register_strategy, strategy_names
from jspec.tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
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
    "load",
    "register_strategy",
    "sampling",
    "save",
    "stream",
    "strategies",
    "strategy_names",
    "trace_count",
]
