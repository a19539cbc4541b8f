"""Learn2PD filters (Bao et al., "Learning to Parallel: Accelerating Diffusion LLMs via Learnable Parallel
Decoding", arXiv 2509.25188): a small model that scores, per masked position of the current block, whether the
current prediction there already equals the final output; the "learn2pd" unmasking rule
(`jspec.strategies.unmasking.Learn2PDUnmasking`) unmasks the positions scored above a threshold.

A filter is a pytree (its arrays are traced: swapping filters of one kind and shape, trained for models of one
shape, does not recompile) with
`scores(inputs) -> [B, T]` in [0, 1]:
- `MLPFilter`: the learned filter, a per-position MLP over `filter_features` (shared weights across positions),
  over the current block (masked diffusion) or the current sub-block (block_diffusion's unmasking="learn2pd"),
  trained by `jspec.train.learn2pd` and shipped beside the model it was trained for
  (`jspec/assets/<model>/learn2pd_filter.safetensors`, loaded with `shipped_filter(name)`).
- `OracleFilter`: the bound a learned filter approximates: 1 where the current prediction equals a given
  reference output (e.g. static decoding's) at that generated position, else 0. Tests and benchmarks use it.

Features (`FEATURE_NAMES`, per position of the block, from the fresh forward): the prediction's confidence and
its log-odds / 10, the position in the block, the fraction of the block still masked, the masked positions to
its left and its confidence rank among the masked ones (both / block length), the block's highest masked
confidence, and whether the position to its left is decided. (The paper feeds the block's confidences; the
rank / neighbour features let one shared per-position MLP see the block context.)
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jspec.validation import ArgumentError

FEATURE_NAMES = (
    "confidence",
    "log_odds_over_10",
    "position_in_block",
    "fraction_masked",
    "masked_to_the_left",
    "confidence_rank",
    "block_max_confidence",
    "left_neighbour_decided",
)
FILTER_FILE = "learn2pd_filter.safetensors"
LAYER_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")
SHAPE_FIELDS = ("diffusion", "vocab_size", "hidden_size", "num_layers")  # what a filter records of its model


def model_shape(config: Any) -> dict[str, Any]:
    """The fields of a model config (`SHAPE_FIELDS`) a filter's metadata records ("model_shape") and decoding
    checks: a filter trained for one model must not be used silently on a model of another shape."""
    return {name: getattr(config, name) for name in SHAPE_FIELDS}


def filter_features(
    confidence: jax.Array,  # [..., T] float32: each position's prediction confidence
    masked: jax.Array,  # [..., T] bool: positions still to decide
) -> jax.Array:  # [..., T, len(FEATURE_NAMES)] float32
    """The per-position filter inputs named by `FEATURE_NAMES` (values at decided positions are unused)."""
    length = confidence.shape[-1]
    confidence = confidence.astype(jnp.float32)
    clipped = jnp.clip(confidence, 1e-6, 1 - 1e-6)
    log_odds = (jnp.log(clipped) - jnp.log1p(-clipped)) / 10
    position = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32) / max(length - 1, 1), confidence.shape)
    masked_f = masked.astype(jnp.float32)
    fraction = jnp.broadcast_to(jnp.mean(masked_f, axis=-1, keepdims=True), confidence.shape)
    to_the_left = (jnp.cumsum(masked_f, axis=-1) - masked_f) / length
    key = jnp.where(masked, -confidence, jnp.inf)
    rank = jnp.argsort(jnp.argsort(key, axis=-1, stable=True), axis=-1).astype(jnp.float32) / length
    block_max = jnp.broadcast_to(jnp.max(jnp.where(masked, confidence, 0.0), axis=-1, keepdims=True), confidence.shape)
    left_masked = jnp.concatenate([jnp.zeros_like(masked[..., :1]), masked[..., :-1]], axis=-1)
    left_decided = 1.0 - left_masked.astype(jnp.float32)
    return jnp.stack([confidence, log_odds, position, fraction, to_the_left, rank, block_max, left_decided], axis=-1)


class FilterInputs(NamedTuple):
    """What a filter sees of the current block, per row."""

    features: jax.Array  # [B, T, F] float32: `filter_features`
    predicted: jax.Array  # [B, T] int32: the current predictions
    masked: jax.Array  # [B, T] bool: positions still to decide
    positions: jax.Array  # [B, T] int32: each position's generated position (0 = the first generated token)


@struct.dataclass
class UnmaskingFilter:
    """Scores in [0, 1] per position: how sure the filter is that the current prediction is final."""

    def scores(self, inputs: FilterInputs) -> jax.Array:  # [B, T] float32
        raise NotImplementedError

    def validate(self, config: Any, batch_size: int, max_new_tokens: int) -> None:
        """Concrete checks against the model's config and the request, before tracing."""


