"""The trainer: one jitted step for any registered objective, AdamW with warmup + cosine decay, global-norm
clipping, optional bf16 compute over float32 master weights, periodic orbax checkpoints and exact resume.

    from jspec.train import TrainConfig, train
    result = train(TrainConfig.from_recipe("demo-code"))
    result.model, result.eval_loss, result.eval_perplexity

Guarantees:
- Deterministic: the parameters, optimizer state and every batch are functions of the recipe (seeds
  included) and the step; the data position of a run is its step count (see `data.PackedBatches`).
- Exact resume: a run interrupted after a checkpoint and resumed with `resume=True` computes the same losses
  (bit for bit on the same machine and jax build) as an uninterrupted run, because a checkpoint holds the
  float32 parameters, the optimizer state and the step, and the batch and the objective's key at a step are
  pure functions of the step.
- Atomic checkpoints: orbax's CheckpointManager writes each step into a temporary directory and renames it
  when complete; an interrupted save is never picked up as the latest step (`max_to_keep` bounds the disk).
- Data parallel: `train(config, mesh=jspec.sharding.make_mesh(data=N))` splits every batch over the mesh's "data" axis and
  keeps the parameters and optimizer state replicated; the step is the same jitted function (XLA all-reduces the
  gradients of the global-batch mean loss), so the losses equal one device's up to float summation order.
  Checkpoints hold host (numpy) copies: they load on any number of devices, a resumed run may change the mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jspec.models.config import TransformerConfig
from jspec.models.model import Model
from jspec.sharding import DATA, MODEL, auto_mesh, describe, parse_mesh, place, to_host
from jspec.train import corpus as corpus_lib
from jspec.train import data as data_lib
from jspec.train.objectives import make_objective
from jspec.validation import ArgumentError

DATASETS = ("stdlib", "digits")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "configs" / "train"
DEFAULT_CACHE_DIR = Path(os.environ.get("JSPEC_CACHE", Path.home() / ".cache" / "jspec" / "train"))

# Fields that shape the training trajectory: a resumed run must agree on all of them with its checkpoint.
_TRAJECTORY_FIELDS = (
    "model", "tokenizer_vocab_size", "heldout_fraction", "seq_len", "batch_size", "data_seed", "steps",
    "learning_rate", "min_learning_rate_ratio", "warmup_steps", "weight_decay", "adam_b1", "adam_b2",
    "adam_eps", "grad_clip_norm", "compute_dtype", "init_seed", "init_scale", "objective", "objective_options",
    "init_from", "mask_token", "distill",
)


@dataclasses.dataclass
class TrainConfig:
    """A training recipe. JSON recipes in configs/train/ hold exactly these fields."""

    name: str = "run"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # TransformerConfig fields; vocab/eos from the tokenizer
    # Data.
    dataset: str = "stdlib"  # "stdlib": this machine's Python sources (packed text); "digits": jspec.train.digits
    corpus_manifest: str | None = None  # a manifest to verify and use; None: build one from this machine's stdlib
    tokenizer: str | None = None  # a tokenizer.json; None: train one (byte-level BPE) on the training split
    tokenizer_vocab_size: int = 4096
    heldout_fraction: float = corpus_lib.DEFAULT_HELDOUT_FRACTION
    seq_len: int = 256
    batch_size: int = 8
    data_seed: int = 0
    # Optimization.
    steps: int = 1000
    learning_rate: float = 2e-3
    min_learning_rate_ratio: float = 0.1  # cosine decays to learning_rate * this at the last step
    warmup_steps: int = 50
    weight_decay: float = 0.1  # not applied to norms (1-D leaves)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    compute_dtype: str = "float32"  # "bfloat16": forward/backward in bf16 over float32 master weights
    init_seed: int = 0
    init_scale: float = 0.02
    objective: str = "causal_lm"
    objective_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Adaptation (e.g. a diffusion LM from an autoregressive one, as Dream and Fast-dLLM v2 do).
    init_from: str | None = None  # a model jspec.load knows: its weights, architecture and tokenizer are the start
    mask_token: str | None = None  # a special token added to the tokenizer; its id becomes model.mask_token_id
    # Distillation: train on a teacher's continuations of training prefixes instead of the packed text
    # (jspec.train.distilled.DistillSpec fields: teacher, temperature, prefix_tokens, num_sequences, seed, batch_rows).
    distill: dict[str, Any] | None = None
    # Bookkeeping.
    out_dir: str | None = None  # default: runs/<name>
    cache_dir: str | None = None  # tokenized corpora; default ~/.cache/jspec/train (or $JSPEC_CACHE)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    eval_windows: int = 32  # windows of the held-out stream evaluated during training
    final_eval_windows: int | None = None  # at the end; None: the whole held-out stream

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype: expected 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        for name in ("steps", "seq_len", "batch_size", "checkpoint_every", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.learning_rate <= 0:
            raise ValueError("warmup_steps must be >= 0 and learning_rate > 0")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {list(DATASETS)}, got {self.dataset!r}")
        if self.distill is not None:
            from jspec.train.distilled import DistillSpec

            if self.dataset != "stdlib":
                raise ValueError(f"distill: needs dataset 'stdlib' (prefixes of the code corpus), got {self.dataset!r}")
            DistillSpec.from_dict(self.distill).continuation_tokens(self.seq_len)

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path("runs") / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"comment", "description"})
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_recipe(cls, name_or_path: str, **overrides: Any) -> "TrainConfig":
        """A recipe by name (configs/train/<name>.json) or path, with field overrides."""
        path = Path(name_or_path)
        if path.suffix != ".json":
            path = RECIPES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            names = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
            raise ValueError(f"recipe: no recipe or file {name_or_path!r}; recipes are {names}")
        values = json.loads(path.read_text())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken (= batches consumed)
    params: Any  # float32 master weights
    opt_state: Any


@dataclasses.dataclass
class TrainResult:
    model: Model  # float32 parameters with the tokenizer
    steps: int
    tokens_seen: int
    wall_seconds: float  # summed over resumed segments
    train_loss: float  # mean of the last min(50, steps) step losses
    eval_loss: float | None
    eval_perplexity: float | None
    eval_tokens: int
    history: list[dict[str, Any]]
    out_dir: Path


@dataclasses.dataclass
class PreparedData:
    tokenizer: Any
    manifest: dict[str, Any]  # has a "digest" of the data (checked on resume)
    train_stream: np.ndarray
    heldout_stream: np.ndarray
    window_stride: int | None = None  # where windows start (data.PackedBatches); None: seq_len (packed text)
    corpus_summary: dict[str, Any] | None = None  # result.json's "corpus" (None: the stdlib manifest's figures)
    eval_slice: str | None = None  # what the evaluation windows are (None: the stdlib held-out files, packed)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate over warmup_steps, then cosine to learning_rate * min ratio."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_learning_rate_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(
        learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
        weight_decay=config.weight_decay, mask=decay_mask,
    )
    if config.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def prepare_data(config: TrainConfig, log=print) -> PreparedData:
    """The corpus (manifest), the tokenizer and the tokenized train / held-out streams of a recipe."""
    if config.dataset == "digits":
        from jspec.train import digits

        return digits.prepare(config, log)
    cache_dir = Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE_DIR
    if config.corpus_manifest:
        manifest = corpus_lib.load_manifest(config.corpus_manifest)
        if manifest["heldout_fraction"] != config.heldout_fraction:
            raise ValueError(
                f"corpus_manifest: its heldout_fraction {manifest['heldout_fraction']} differs from the recipe's {config.heldout_fraction}"
            )
    else:
        manifest = corpus_lib.build_manifest(heldout_fraction=config.heldout_fraction)
    log(f"corpus: {corpus_lib.manifest_summary(manifest)}")
    train_texts = corpus_lib.load_documents(manifest, "train")
    heldout_texts = corpus_lib.load_documents(manifest, "heldout")
    if config.init_from:
        if config.tokenizer:
            raise ValueError("tokenizer: leave it unset with init_from (the starting model's tokenizer is used)")
        tokenizer = initial_model(config.init_from).tokenizer
        if tokenizer is None or not hasattr(tokenizer, "to_str"):
            raise ValueError(f"init_from: {config.init_from!r} has no tokenizer.json tokenizer to train with")
    elif config.tokenizer:
        tokenizer = data_lib.load_tokenizer(config.tokenizer)
    else:
        tokenizer_path = cache_dir / f"tokenizer-{manifest['digest'][:16]}-{config.tokenizer_vocab_size}.json"
        if tokenizer_path.is_file():
            tokenizer = data_lib.load_tokenizer(tokenizer_path)
        else:
            started = time.perf_counter()
            tokenizer = data_lib.train_tokenizer(train_texts, config.tokenizer_vocab_size)
            tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tokenizer_path.with_suffix(".tmp")
            tokenizer.save(tmp)
            tmp.replace(tokenizer_path)
            log(f"tokenizer: trained byte-level BPE ({tokenizer.vocab_size} tokens) in {time.perf_counter() - started:.1f}s")
            tokenizer = data_lib.load_tokenizer(tokenizer_path)
    train_stream = data_lib.cached_token_stream(tokenizer, train_texts, cache_dir, f"{manifest['digest']}:train")
    heldout_stream = data_lib.cached_token_stream(tokenizer, heldout_texts, cache_dir, f"{manifest['digest']}:heldout")
    corpus_summary = None
    if config.distill is not None:  # the training split's prefixes only: the held-out stream is not passed
        from jspec.train import distilled

        spec = distilled.DistillSpec.from_dict(config.distill)
        train_stream = distilled.distilled_stream(train_stream, config.seq_len, spec, tokenizer.eos_token_ids[0], config.output_dir, log=log)
        corpus_summary = {**{k: manifest[k] for k in ("python_version", "num_files", "num_bytes", "num_heldout_files", "digest")},
                          "distilled": {**dataclasses.asdict(spec), "examples": spec.num_sequences,
                                        "teacher_tokens": spec.num_sequences * spec.continuation_tokens(config.seq_len)}}
    if config.mask_token:  # added after tokenizing: the corpus never holds it, so the streams are unchanged
        tokenizer, _ = tokenizer.with_special_token(config.mask_token)
    log(f"data: {len(train_stream):,} train tokens, {len(heldout_stream):,} held-out tokens (vocab {tokenizer.vocab_size})")
    return PreparedData(tokenizer, manifest, train_stream, heldout_stream, corpus_summary=corpus_summary)


EVAL_METRICS = {  # what the held-out loss of each objective is
    "causal_lm": "mean next-token cross-entropy (nats) over all targets",
    "masked_diffusion": (
        "masked-diffusion negative ELBO per token (nats; an upper bound on the negative log-likelihood): cross-entropy "
        "at masked positions weighted by 1/t, one mask ratio t per window drawn with a fixed key"
    ),
    "block_diffusion": (
        "block-diffusion loss (nats): mean cross-entropy of every token predicted where it is masked, under complementary "
        "masks with one ratio per block drawn with a fixed key"
    ),
    "distill": (
        "distillation loss (nats): the objective_options' weighted sum of T^2 KL(teacher || student) at temperature T, "
        "cross-entropy on the data's token and cross-entropy on the teacher's argmax token, mean over all targets"
    ),
}

_INITIAL_MODELS: dict[str, Model] = {}


def initial_model(name: str) -> Model:
    """The model `init_from` names, loaded once per process (float32)."""
    if name not in _INITIAL_MODELS:
        from jspec.loading import load

        _INITIAL_MODELS[name] = load(name, dtype="float32")
    return _INITIAL_MODELS[name]


def model_class(model_cfg: Any) -> Any:
    """The model class of a config's family: `RecurrentModel` for a `RecurrentConfig`, else `Model`."""
    from jspec.models.recurrent import RecurrentConfig, RecurrentModel

    return RecurrentModel if isinstance(model_cfg, RecurrentConfig) else Model


