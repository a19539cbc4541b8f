"""Training objectives: pluggable loss functions the one trainer calls.

An objective is built by a factory registered under a name (`register_objective`), from the model config and
the recipe's `objective_options`, and is then a pure function

    objective(params, batch, key) -> (loss, metrics)

- params: the parameter pytree in the compute dtype (the trainer casts fp32 master weights before the call);
- batch: {"tokens": int32 [B, L + 1]} packed windows (objectives take what they need: a causal LM predicts
  tokens[:, 1:] from tokens[:, :-1]; a diffusion objective would mask a subset of tokens[:, :L]);
- key: a PRNG key unique to the step (`fold_in(seed, step)`), for objectives that sample (masking, noise);
- loss: the scalar that is differentiated;
- metrics: at least "loss_sum" and "token_count" (float32 scalars), so evaluation can average over many
  batches exactly; anything else is logged.

Registered here: "causal_lm", "masked_diffusion" (LLaDA / MDLM, optionally Dream's shifted logits),
"block_diffusion" (Fast-dLLM v2: [noisy ; clean] with complementary masks and token shift), "recurrent_lm"
(a recurrent-depth model with Huginn's recurrence sampling) and "distill" (a student, e.g. a speculative draft,
trained on a frozen teacher's next-token distributions over the same windows). Evaluation passes the batch with "evaluation": True,
for objectives that compute differently there (recurrent_lm: a fixed r). Others register beside them (`register_objective(name, factory)`) without touching the trainer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from jspec import masks
from jspec.models import transformer
from jspec.models.config import TransformerConfig
from jspec.validation import ArgumentError, check_float

Metrics = dict[str, jax.Array]


class Objective(Protocol):
    def __call__(self, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]: ...


ObjectiveFactory = Callable[..., Objective]  # factory(config: TransformerConfig, **options) -> Objective

_OBJECTIVES: dict[str, ObjectiveFactory] = {}


def register_objective(name: str, factory: ObjectiveFactory) -> None:
    _OBJECTIVES[name] = factory


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


def make_objective(name: str, config: TransformerConfig, **options: Any) -> Objective:
    if name not in _OBJECTIVES:
        raise ValueError(f"objective: unknown {name!r}; registered objectives are {objective_names()}")
    return _OBJECTIVES[name](config, **options)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:  # logits [B, T, V] f32, targets [B, T]
    """Per-token cross-entropy [B, T] in float32."""
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_normalizer - target_logits


def causal_lm(config: TransformerConfig, ignore_token_id: int | None = None) -> Objective:
    """Next-token cross-entropy over every position of the packed window, through the one `forward`.

    ignore_token_id: targets equal to it are left out of the loss (e.g. padding); None keeps all.
    """

    def objective(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]:
        del key  # deterministic objective
        tokens = batch["tokens"]  # [B, L + 1]
        targets = tokens[:, 1:]
        logits = causal_logits(params, config, tokens)
        losses = token_cross_entropy(logits, targets)
        weights = jnp.ones_like(losses) if ignore_token_id is None else (targets != ignore_token_id).astype(jnp.float32)
        loss_sum = jnp.sum(losses * weights)
        token_count = jnp.sum(weights)
        loss = loss_sum / jnp.maximum(token_count, 1.0)
        accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights) / jnp.maximum(token_count, 1.0)
        return loss, {"loss_sum": loss_sum, "token_count": token_count, "accuracy": accuracy}

    return objective


def _require_diffusion(config: TransformerConfig, objective: str, kind: str) -> None:
    if config.diffusion != kind or config.mask_token_id is None:
        raise ValueError(
            f"objective {objective!r}: needs a model with diffusion={kind!r} and a mask_token_id (set them in the "
            f"recipe's model and mask_token); got diffusion={config.diffusion!r}, mask_token_id={config.mask_token_id!r}"
        )


def _positions(batch_size: int, length: int) -> jax.Array:  # [B, L] int32
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch_size, length))


def masked_diffusion(config: TransformerConfig, min_mask_ratio: float = 1e-3) -> Objective:
    """The masked-diffusion (LLaDA / MDLM) objective over each window's first L tokens, bidirectional.

    Per row a ratio t ~ U[min_mask_ratio, 1); each token is replaced by the mask token with probability t; the
    loss is the cross-entropy at masked positions weighted by 1/t, summed and divided by the number of
    predictable positions. Its expectation is the negative ELBO per token, an upper bound on the model's
    negative log-likelihood in nats/token (comparable to a causal LM's loss). With `config.shifted_logits`
    (Dream) a position is predicted by the previous position's logits and the first position is never masked.
    """
    _require_diffusion(config, "masked_diffusion", "masked")
    shifted = config.shifted_logits

    def objective(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]:
        tokens = batch["tokens"][:, :-1]  # [B, L]
        batch_size, length = tokens.shape
        ratio_key, mask_key = jax.random.split(key)
        ratio = jax.random.uniform(ratio_key, (batch_size, 1), minval=min_mask_ratio, maxval=1.0)
        masked = jax.random.uniform(mask_key, (batch_size, length)) < ratio
        if shifted:
            masked = masked.at[:, 0].set(False)
        noisy = jnp.where(masked, config.mask_token_id, tokens)
        everything = jnp.ones((batch_size, length, length), bool)
        logits, _ = transformer.forward(params, config, noisy, _positions(batch_size, length), mask=everything)
        aligned = transformer.position_logits(logits, shifted)
        losses = token_cross_entropy(aligned, tokens)
        loss_sum = jnp.sum(jnp.where(masked, losses / ratio, 0.0))
        token_count = jnp.float32(batch_size * (length - int(shifted)))
        hits = (jnp.argmax(aligned, -1) == tokens) & masked
        accuracy = jnp.sum(hits) / jnp.maximum(jnp.sum(masked), 1)
        return loss_sum / token_count, {"loss_sum": loss_sum, "token_count": token_count, "accuracy": accuracy}

    return objective


def complementary_masks(key: jax.Array, batch_size: int, length: int, block_size: int, min_mask_ratio: float) -> jax.Array:
    """[2B, L] bool: rows 0..B-1 mask each token with a per-(row, block) ratio t ~ U[min_mask_ratio, 1); row B + b
    is the complement of row b, so every token is masked in exactly one of the pair."""
    ratio_key, mask_key = jax.random.split(key)
    ratio = jax.random.uniform(ratio_key, (batch_size, length // block_size), minval=min_mask_ratio, maxval=1.0)
    masked = jax.random.uniform(mask_key, (batch_size, length)) < jnp.repeat(ratio, block_size, axis=1)
    return jnp.concatenate([masked, ~masked])


def block_diffusion(config: TransformerConfig, min_mask_ratio: float = 1e-3) -> Objective:
    """The block-diffusion (Fast-dLLM v2) objective over each window's first L tokens (L a multiple of
    `config.diffusion_block_size`).

    Per row and block a ratio t ~ U[min_mask_ratio, 1) masks tokens; the row appears twice, with the mask m and
    its complement 1 - m, so every token is masked exactly once. Input is [noisy ; clean] (2L positions, both
    halves at positions 0..L-1) under `masks.block_diffusion_training_mask`. Token shift: a position is predicted
    by the previous position's logits, from the noisy half inside a block and from the clean half at a block's
    first position (at inference that token comes from the last logit of the committed block before it). The
    loss is the mean cross-entropy over all predictable tokens, each counted once (where it was masked).
    """
    _require_diffusion(config, "block_diffusion", "block")
    if not config.shifted_logits:
        raise ValueError("objective 'block_diffusion': needs shifted_logits=True (Fast-dLLM v2's token shift)")
    block_size = config.diffusion_block_size

    def objective(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]:
        tokens = batch["tokens"][:, :-1]  # [B, L]
        batch_size, length = tokens.shape
        if length % block_size:
            raise ValueError(f"block_diffusion: window length {length} is not a multiple of block size {block_size}")
        masked = complementary_masks(key, batch_size, length, block_size, min_mask_ratio)  # [2B, L]
        clean = jnp.concatenate([tokens, tokens])
        noisy = jnp.where(masked, config.mask_token_id, clean)
        inputs = jnp.concatenate([noisy, clean], axis=1)  # [2B, 2L]
        positions = jnp.concatenate([_positions(2 * batch_size, length)] * 2, axis=1)
        attention = jnp.broadcast_to(masks.block_diffusion_training_mask(length, block_size), (2 * batch_size, 2 * length, 2 * length))
        logits, _ = transformer.forward(params, config, inputs, positions, mask=attention)
        noisy_logits, clean_logits = logits[:, : length - 1], logits[:, length : 2 * length - 1]
        starts_block = (jnp.arange(1, length) % block_size == 0)[None, :, None]
        predictor = jnp.where(starts_block, clean_logits, noisy_logits)  # [2B, L-1, V]: predicts positions 1..L-1
        losses = token_cross_entropy(predictor, clean[:, 1:])
        counted = masked[:, 1:]
        loss_sum = jnp.sum(jnp.where(counted, losses, 0.0))
        token_count = jnp.float32(batch_size * (length - 1))
        accuracy = jnp.sum((jnp.argmax(predictor, -1) == clean[:, 1:]) & counted) / token_count
        return loss_sum / token_count, {"loss_sum": loss_sum, "token_count": token_count, "accuracy": accuracy}

    return objective


def recurrent_nll(
    params: Any, config: Any, tokens: jax.Array, num_recurrences: Any, init_scale: Any = 0.0, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:  # tokens [B, L + 1] -> (loss_sum, token_count, accuracy)
    """Next-token cross-entropy of a recurrent-depth model run at r = num_recurrences (no gradient split)."""
    from jspec.models import recurrent

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, _ = recurrent.forward(params, config, inputs, _positions(*inputs.shape), num_recurrences=num_recurrences,
                                  init_scale=init_scale, key=key)
    losses = token_cross_entropy(logits, targets)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
    return jnp.sum(losses), jnp.float32(losses.size), accuracy


def sample_recurrences(key: jax.Array, mean: int, backprop_depth: int, max_recurrence: int,
                       sigma: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Huginn's "poisson-lognormal-filling" draw: lambda ~ LogNormal(ln(mean) - sigma^2 / 2, sigma), r ~ Poisson(lambda)
    + 1 (capped at max_recurrence); returns (recurrences without gradient max(r - k, 0), with gradient min(k, r))."""
    rate_key, count_key = jax.random.split(key)
    rate = jnp.exp(math.log(mean) - sigma**2 / 2 + sigma * jax.random.normal(rate_key, ()))
    total = jnp.minimum(jax.random.poisson(count_key, rate) + 1, max_recurrence).astype(jnp.int32)
    return jnp.maximum(total - backprop_depth, 0), jnp.minimum(total, backprop_depth)