def mlp_logits(params: dict[str, jax.Array], features: jax.Array) -> jax.Array:  # [..., F] -> [...]
    """The filter MLP: two tanh layers, one logit per position."""
    hidden = jnp.tanh(features @ params["w1"] + params["b1"])
    hidden = jnp.tanh(hidden @ params["w2"] + params["b2"])
    return (hidden @ params["w3"] + params["b3"])[..., 0]


def init_mlp(key: jax.Array, hidden: int = 32) -> dict[str, jax.Array]:
    sizes = ((len(FEATURE_NAMES), hidden), (hidden, hidden), (hidden, 1))
    keys = jax.random.split(key, len(sizes))
    params = {}
    for index, ((fan_in, fan_out), layer_key) in enumerate(zip(sizes, keys), start=1):
        params[f"w{index}"] = jax.random.normal(layer_key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in)
        params[f"b{index}"] = jnp.zeros((fan_out,), jnp.float32)
    return params


@struct.dataclass
class MLPFilter(UnmaskingFilter):
    """The learned Learn2PD filter: sigmoid(MLP(features)) per position (weights traced).

    trained_for (static): ((field, value), ...) of `model_shape` of the model it was trained for (`load_filter`
    fills it from the file's metadata); decoding a model of another shape with it is an error
    (`check_trained_for`). Empty: unchecked (a filter built in code). Being static, it is part of the compiled
    program's key: filters of one shape trained for models of one shape share a program."""

    params: dict[str, jax.Array]
    trained_for: tuple = struct.field(pytree_node=False, default=())

    def scores(self, inputs: FilterInputs) -> jax.Array:
        return jax.nn.sigmoid(mlp_logits(self.params, inputs.features))

    def validate(self, config: Any, batch_size: int, max_new_tokens: int) -> None:
        if not isinstance(self.params, dict) or set(self.params) != set(LAYER_NAMES):
            raise ArgumentError(f"filter: an MLPFilter needs params with the arrays {LAYER_NAMES}, got {type(self.params).__name__}")
        if np.shape(self.params["w1"])[0] != len(FEATURE_NAMES):
            raise ArgumentError(f"filter: the MLP's first layer takes {np.shape(self.params['w1'])[0]} features, expected {len(FEATURE_NAMES)}")
        check_trained_for(self.trained_for, config)


def check_trained_for(trained_for: tuple, config: Any) -> None:
    """Raise an ArgumentError naming `filter` where the model `config` describes differs in shape from the one a
    filter was trained for (trained_for: ((field, value), ...) of `model_shape`; empty: no check)."""
    pairs_ok = isinstance(trained_for, tuple) and all(
        isinstance(pair, tuple) and len(pair) == 2 and pair[0] in SHAPE_FIELDS for pair in trained_for)
    if not pairs_ok:
        raise ArgumentError(
            f"filter: an MLPFilter's trained_for must be a tuple of (field, value) pairs with fields from {SHAPE_FIELDS} "
            f"(as load_filter fills it), got {trained_for!r}"
        )
    actual = model_shape(config)
    differ = [(field, value, actual.get(field)) for field, value in trained_for if actual.get(field) != value]
    if differ:
        found = ", ".join(f"{field} {theirs!r} where the filter's model has {ours!r}" for field, ours, theirs in differ)
        raise ArgumentError(
            f"filter: this Learn2PD filter was trained for a model of another shape than the one decoded ({found}); "
            "train one for this model (python -m jspec.train.learn2pd --model PATH --out FILE) and pass filter=FILE, "
            "or pass an UnmaskingFilter"
        )