def model_config(config: TrainConfig, tokenizer: Any) -> TransformerConfig:
    values = dict(config.model)
    from jspec.models.recurrent import RecurrentConfig, is_recurrent_config

    if is_recurrent_config(values):  # a recurrent-depth model (jspec.models.recurrent); no init_from / mask token
        values.setdefault("name", config.name)
        values.setdefault("vocab_size", tokenizer.vocab_size)
        values.setdefault("eos_token_ids", list(tokenizer.eos_token_ids))
        values.setdefault("pad_token_id", tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0)
        values.setdefault("max_position_embeddings", max(config.seq_len, 2048))
        values["dtype"] = "float32"
        return RecurrentConfig.from_dict(values)
    if config.init_from:
        start = initial_model(config.init_from).config.to_dict()
        architecture = {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "head_dim"}
        changed = sorted(k for k in architecture & set(values) if values[k] != start[k])
        if changed:
            raise ValueError(f"model: {changed} differ from init_from {config.init_from!r}'s architecture")
        values = {**{k: v for k, v in start.items() if k not in ("vocab_size", "dtype", "attention_impl")}, **values}
    if config.mask_token:
        values["mask_token_id"] = tokenizer.token_to_id(config.mask_token)
    values.setdefault("name", config.name)
    values.setdefault("vocab_size", tokenizer.vocab_size)
    values.setdefault("eos_token_ids", list(tokenizer.eos_token_ids))
    values.setdefault("pad_token_id", tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else 0)
    values.setdefault("max_position_embeddings", max(config.seq_len, 2048))
    values["dtype"] = "float32"  # master weights
    if config.init_from:
        values["vocab_size"] = max(tokenizer.vocab_size, initial_model(config.init_from).config.vocab_size)
    model_cfg = TransformerConfig.from_dict(values)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return model_cfg


