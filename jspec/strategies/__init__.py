"""Decoding strategies: one module per algorithm, each a config with init/step/done/output."""

from jspec.strategies.autoregressive import Autoregressive, AutoregressiveState
from jspec.strategies.speculative import Speculative, SpeculativeState
from jspec.strategies.tree import TreeTemplate
from jspec.strategies.base import (
    DecodeOutput,
    FinishReason,
    OutputBuffer,
    Prompts,
    Strategy,
    register_strategy,
    resolve_strategy,
    strategy_names,
)

__all__ = [
    "Autoregressive",
    "AutoregressiveState",
    "DecodeOutput",
    "FinishReason",
    "OutputBuffer",
    "Prompts",
    "Speculative",
    "SpeculativeState",
    "TreeTemplate",
    "Strategy",
    "register_strategy",
    "resolve_strategy",
    "strategy_names",
]