@struct.dataclass
class OracleFilter(UnmaskingFilter):
    """Learn2PD's oracle: 1 where the current prediction equals `reference` at that generated position.
    reference: [B, N] int32, N >= max_new_tokens (e.g. static decoding's output)."""

    reference: jax.Array

    def scores(self, inputs: FilterInputs) -> jax.Array:
        width = self.reference.shape[1]
        expected = jnp.take_along_axis(self.reference, jnp.clip(inputs.positions, 0, width - 1), axis=1)
        return (inputs.predicted == expected).astype(jnp.float32)

    def validate(self, config: Any, batch_size: int, max_new_tokens: int) -> None:
        shape = np.shape(self.reference)
        if len(shape) != 2 or shape[0] != batch_size or shape[1] < max_new_tokens:
            raise ArgumentError(
                f"filter: an OracleFilter's reference must have shape [batch={batch_size}, >= max_new_tokens={max_new_tokens}], got {shape}"
            )


def filter_path(model_name: str) -> Path:
    from jspec.loading import ASSETS_DIR

    return ASSETS_DIR / model_name / FILTER_FILE


def save_filter(params: dict[str, Any], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the MLP's arrays (float32) and `metadata` (JSON) to a safetensors file."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(params[name], np.float32) for name in LAYER_NAMES}
    save_file(arrays, str(path), metadata={"learn2pd": json.dumps({"features": list(FEATURE_NAMES), **metadata})})
    return path


def load_filter(path: str | Path) -> tuple[MLPFilter, dict[str, Any]]:
    """An `MLPFilter` from a file `save_filter` wrote (with the model shape its metadata records, which decoding
    checks), and its metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArgumentError(f"filter: no Learn2PD filter at {str(path)!r} (train one with python -m jspec.train.learn2pd)")
    with safe_open(str(path), framework="numpy") as handle:
        metadata = json.loads((handle.metadata() or {}).get("learn2pd", "{}"))
        params = {name: jnp.asarray(handle.get_tensor(name)) for name in handle.keys()}
    if tuple(metadata.get("features", ())) != FEATURE_NAMES:
        raise ArgumentError(f"filter: {str(path)!r} was trained on features {metadata.get('features')}, this jspec computes {FEATURE_NAMES}")
    return MLPFilter(params=params, trained_for=tuple(sorted(metadata.get("model_shape", {}).items()))), metadata


@functools.lru_cache(maxsize=8)
def shipped_filter(model_name: str) -> MLPFilter:
    """The filter shipped beside a demo model (jspec/assets/<model_name>/learn2pd_filter.safetensors), read once."""
    path = filter_path(model_name)
    if not path.is_file():
        raise ArgumentError(
            f"filter: no Learn2PD filter is shipped for {model_name!r} (expected {str(path)!r}); pass a model name that "
            "has one (demo-code-dllm, demo-code-bd), a .safetensors filter file, or an UnmaskingFilter"
        )
    return load_filter(path)[0]


def as_filter(value: Any) -> UnmaskingFilter:
    """A filter object, or the shipped filter of the model a name gives."""
    if isinstance(value, UnmaskingFilter):
        return value
    if isinstance(value, (str, Path)):
        return load_filter(value)[0] if Path(value).suffix == ".safetensors" else shipped_filter(str(value))
    raise ArgumentError(
        f"filter: expected a demo model name whose Learn2PD filter is shipped ('demo-code-dllm', 'demo-code-bd'), a .safetensors "
        f"filter file, or an UnmaskingFilter object, got {value!r}"
    )