_COMPILED: dict[Any, tuple[Any, Any]] = {}  # trajectory + model config -> (jitted step, jitted eval)
_COMPILED_MAX = 8


def training_mesh(mesh: Mesh | str | None, batch_size: int) -> Mesh | None:
    """The mesh a run trains on (Auto axes), checked: data=N,model=1 only, N dividing the batch size."""
    if mesh is None:
        return None
    mesh = auto_mesh(parse_mesh(mesh) if isinstance(mesh, str) else mesh)
    if tuple(mesh.axis_names) != (DATA, MODEL) or mesh.shape[MODEL] != 1:
        raise ArgumentError(f"mesh: training supports data=N,model=1 only (data parallel), got {describe(mesh)}")
    if batch_size % mesh.shape[DATA]:
        raise ArgumentError(
            f"mesh: its data axis of {mesh.shape[DATA]} devices does not divide the batch size {batch_size}; use a "
            "batch size that is a multiple of it")
    return mesh


def _compiled_functions(config: TrainConfig, model_cfg: TransformerConfig, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """The jitted train step and eval step of a recipe, shared by every Trainer with the same trajectory
    fields, model config and mesh (so resuming in one process, or a test suite, compiles once). The functions
    close over nothing but values derived from those, so sharing them cannot change a result. On a mesh the
    step's new state is pinned replicated (the inputs are placed by the Trainer)."""
    from jspec.train.objectives import _OBJECTIVES

    key = (json.dumps(_trajectory(config), sort_keys=True, default=str), model_cfg, id(_OBJECTIVES.get(config.objective)), mesh)
    if key in _COMPILED:
        return _COMPILED[key]
    compute_dtype = config.compute_dtype
    objective = make_objective(config.objective, model_cfg.replace(dtype=compute_dtype), **config.objective_options)
    optimizer = make_optimizer(config)
    schedule = learning_rate_schedule(config)
    base_key = jax.random.key(config.init_seed)

    def cast(params):
        return params if compute_dtype == "float32" else jax.tree.map(lambda x: x.astype(compute_dtype), params)

    def step(state: TrainState, tokens: jax.Array):  # tokens [B, L + 1]
        step_key = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)

        def loss_fn(params):
            return objective(cast(params), {"tokens": tokens}, step_key)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads), learning_rate=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def evaluate(params, tokens: jax.Array):
        _, metrics = objective(cast(params), {"tokens": tokens, "evaluation": True}, jax.random.fold_in(base_key, 2))
        return metrics["loss_sum"], metrics["token_count"]

    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.pop(next(iter(_COMPILED)))
    pinned = {} if mesh is None else {"out_shardings": NamedSharding(mesh, PartitionSpec())}
    _COMPILED[key] = (jax.jit(step, donate_argnums=(0,), **pinned), jax.jit(evaluate))
    return _COMPILED[key]