def recurrent_lm(config: Any, init_scale: float = 1.0, max_recurrence: int | None = None, sigma: float = 0.5) -> Objective:
    """Next-token cross-entropy of a recurrent-depth model (jspec.models.recurrent) with Huginn's recurrence sampling:
    per step one r drawn by `sample_recurrences` (mean config.mean_recurrence, at most max_recurrence, default 4x
    the mean); the first max(r - k, 0) recurrences run without gradient, the last min(k, r) with it (truncated
    backpropagation, k = config.mean_backprop_depth); the initial state is random at `init_scale` (1, as Huginn).
    Evaluation: r = config.mean_recurrence, s_0 = 0 (what decoding uses by default)."""
    from jspec.models import recurrent

    depth = config.mean_backprop_depth
    cap = max_recurrence or 4 * config.mean_recurrence

    def objective(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]:
        tokens = batch["tokens"]
        if batch.get("evaluation", False):
            loss_sum, count, accuracy = recurrent_nll(params, config, tokens, config.mean_recurrence)
            return loss_sum / count, {"loss_sum": loss_sum, "token_count": count, "accuracy": accuracy}
        draw_key, state_key = jax.random.split(key)
        without_grad, with_grad = sample_recurrences(draw_key, config.mean_recurrence, depth, cap, sigma)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        positions = _positions(*inputs.shape)
        context = recurrent.attention_context(config, positions, None, None, None)
        embedded, _ = recurrent.embed(params, config, inputs, None, context)
        state = recurrent.initial_state(config, state_key, positions, init_scale, embedded.dtype)
        frozen = jax.lax.stop_gradient((params, embedded))
        state, _, _, _ = recurrent.recur(*frozen[:1], config, frozen[1], state, without_grad, None, context)
        state = jax.lax.stop_gradient(state)

        def grad_step(state, index):
            step = lambda s: recurrent.core_step(params, config, s, embedded, 0, None, context)[0]  # noqa: E731
            return jax.lax.cond(index < with_grad, step, lambda s: s, state), None

        state, _ = jax.lax.scan(grad_step, state, jnp.arange(depth))
        logits, _ = recurrent.readout(params, config, state, None, context)
        losses = token_cross_entropy(logits, targets)
        loss_sum, count = jnp.sum(losses), jnp.float32(losses.size)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
        metrics = {"loss_sum": loss_sum, "token_count": count, "accuracy": accuracy,
                   "recurrences": (without_grad + with_grad).astype(jnp.float32)}
        return loss_sum / count, metrics

    return objective


