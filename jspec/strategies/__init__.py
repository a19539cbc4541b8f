"""Decoding strategies: one module per algorithm, each a config with init/step/done/output."""

from jspec.strategies.autoregressive import Autoregressive, AutoregressiveState
from jspec.strategies.beam_search import BeamSearch, BeamSearchState
from jspec.strategies.block_diffusion import BlockDiffusion, BlockDiffusionState
from jspec.strategies.diffusion import MaskedDiffusion, MaskedDiffusionState
from jspec.strategies.drafters import Drafter, DraftModelDrafter, LayerSkipDrafter, PromptLookupDrafter
from jspec.strategies.jacobi import GroupedAcceptance, JacobiDrafter
from jspec.strategies.lookahead import LookaheadDrafter
from jspec.strategies.recurrent import DiffusionForcing, RecurrentDepth
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
    "BeamSearch",
    "BeamSearchState",
    "BlockDiffusion",
    "BlockDiffusionState",
    "DecodeOutput",
    "DiffusionForcing",
    "DraftModelDrafter",
    "Drafter",
    "FinishReason",
    "GroupedAcceptance",
    "JacobiDrafter",
    "LayerSkipDrafter",
    "LookaheadDrafter",
    "MaskedDiffusion",
    "MaskedDiffusionState",
    "OutputBuffer",
    "PromptLookupDrafter",
    "RecurrentDepth",
    "Prompts",
    "Speculative",
    "SpeculativeState",
    "TreeTemplate",
    "Strategy",
    "register_strategy",
    "resolve_strategy",
    "strategy_names",
]