def mean_eval_loss(eval_step: Any, params: Any, windows: np.ndarray, batch_size: int, place=jnp.asarray) -> dict[str, Any]:
    """The objective's mean loss over `windows` [N, L + 1], evaluated `batch_size` rows at a time by `eval_step`
    (`_compiled_functions`' evaluation: one fixed key per chunk, so the chunking is part of the figure)."""
    loss_sum, count = 0.0, 0.0
    for start in range(0, len(windows), batch_size):
        chunk_loss, chunk_count = eval_step(params, place(windows[start : start + batch_size]))
        loss_sum += float(chunk_loss)
        count += float(chunk_count)
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(count), "eval_windows": len(windows)}


def recipe_eval_loss(model: Model, recipe: dict[str, Any], windows: np.ndarray) -> dict[str, Any]:
    """A trained model's held-out figure computed as its run's final evaluation computes it (the recipe's objective,
    compute dtype, evaluation key and batch size) on `windows`: how a shipped model's card figure is re-measured."""
    config = TrainConfig.from_dict({k: v for k, v in recipe.items() if k not in ("out_dir", "cache_dir")})
    _, eval_step = _compiled_functions(config, model.config.replace(dtype="float32"))
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), model.params)  # master weights, as in training
    return mean_eval_loss(eval_step, params, windows, config.batch_size)


