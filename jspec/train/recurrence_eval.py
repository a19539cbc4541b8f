"""Measuring a recurrent-depth model (jspec.models.recurrent) on held-out code: loss against the number of
recurrences r, and the likelihood of decoded text under the model at a reference r. Shared by the demo's test,
benchmarks/bench_recurrent.py and colab/recurrent_depth.ipynb."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jspec.train import corpus, data
from jspec.train.objectives import recurrent_nll, token_cross_entropy


def heldout_windows(tokenizer: Any, seq_len: int, count: int) -> np.ndarray:  # [N, seq_len + 1] int32
    """The first `count` windows of the demo corpus's held-out standard-library files (the demo models never
    trained on them), tokenized in manifest order with EOS after each file, as the trainer evaluates."""
    from jspec.loading import ASSETS_DIR

    manifest = corpus.load_manifest(ASSETS_DIR / "demo-code" / "corpus_manifest.json")
    stream = data.tokenize_documents(tokenizer, corpus.load_documents(manifest, "heldout", root=corpus.stdlib_root()))
    return data.eval_windows(stream, seq_len, count)


@partial(jax.jit, static_argnames=("config",))
def _loss_sum(params: Any, config: Any, tokens: jax.Array, num_recurrences: jax.Array) -> jax.Array:
    return recurrent_nll(params, config, tokens, num_recurrences)[0]


def heldout_loss(model: Any, windows: np.ndarray, num_recurrences: int, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over `windows` at r = num_recurrences, s_0 = 0. r is traced: one
    compiled program serves every r."""
    total = 0.0
    for start in range(0, len(windows), batch_size):
        chunk = jnp.asarray(windows[start:start + batch_size])
        total += float(_loss_sum(model.params, model.config, chunk, jnp.int32(num_recurrences)))
    return total / (len(windows) * (windows.shape[1] - 1))


def output_nll(model: Any, prompt: Sequence[int], tokens: Sequence[int], num_recurrences: int) -> float:
    """Mean negative log-likelihood (nats per token) of `tokens` following `prompt` under the model at r (full
    recomputation, s_0 = 0): how likely a decoder's output is under the model run at a reference depth."""
    if not tokens:
        return float("nan")
    sequence = jnp.asarray(list(prompt) + list(tokens), jnp.int32)[None]
    logits = _logits(model.params, model.config, sequence, jnp.int32(num_recurrences))
    losses = token_cross_entropy(logits[:, len(prompt) - 1:-1], sequence[:, len(prompt):])
    return float(jnp.mean(losses))


@partial(jax.jit, static_argnames=("config",))
def _logits(params: Any, config: Any, tokens: jax.Array, num_recurrences: jax.Array) -> jax.Array:
    from jspec.models import recurrent

    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return recurrent.forward(params, config, tokens, positions, num_recurrences=num_recurrences)[0]


def agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of the reference's positions where `tokens` holds the same token (a shorter output counts its
    missing positions as disagreements)."""
    if not reference:
        return float("nan")
    return sum(a == b for a, b in zip(tokens, reference)) / len(reference)


def export_demo(run_dir: str | Path, destination: str | Path, *, step: int | None = None, overwrite: bool = False,
                note: str | None = None) -> dict[str, Any]:
    """Ship a recurrent-depth run (`jspec train --recipe demo-code-recurrent`) as a Huginn directory: the finished
    model (run_dir/model), or the checkpoint at `step` (default the latest) of a run stopped before its last step;
    then training_recipe.json and training_result.json (the held-out loss at every r of `heldout_loss`'s table is
    left to the benchmark). Returns the result written."""
    import json
    import time

    from jspec.loading import load, save
    from jspec.models.recurrent import RecurrentModel
    from jspec.train import trainer

    run_dir, destination = Path(run_dir), Path(destination)
    recipe = json.loads((run_dir / "recipe.json").read_text())
    config = trainer.TrainConfig.from_dict(recipe)
    if step is None and (run_dir / "result.json").is_file():
        model, result = load(run_dir / "model"), json.loads((run_dir / "result.json").read_text())
    else:
        tokenizer = data.load_tokenizer(config.tokenizer)
        model_cfg = trainer.model_config(config, tokenizer)
        params = jax.eval_shape(lambda: RecurrentModel.random(model_cfg, 0).params)
        opt_state = jax.eval_shape(trainer.make_optimizer(config).init, params)
        abstract = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state)
        store = trainer.CheckpointStore(run_dir / "checkpoints", config.keep_checkpoints)
        state, meta = store.restore(abstract, step)
        store.close()
        model = RecurrentModel(params=jax.tree.map(jnp.asarray, state.params), config=model_cfg, tokenizer=tokenizer)
        started = time.perf_counter()
        windows = heldout_windows(tokenizer, config.seq_len, 10**9)
        loss = heldout_loss(model, windows, model_cfg.mean_recurrence)
        result = {"name": config.name, "steps": int(state.step), "scheduled_steps": config.steps,
                  "tokens_seen": int(state.step) * config.batch_size * config.seq_len,
                  "wall_seconds": meta.get("wall_seconds"), "num_parameters": model_cfg.num_parameters(),
                  "eval_loss": loss, "eval_perplexity": float(np.exp(loss)), "eval_windows": len(windows),
                  "eval_seconds": time.perf_counter() - started,
                  "eval_slice": f"held-out split of the demo corpus, windows of {config.seq_len + 1} tokens at stride "
                                f"{config.seq_len}; mean next-token cross-entropy at r={model_cfg.mean_recurrence}, s_0 = 0",
                  "note": note or f"training stopped at step {int(state.step)} of the {config.steps}-step schedule "
                                  "(CPU time); exported from that checkpoint"}
    model = model.replace(config=model.config.replace(name=destination.name))
    save(model, destination, overwrite=overwrite)
    (destination / "training_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    (destination / "training_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