def causal_logits(params: Any, config: TransformerConfig, tokens: jax.Array) -> jax.Array:  # tokens [B, L + 1] -> [B, L, V]
    """Next-token logits at every position of tokens[:, :-1], causal over the chunk (the one `forward`)."""
    inputs = tokens[:, :-1]
    logits, _ = transformer.forward(params, config, inputs, _positions(*inputs.shape))
    return logits


def distillation_losses(
    student_logits: jax.Array,  # [B, T, V]
    teacher_logits: jax.Array,  # [B, T, V]
    targets: jax.Array,  # [B, T] the data's next tokens
    temperature: float,
    kl_weight: float,
    hard_label_weight: float,
    teacher_argmax_weight: float,
) -> dict[str, jax.Array]:  # each [B, T] float32
    """Per-token distillation terms in float32: "kl" = T^2 KL(teacher_T || student_T) over softmaxes at temperature T
    (Hinton et al.'s scaling keeps its gradient's size independent of T), "hard" = cross-entropy on the data's token,
    "argmax" = cross-entropy on the teacher's argmax token (what top-1 agreement and greedy speculative acceptance
    count), and "loss" = their weighted sum."""
    student = student_logits.astype(jnp.float32)
    teacher = teacher_logits.astype(jnp.float32)
    teacher_log_probs = jax.nn.log_softmax(teacher / temperature, axis=-1)
    student_log_probs = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = temperature**2 * jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    hard = token_cross_entropy(student, targets)
    argmax = token_cross_entropy(student, jnp.argmax(teacher, axis=-1))
    loss = kl_weight * kl + hard_label_weight * hard + teacher_argmax_weight * argmax
    return {"loss": loss, "kl": kl, "hard": hard, "argmax": argmax}