class Trainer:
    """The data, the compiled step and evaluation of one recipe; `train()` is the usual entry."""

    def __init__(self, config: TrainConfig, data: PreparedData, mesh: Mesh | str | None = None):
        self.config = config
        self.data = data
        self.mesh = training_mesh(mesh, config.batch_size)
        self.model_config = model_config(config, data.tokenizer)
        self.optimizer = make_optimizer(config)
        self.batches = data_lib.PackedBatches(
            data.train_stream, config.seq_len, config.batch_size, config.data_seed, stride=data.window_stride
        )
        self.base_key = jax.random.key(config.init_seed)
        self._train_step, self._eval_step = _compiled_functions(config, self.model_config, self.mesh)

    def place_state(self, state: TrainState) -> TrainState:
        """The state replicated over the mesh (as is without one)."""
        if self.mesh is None:
            return state
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda leaf: place(leaf, replicated), state)

    def place_tokens(self, tokens: np.ndarray) -> jax.Array:  # [B, L + 1]
        """Host tokens as the step's input: rows split over the mesh's data axis (replicated where the rows do
        not divide over it, as a short last evaluation chunk may not)."""
        if self.mesh is None:
            return jnp.asarray(tokens)
        rows = PartitionSpec(DATA) if len(tokens) % self.mesh.shape[DATA] == 0 else PartitionSpec()
        return place(np.asarray(tokens), NamedSharding(self.mesh, rows))

    def init_state(self) -> TrainState:
        if self.config.init_from:
            params = grown_vocabulary(initial_model(self.config.init_from).params, self.model_config.vocab_size)
        else:
            params = model_class(self.model_config).random(
                self.model_config, jax.random.fold_in(self.base_key, 0), self.config.init_scale).params
        return self.place_state(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params)))

    def evaluate(self, params, max_windows: int | None) -> dict[str, float]:
        """Mean loss over the first `max_windows` held-out windows (in stream order; None: all of them)."""
        windows = data_lib.eval_windows(self.data.heldout_stream, self.config.seq_len, max_windows, self.data.window_stride)
        return mean_eval_loss(self._eval_step, params, windows, self.config.batch_size, self.place_tokens)

    def step(self, state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on batch `step` (None: read `state.step`, a device-to-host sync; the training loop
        counts steps on the host instead, so it can queue the next step while the device runs this one)."""
        step = int(state.step) if step is None else step
        return self._train_step(state, self.place_tokens(self.batches.batch(step)))


class CheckpointStore:
    """The trainer's checkpoints: orbax CheckpointManager over {state, meta}; atomic per step, max_to_keep."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        self.manager.reload()
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        ocp = self._ocp
        step = int(state.step)
        host = to_host(state)  # numpy: a checkpoint of a sharded run loads on any devices
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"resume: no checkpoint under {str(self.directory)!r}")
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            )
        except Exception as error:
            raise ValueError(f"resume: checkpoint step {step} under {str(self.directory)!r} cannot be read: {error}") from None
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.close()


