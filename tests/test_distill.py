"""The `distill` objective: a student trained on a frozen teacher's next-token distributions."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config, tiny_model
from test_train import corpus_root, finished_demo_runs, manifest, tokenizer  # noqa: F401  (fixtures the export test uses)

import jspec
from jspec.train import objectives, train
from jspec.validation import ArgumentError


@pytest.fixture(scope="module")
def teacher() -> jspec.Model:
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def student() -> jspec.Model:
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory, teacher) -> str:
    path = tmp_path_factory.mktemp("teacher") / "model"
    jspec.loading.save(teacher, path)
    return str(path)


def random_windows(seed: int, vocab_size: int, shape=(4, 17)) -> jax.Array:  # [B, L + 1]
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab_size, dtype=jnp.int32)


def test_distillation_terms_match_a_direct_computation(student, teacher):
    tokens = random_windows(0, student.config.vocab_size)
    logits = jax.jit(objectives.causal_logits, static_argnums=1)
    student_logits, teacher_logits = logits(student.params, student.config, tokens), logits(teacher.params, teacher.config, tokens)
    terms = jax.jit(objectives.distillation_losses, static_argnums=(3, 4, 5, 6))(
        student_logits, teacher_logits, tokens[:, 1:], 2.0, 1.0, 0.3, 0.5)
    p = jax.nn.softmax(teacher_logits / 2.0)
    expected_kl = 4.0 * jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(student_logits / 2.0)), -1)
    np.testing.assert_allclose(terms["kl"], expected_kl, rtol=1e-4, atol=1e-6)
    log_q = jax.nn.log_softmax(student_logits)
    expected_argmax = -jnp.take_along_axis(log_q, jnp.argmax(teacher_logits, -1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(terms["argmax"], expected_argmax, rtol=1e-5)
    expected_hard = -jnp.take_along_axis(log_q, tokens[:, 1:, None], -1)[..., 0]  # cross-entropy on the data's tokens
    np.testing.assert_allclose(terms["hard"], expected_hard, rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], terms["kl"] + 0.3 * terms["hard"] + 0.5 * terms["argmax"], rtol=1e-6)
    same = objectives.distillation_losses(teacher_logits, teacher_logits, tokens[:, 1:], 1.0, 1.0, 0.0, 0.0)
    np.testing.assert_allclose(same["kl"], 0.0, atol=1e-5)


def test_distill_gradient_moves_the_student_toward_the_teacher(student, teacher, teacher_path):
    """A few Adam steps on the objective lower the KL to the teacher on held-out windows and raise top-1 agreement;
    the teacher gets no gradient, and the metrics carry loss_sum / token_count."""
    objective = objectives.make_objective("distill", student.config, teacher=teacher_path, teacher_argmax_weight=0.5)
    heldout = {"tokens": random_windows(99, student.config.vocab_size)}
    optimizer = optax.adam(3e-2)

    @jax.jit
    def step(params, opt_state, tokens):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, {"tokens": tokens}, jax.random.key(0))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    params, opt_state = student.params, optimizer.init(student.params)
    loss, before = objective(params, heldout, jax.random.key(0))
    assert float(before["token_count"]) == 4 * 16
    np.testing.assert_allclose(float(before["loss_sum"]) / float(before["token_count"]), float(loss), rtol=1e-6)
    for index in range(12):
        params, opt_state, _ = step(params, opt_state, random_windows(index, student.config.vocab_size))
    _, after = objective(params, heldout, jax.random.key(0))
    assert float(after["kl"]) < 0.7 * float(before["kl"])
    assert float(after["teacher_agreement"]) > float(before["teacher_agreement"])
    _, teacher_self = objectives.make_objective("distill", teacher.config, teacher=teacher_path)(teacher.params, heldout, None)
    assert float(teacher_self["kl"]) < 1e-5 and float(teacher_self["teacher_agreement"]) == 1.0


def test_distill_trains_through_the_trainer(tmp_path):
    """`jspec train` with objective "distill": the teacher is loaded once, frozen, evaluated inside the jitted step."""
    from test_train import make_corpus_root, make_prepared, make_tokenizer, tiny_recipe

    from jspec.train import corpus

    stdlib = corpus.build_manifest(make_corpus_root(tmp_path / "stdlib"), heldout_fraction=0.2)
    prepared = make_prepared(stdlib, make_tokenizer(stdlib))
    teacher = tiny_model("llama", seed=0, vocab_size=prepared.tokenizer.vocab_size)
    jspec.loading.save(teacher, tmp_path / "teacher")
    recipe = tiny_recipe(tmp_path, steps=4, objective="distill",
                         objective_options={"teacher": str(tmp_path / "teacher"), "hard_label_weight": 0.1})
    result = train(recipe, data=prepared, log=lambda line: None)
    assert [row["step"] for row in result.history] == [1, 2, 3, 4]
    assert all(np.isfinite(row["kl"]) and 0 <= row["teacher_agreement"] <= 1 for row in result.history)
    assert result.eval_loss is not None and np.isfinite(result.eval_loss)


@pytest.mark.parametrize(
    "options, field",
    [
        ({}, "objective_options.teacher"),
        ({"teacher": 3}, "objective_options.teacher"),
        ({"teacher": "/no/such/model"}, "objective_options.teacher"),
        ({"teacher": "TEACHER", "temperature": 0}, "objective_options.temperature"),
        ({"teacher": "TEACHER", "temperature": "2"}, "objective_options.temperature"),
        ({"teacher": "TEACHER", "kl_weight": -1.0}, "objective_options.kl_weight"),
        ({"teacher": "TEACHER", "teacher_argmax_weight": float("nan")}, "objective_options.teacher_argmax_weight"),
        ({"teacher": "TEACHER", "kl_weight": 0.0}, "objective_options: expected at least one of"),
    ],
)
def test_distill_rejects_bad_options_naming_the_field(options, field, teacher_path):
    options = {k: teacher_path if v == "TEACHER" else v for k, v in options.items()}
    with pytest.raises(ArgumentError, match=f"^{field}"):
        objectives.make_objective("distill", tiny_config("llama"), **options)


def test_distill_rejects_a_teacher_with_another_vocabulary(teacher_path):
    with pytest.raises(ArgumentError, match="^objective_options.teacher: .* vocab_size 97, the student 50"):
        objectives.make_objective("distill", tiny_config("llama", vocab_size=50), teacher=teacher_path)


def test_the_distilled_draft_recipe_loads():
    from jspec.train import TrainConfig

    recipe = TrainConfig.from_recipe("demo-code-draft-distill")
    assert recipe.objective == "distill" and recipe.init_from and recipe.objective_options["teacher"] == "demo-code"
    options = {k: v for k, v in recipe.objective_options.items() if k != "teacher"}
    objectives.check_distill_options(**{"temperature": 1.0, "kl_weight": 1.0, "hard_label_weight": 0.0,
                                        "teacher_argmax_weight": 0.0, **options})


def test_demo_export_ships_the_distilled_draft_with_its_first_stage(finished_demo_runs, tmp_path):  # noqa: F811
    """With a finished demo-code-draft-distill run, the export ships its model as demo-code-draft, with its recipe and
    result, and the plain-LM run's recipe and result beside them as the first stage."""
    from jspec.checkpoint import orbax_store
    from jspec.checkpoint.hf import load_hf
    from jspec.train import demo

    plain = finished_demo_runs / demo.DRAFT
    distilled = finished_demo_runs / demo.DRAFT_DISTILL
    distilled.mkdir()
    (distilled / "result.json").write_text('{"corpus": {"digest": "stub"}, "stage": "distill"}')
    (distilled / "recipe.json").write_text('{"heldout_fraction": 0.2, "objective": "distill"}')
    student = tiny_model("llama", seed=5).replace(tokenizer=orbax_store.restore(plain / "model").tokenizer)
    orbax_store.save(student, distilled / "model")
    demo.export(finished_demo_runs, tmp_path / "assets")
    shipped = tmp_path / "assets" / demo.DRAFT
    for a, b in zip(jax.tree.leaves(student.params), jax.tree.leaves(load_hf(shipped).params)):
        np.testing.assert_array_equal(a, b)
    assert json.loads((shipped / "training_result.json").read_text())["stage"] == "distill"
    assert (shipped / demo.INIT_FILES["result"]).read_text() == (plain / "result.json").read_text()
    assert (shipped / demo.INIT_FILES["recipe"]).read_text() == (plain / "recipe.json").read_text()