def check_distill_options(temperature: Any, kl_weight: Any, hard_label_weight: Any, teacher_argmax_weight: Any) -> None:
    """ArgumentError naming the objective_options field that is out of range."""
    check_float("objective_options.temperature", temperature, lambda t: t > 0, "a number > 0")
    weights = {"kl_weight": kl_weight, "hard_label_weight": hard_label_weight, "teacher_argmax_weight": teacher_argmax_weight}
    for name, value in weights.items():
        check_float(f"objective_options.{name}", value, lambda w: w >= 0, "a number >= 0")
    if not any(float(w) > 0 for w in weights.values()):
        raise ArgumentError(f"objective_options: expected at least one of {sorted(weights)} > 0, got {weights}")


def load_teacher(teacher: Any, config: TransformerConfig) -> Any:
    """The teacher model `teacher` names (a shipped model name or a path `jspec.load` reads), loaded once per process
    (float32), checked to share the student's vocabulary; ArgumentError naming objective_options.teacher otherwise."""
    from jspec.models.model import Model
    from jspec.train.trainer import initial_model

    if not isinstance(teacher, str) or not teacher:
        raise ArgumentError(f"objective_options.teacher: expected a model name or path (str), got {teacher!r}")
    try:
        model = initial_model(teacher)
    except (ValueError, OSError) as error:
        raise ArgumentError(f"objective_options.teacher: cannot load {teacher!r}: {error}") from None
    if not isinstance(model, Model):
        raise ArgumentError(f"objective_options.teacher: {teacher!r} is not a transformer LM ({type(model).__name__})")
    if model.config.vocab_size != config.vocab_size:
        raise ArgumentError(
            f"objective_options.teacher: {teacher!r} has vocab_size {model.config.vocab_size}, the student "
            f"{config.vocab_size}; distillation needs the same vocabulary")
    return model