def grown_vocabulary(params: Any, vocab_size: int) -> Any:
    """float32 params with the embedding (and untied head) grown to vocab_size; new tokens (a mask token)
    start at the mean embedding. Existing rows are unchanged."""
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)  # the step donates its state
    embed = params["embed"]  # [V, D]
    extra = vocab_size - embed.shape[0]
    if extra < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the starting model's {embed.shape[0]}")
    if extra == 0:
        return params
    grown = dict(params, embed=jnp.concatenate([embed, jnp.broadcast_to(embed.mean(0), (extra, embed.shape[1]))]))
    if "lm_head" in params:  # [D, V]
        head = params["lm_head"]
        grown["lm_head"] = jnp.concatenate([head, jnp.broadcast_to(head.mean(1, keepdims=True), (head.shape[0], extra))], 1)
    return grown


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _trajectory(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    return {name: values[name] for name in _TRAJECTORY_FIELDS}


def train(
    config: TrainConfig, *, resume: bool = False, stop_at_step: int | None = None, log=None, data: PreparedData | None = None,
    mesh: Mesh | str | None = None,
) -> TrainResult:
    """Train a recipe; see the module docstring for what is guaranteed.

    resume: continue from the latest checkpoint under out_dir/checkpoints (its recipe must agree on every field
        that shapes the trajectory); without it an existing checkpoint directory raises ValueError.
    stop_at_step: stop (after checkpointing) once this many steps are done, as if interrupted there.
    log: a callable for progress lines (default: print to stderr, one line per log_every steps).
    mesh: data-parallel training on a mesh (`jspec.sharding.make_mesh(data=N)` or "data=N"): each batch split over its
        "data" axis, parameters and optimizer state replicated. ArgumentError (before anything runs) for a model
        axis above 1 or a data axis that does not divide batch_size.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    mesh = training_mesh(mesh, config.batch_size)
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else prepare_data(config, log)
    trainer = Trainer(config, data, mesh)
    store = CheckpointStore(out / "checkpoints", config.keep_checkpoints)
    tokens_per_step = config.batch_size * config.seq_len
    log(
        f"model: {trainer.model_config.num_parameters():,} parameters ({trainer.model_config.num_layers} layers, hidden "
        f"{trainer.model_config.hidden_size}); {config.steps} steps x {tokens_per_step} tokens, compute {config.compute_dtype}"
        + (f", data parallel on mesh {describe(mesh)}" if mesh is not None else "")
    )

    prior_seconds = 0.0
    latest = store.latest_step()
    if latest is not None and not resume:
        store.close()
        raise ValueError(f"out_dir: {str(out)!r} already holds checkpoints (step {latest}); pass resume=True (--resume) or another out_dir")
    state = trainer.init_state()
    history: list[dict[str, Any]] = []
    if resume and latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, meta = store.restore(abstract)  # onto this run's devices (replicated on its mesh), whatever wrote it
        saved = meta.get("trajectory", {})
        differing = sorted(k for k, v in _trajectory(config).items() if saved.get(k) != v)
        if differing:
            store.close()
            raise ValueError(f"resume: the recipe differs from the checkpoint's in {differing}")
        for key, value in (("tokenizer_sha256", data_lib.tokenizer_digest(data.tokenizer)), ("corpus_digest", data.manifest["digest"])):
            if meta.get(key) != value:
                store.close()
                raise ValueError(f"resume: the checkpoint was trained with a different {key.split('_')[0]} ({key} differs)")
        if meta.get("data_position") != int(state.step):
            store.close()
            raise ValueError(f"resume: checkpoint data position {meta.get('data_position')} != step {int(state.step)}")
        prior_seconds = float(meta.get("wall_seconds", 0.0))
        history = _read_history(out / "metrics.jsonl", int(state.step))
        log(f"resume: from step {int(state.step)} ({str(store.directory)})")
    elif resume:
        log("resume: no checkpoint yet, starting from step 0")
    (out / "recipe.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    def meta_for(state: TrainState, elapsed: float) -> dict[str, Any]:
        return {
            "step": int(state.step),
            "data_position": int(state.step),  # batches consumed; PackedBatches.batch(step) is the next one
            "tokens_seen": int(state.step) * tokens_per_step,
            "wall_seconds": elapsed,
            "trajectory": _trajectory(config),
            "tokenizer_sha256": data_lib.tokenizer_digest(data.tokenizer),
            "corpus_digest": data.manifest["digest"],
        }

    end_step = config.steps if stop_at_step is None else min(config.steps, stop_at_step)
    started = time.perf_counter()
    window_started, window_steps, pending = time.perf_counter(), 0, []
    metrics_file = (out / "metrics.jsonl").open("a")
    last_eval: dict[str, float] = {}
    try:
        step = int(state.step)  # counted on the host from here: no device-to-host sync per step
        while step < end_step:
            state, metrics = trainer.step(state, step)
            step += 1
            pending.append((step, metrics))
            window_steps += 1
            if step % config.log_every == 0 or step == end_step:
                fetched = [(s, {k: float(v) for k, v in to_host(m).items()}) for s, m in pending]
                pending = []
                now = time.perf_counter()
                tokens_per_second = window_steps * tokens_per_step / max(now - window_started, 1e-9)
                window_started, window_steps = now, 0
                for s, m in fetched:
                    row = {"step": s, **{k: v for k, v in m.items() if k not in ("loss_sum", "token_count")}}
                    history.append(row)
                    metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                mean_loss = sum(m["loss"] for _, m in fetched) / len(fetched)
                elapsed = now - started
                eta = (end_step - step) * tokens_per_step / max(tokens_per_second, 1e-9)
                log(
                    f"step {step}/{config.steps} | loss {mean_loss:.4f} | lr {fetched[-1][1]['learning_rate']:.2e} | "
                    f"gnorm {fetched[-1][1]['grad_norm']:.3f} | {tokens_per_second:,.0f} tok/s | "
                    f"{_format_seconds(prior_seconds + elapsed)} elapsed | eta {_format_seconds(eta)}"
                )
            if config.eval_every and step % config.eval_every == 0 and step < end_step:
                eval_started = time.perf_counter()
                last_eval = trainer.evaluate(state.params, config.eval_windows)
                log(f"eval @ {step}: loss {last_eval['eval_loss']:.4f} ppl {last_eval['eval_perplexity']:.2f} ({last_eval['eval_tokens']} tokens, {time.perf_counter() - eval_started:.1f}s)")
                metrics_file.write(json.dumps({"step": step, **last_eval}) + "\n")
                metrics_file.flush()
                window_started = time.perf_counter()
            if step % config.checkpoint_every == 0 or step == end_step:
                store.save(state, meta_for(state, prior_seconds + time.perf_counter() - started))
                window_started = time.perf_counter()
    finally:
        metrics_file.close()
    wall_seconds = prior_seconds + time.perf_counter() - started
    steps_done = int(state.step)

    final_eval: dict[str, Any] = {}
    if steps_done >= config.steps:
        final_eval = trainer.evaluate(state.params, config.final_eval_windows)
        log(
            f"final eval: loss {final_eval['eval_loss']:.4f} ppl {final_eval['eval_perplexity']:.2f} "
            f"over {final_eval['eval_windows']} held-out windows ({final_eval['eval_tokens']} tokens)"
        )
    store.close()
    recent = [h["loss"] for h in history if "loss" in h][-50:]
    model = model_class(trainer.model_config)(params=to_host(state.params), config=trainer.model_config, tokenizer=data.tokenizer)
    model = model.replace(params=jax.tree.map(jnp.asarray, model.params))
    result = TrainResult(
        model=model,
        steps=steps_done,
        tokens_seen=steps_done * tokens_per_step,
        wall_seconds=wall_seconds,
        train_loss=float(np.mean(recent)) if recent else float("nan"),
        eval_loss=final_eval.get("eval_loss"),
        eval_perplexity=final_eval.get("eval_perplexity"),
        eval_tokens=final_eval.get("eval_tokens", 0),
        history=history,
        out_dir=out,
    )
    if steps_done >= config.steps:
        from jspec.loading import save

        save(model, out / "model", overwrite=True)  # an orbax checkpoint (a recurrent-depth model: a Huginn directory)
        summary = {
            "name": config.name,
            "steps": steps_done,
            "tokens_seen": result.tokens_seen,
            "wall_seconds": wall_seconds,
            "train_loss_last50": result.train_loss,
            "num_parameters": trainer.model_config.num_parameters(),
            "train_tokens": int(len(data.train_stream)),
            "heldout_tokens": int(len(data.heldout_stream)),
            **final_eval,
            "eval_slice": (
                (data.eval_slice or f"held-out split of the corpus manifest, tokenized in manifest order with EOS after each "
                 f"file, cut into windows of seq_len+1={config.seq_len + 1} tokens at stride {config.seq_len}")
                + f"; first {final_eval.get('eval_windows')} windows; "
                + EVAL_METRICS.get(config.objective, f"the {config.objective!r} objective's loss")
            ),
            "corpus": data.corpus_summary
            or {k: data.manifest[k] for k in ("python_version", "num_files", "num_bytes", "num_heldout_files", "digest")},
            "tokenizer_sha256": data_lib.tokenizer_digest(data.tokenizer),
            "hardware": {**_hardware(), **({"mesh": describe(mesh)} if mesh is not None else {})},
        }
        (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(f"done: {steps_done} steps, {result.tokens_seen:,} tokens, {_format_seconds(wall_seconds)}; model saved to {out / 'model'}")
    return result


def _read_history(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row and row["step"] <= up_to_step:
            rows.append(row)
    by_step = {row["step"]: row for row in rows}  # a resumed run rewrites the steps after its checkpoint
    return [by_step[s] for s in sorted(by_step)]


def _hardware() -> dict[str, Any]:
    import platform

    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
