"""Training: the stdlib corpus, a byte-level BPE tokenizer, packed batches, pluggable objectives and the trainer.

    from jspec.train import TrainConfig, train
    result = train(TrainConfig.from_recipe("demo-code", steps=100, out_dir="runs/try"))
"""

from jspec.train.objectives import Objective, causal_lm, make_objective, objective_names, register_objective
from jspec.train.trainer import TrainConfig, TrainResult, TrainState, Trainer, prepare_data, train

__all__ = [
    "Objective",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "causal_lm",
    "make_objective",
    "objective_names",
    "prepare_data",
    "register_objective",
    "train",
]