def distill(
    config: TransformerConfig,
    teacher: Any = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    hard_label_weight: float = 0.0,
    teacher_argmax_weight: float = 0.0,
) -> Objective:
    """Knowledge distillation of a causal LM (the student, e.g. a speculative draft) from a frozen teacher over the
    same packed windows: per position the weighted sum of `distillation_losses`' terms, averaged over all targets.

    teacher: a model name or path (`jspec.load`), loaded once per process and frozen (no gradient flows into it); its
        logits are computed inside the jitted step (in the student's compute dtype), so the data need nothing extra.
    Metrics: loss_sum / token_count (the objective), kl, hard_cross_entropy, teacher_agreement (the fraction of
    positions where the student's argmax equals the teacher's: the top-1 agreement of the demo card) and accuracy.
    """
    check_distill_options(temperature, kl_weight, hard_label_weight, teacher_argmax_weight)
    teacher_model = load_teacher(teacher, config)
    teacher_config = teacher_model.config.replace(dtype=config.dtype)
    teacher_params = jax.tree.map(lambda x: jnp.asarray(x, config.dtype), teacher_model.params)

    def objective(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, Metrics]:
        del key  # deterministic objective
        tokens = batch["tokens"]  # [B, L + 1]
        targets = tokens[:, 1:]
        teacher_logits = jax.lax.stop_gradient(causal_logits(teacher_params, teacher_config, tokens))
        student_logits = causal_logits(params, config, tokens)
        terms = distillation_losses(student_logits, teacher_logits, targets, temperature, kl_weight,
                                    hard_label_weight, teacher_argmax_weight)
        token_count = jnp.float32(targets.size)
        loss_sum = jnp.sum(terms["loss"])
        student_top = jnp.argmax(student_logits, axis=-1)
        metrics = {
            "loss_sum": loss_sum, "token_count": token_count,
            "kl": jnp.mean(terms["kl"]), "hard_cross_entropy": jnp.mean(terms["hard"]),
            "teacher_agreement": jnp.mean(student_top == jnp.argmax(teacher_logits, axis=-1)),
            "accuracy": jnp.mean(student_top == targets),
        }
        return loss_sum / token_count, metrics

    return objective


register_objective("causal_lm", causal_lm)
register_objective("recurrent_lm", recurrent_lm)
register_objective("masked_diffusion", masked_diffusion)
register_objective("block_diffusion", block_diffusion)
register_objective("distill", distill)
