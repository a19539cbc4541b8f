"""Recurrent-depth models (jspec.models.recurrent) and their decoders (jspec.strategies.recurrent): a plain reference
loop (no cache, full recomputation) against cached decoding, the shared-slot cache where it is exact and where it
is not, diffusion forcing against `recurrent`, adaptive exit, errors, and the Huginn-0125 checkpoint format."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.checkpoint import huginn
from jspec.models import recurrent as rc
from tests.conftest import tiny_model

CONFIG = rc.RecurrentConfig(vocab_size=61, hidden_size=32, num_heads=4, intermediate_size=48, num_prelude_layers=1,
                            num_core_layers=2, num_coda_layers=1, mean_recurrence=4)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]  # ragged
NEW = 10


@pytest.fixture(scope="module")
def model() -> rc.RecurrentModel:
    """A tiny random model whose latents settle within a few recurrences (so freezing and exits happen)."""
    return rc.RecurrentModel.random(CONFIG, 0, init_scale=0.1)


# --- a reference written from the description: no cache, the whole sequence recomputed --------------------------


def _rms(x, w, eps=1e-6):
    return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def _rope(x, theta):  # x [T, H, Dh], rotate-half, positions 0..T-1
    dh = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh)
    ang = np.arange(x.shape[0])[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rotated = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * cos + rotated * sin


def _block(p, i, x, config):  # the sandwich block of layer i of stack p, causal over x [T, D]
    t, h = x.shape[0], config.num_heads
    n = _rms(x, p["norm_1"][i])
    q = (n @ p["q"][i] + p["q_bias"][i]).reshape(t, h, -1)
    k = (n @ p["k"][i] + p["k_bias"][i]).reshape(t, h, -1)
    v = (n @ p["v"][i]).reshape(t, h, -1)
    q, k = _rope(q, config.rope_theta), _rope(k, config.rope_theta)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("hts,shd->thd", probs, v).reshape(t, -1) @ p["o"][i]
    x = _rms(attended + x, p["norm_2"][i])
    n = _rms(x, p["norm_3"][i])
    gate = n @ p["gate"][i]
    return _rms((gate / (1 + np.exp(-gate)) * (n @ p["up"][i])) @ p["down"][i] + x, p["norm_4"][i])


def reference_logits(params, config, tokens, r):  # tokens [T] -> logits [T, V], float64, s_0 = 0
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    e = p["embed"][np.asarray(tokens)] * math.sqrt(config.hidden_size)
    for i in range(config.num_prelude_layers):
        e = _block(p["prelude"], i, e, config)
    s = np.zeros_like(e)
    for _ in range(r):
        s = np.concatenate([s, e], -1) @ p["adapter"]
        for i in range(config.num_core_layers):
            s = _block(p["core"], i, s, config)
    x = _rms(s, p["final_norm"])
    for i in range(config.num_coda_layers):
        x = _block(p["coda"], i, x, config)
    return _rms(x, p["final_norm"]) @ p["embed"].T


def reference_greedy(params, config, prompt, r, new):
    tokens = list(prompt)
    for _ in range(new):
        tokens.append(int(np.argmax(reference_logits(params, config, tokens, r)[-1])))
    return tokens[len(prompt):]


@jax.jit
def _cached_forward(model, tokens, positions, cache, r):
    return model.forward(tokens, positions, cache, num_recurrences=r)


def cached_logits(model, tokens, r, cache_kind, prefill=4):
    """Logits of `tokens` [T] through the cache: a prefill of `prefill` tokens, then one token at a time."""
    tokens = jnp.asarray(tokens)[None]
    cache = model.new_cache(1, 32, cache=cache_kind, recurrences=8)
    positions = jnp.arange(tokens.shape[1])[None]
    logits, cache = _cached_forward(model, tokens[:, :prefill], positions[:, :prefill], cache, r)
    cache = cache.with_lengths(cache.lengths + prefill)
    out = [logits]
    for t in range(prefill, tokens.shape[1]):
        logits, cache = _cached_forward(model, tokens[:, t:t + 1], positions[:, t:t + 1], cache, r)
        cache = cache.with_lengths(cache.lengths + 1)
        out.append(logits)
    return np.asarray(jnp.concatenate(out, axis=1)[0])


SEQUENCE = [3, 17, 5, 9, 44, 2, 31, 8, 60, 12]


@pytest.mark.parametrize("r", [1, 3])
def test_exact_cache_logits_equal_full_recomputation(model, r):
    reference = reference_logits(model.params, CONFIG, SEQUENCE, r)
    assert np.max(np.abs(cached_logits(model, SEQUENCE, r, "exact") - reference)) < 1e-4


def test_shared_cache_exact_at_one_recurrence_and_for_the_prefill_measured_otherwise(model):
    reference_1 = reference_logits(model.params, CONFIG, SEQUENCE, 1)
    assert np.max(np.abs(cached_logits(model, SEQUENCE, 1, "shared") - reference_1)) < 1e-4
    reference_3 = reference_logits(model.params, CONFIG, SEQUENCE, 3)
    shared_3 = cached_logits(model, SEQUENCE, 3, "shared")
    assert np.max(np.abs(shared_3[:4] - reference_3[:4])) < 1e-4  # the prefill: every position written by the same call
    error = float(np.max(np.abs(shared_3[4:] - reference_3[4:])))
    agreement = float(np.mean(np.argmax(shared_3[4:], -1) == np.argmax(reference_3[4:], -1)))
    print(f"shared cache, r=3, tokens after the prefill: max |logit error| {error:.3g}, argmax agreement {agreement:.2f}")
    assert 1e-4 < error < 10  # an approximation (latest recurrence's K/V), not noise


def test_recurrent_greedy_equals_reference_loop_on_a_ragged_batch(model):
    out = jspec.decode(model, PROMPTS, "recurrent", num_recurrences=3, max_new_tokens=NEW, stop_tokens=[])
    for prompt, tokens in zip(PROMPTS, out.sequences()):
        assert tokens == reference_greedy(model.params, CONFIG, prompt, 3, NEW)
    assert out.stats["recurrences_per_token"] == [3.0] * len(PROMPTS)


def test_changing_r_does_not_recompile(model):
    from importlib import import_module

    decode_module = import_module("jspec.decode")
    jspec.decode(model, PROMPTS, "recurrent", num_recurrences=3, max_new_tokens=NEW, stop_tokens=[])
    before = decode_module.trace_count()
    jspec.decode(model, PROMPTS, "recurrent", num_recurrences=4, max_new_tokens=NEW, stop_tokens=[])  # same bucket
    jspec.decode(model, PROMPTS, "recurrent", num_recurrences=2, cache="shared", max_new_tokens=NEW, stop_tokens=[])
    jspec.decode(model, PROMPTS, "recurrent", num_recurrences=7, cache="shared", max_new_tokens=NEW, stop_tokens=[])
    assert decode_module.trace_count() == before + 1  # the shared cache's program, traced once for r = 2 and 7


def test_adaptive_with_threshold_zero_equals_recurrent_at_max_r(model):
    fixed = jspec.decode(model, PROMPTS, "recurrent", num_recurrences=8, max_new_tokens=NEW, stop_tokens=[])
    for criterion in ("latent", "kl"):
        adaptive = jspec.decode(model, PROMPTS, "recurrent_adaptive", num_recurrences=8, threshold=0.0,
                                criterion=criterion, max_new_tokens=NEW, stop_tokens=[])
        assert adaptive.sequences() == fixed.sequences()
        assert adaptive.stats["recurrences_per_token"] == [8.0] * len(PROMPTS)


def test_adaptive_exits_early_and_rows_do_not_depend_on_the_batch(model):
    batch = jspec.decode(model, PROMPTS, "recurrent_adaptive", num_recurrences=8, threshold=0.05, max_new_tokens=NEW,
                         stop_tokens=[])
    assert min(batch.stats["recurrences_per_token"]) < 8
    for row, prompt in enumerate(PROMPTS):
        alone = jspec.decode(model, [prompt], "recurrent_adaptive", num_recurrences=8, threshold=0.05,
                             max_new_tokens=NEW, stop_tokens=[])
        assert alone.sequences()[0] == batch.sequences()[row]
        assert alone.stats["recurrences_per_token"][0] == pytest.approx(batch.stats["recurrences_per_token"][row])


ONE_PER_STEP = dict(freeze="prediction", max_wavefront=1, exit_threshold=2.0, ema_embeds=0.0)


@pytest.mark.parametrize("r", [1, 3])
def test_diffusion_forcing_one_position_per_step_equals_recurrent(model, r):
    """One new position per step, R inner recurrences, then frozen: recurrent at R with the shared cache (the
    sampler's cache), token for token; at R = 1 the shared cache is exact, so it also equals the exact cache."""
    sampler = jspec.decode(model, PROMPTS, "diffusion_forcing", inner_recurrence=r, prefill_recurrences=r,
                           max_new_tokens=NEW, stop_tokens=[], **ONE_PER_STEP)
    shared = jspec.decode(model, PROMPTS, "recurrent", num_recurrences=r, cache="shared", max_new_tokens=NEW,
                          stop_tokens=[])
    assert sampler.sequences() == shared.sequences()
    assert sampler.stats["recurrences_per_frozen_position"] == [float(r)] * len(PROMPTS)
    if r == 1:
        exact = jspec.decode(model, PROMPTS, "recurrent", num_recurrences=1, max_new_tokens=NEW, stop_tokens=[])
        assert sampler.sequences() == exact.sequences()


SAMPLER = dict(max_wavefront=4, prefill_recurrences=4, max_steps=200)


def test_diffusion_forcing_batch_equals_rows_alone(model):
    batch = jspec.decode(model, PROMPTS, "diffusion_forcing", max_new_tokens=NEW, stop_tokens=[], **SAMPLER)
    assert batch.finish_reasons() == ["length"] * len(PROMPTS)  # positions froze: every row reached its limit
    for row, prompt in enumerate(PROMPTS):
        alone = jspec.decode(model, [prompt], "diffusion_forcing", max_new_tokens=NEW, stop_tokens=[], **SAMPLER)
        assert alone.sequences()[0] == batch.sequences()[row]
        assert alone.stats["active_steps"][0] == batch.stats["active_steps"][row]


def test_diffusion_forcing_stop_token_ends_its_row(model):
    free = jspec.decode(model, PROMPTS, "diffusion_forcing", max_new_tokens=NEW, stop_tokens=[], **SAMPLER).sequences()
    stop = free[0][2]  # a token row 0 emits third
    out = jspec.decode(model, PROMPTS, "diffusion_forcing", max_new_tokens=NEW, stop_tokens=[stop], **SAMPLER)
    for row, tokens in enumerate(free):
        if stop in tokens:
            end = tokens.index(stop) + 1
            assert out.sequences()[row] == tokens[:end]
            assert out.finish_reasons()[row] == "eos"
        else:
            assert out.sequences()[row] == tokens
    assert out.finish_reasons()[0] == "eos" and out.lengths[0] <= 3


def test_diffusion_forcing_without_convergence_stops_at_max_steps(model):
    out = jspec.decode(model, PROMPTS[:1], "diffusion_forcing", max_new_tokens=NEW, stop_tokens=[], exit_threshold=0.0,
                       max_wavefront=4, prefill_recurrences=4, max_steps=12)
    assert out.stats["active_steps"] == [12] and out.lengths[0] == 1 and out.finish_reasons() == ["length"]


@pytest.mark.parametrize("strategy, options, argument", [
    ("recurrent", {"num_recurrences": 0}, "num_recurrences"),
    ("recurrent_adaptive", {"num_recurrences": 0}, "num_recurrences"),
    ("recurrent", {"num_recurrences": 9, "cache_recurrences": 8}, "num_recurrences"),
    ("recurrent_adaptive", {"threshold": -0.1}, "threshold"),
    ("recurrent", {"init_scale": -1.0}, "init_scale"),
    ("recurrent", {"cache": "compressed"}, "cache"),
    ("diffusion_forcing", {"max_wavefront": 0}, "max_wavefront"),
    ("diffusion_forcing", {"max_wavefront": 1}, "max_wavefront"),  # freeze="input" needs room for one more
    ("diffusion_forcing", {"exit_threshold": -0.5}, "exit_threshold"),
    ("diffusion_forcing", {"inner_recurrence": 0}, "inner_recurrence"),
])
def test_bad_options_raise_naming_the_argument(model, strategy, options, argument):
    with pytest.raises(ValueError, match=argument):
        jspec.decode(model, PROMPTS, strategy, max_new_tokens=4, **options)


@pytest.mark.parametrize("strategy", ["recurrent", "recurrent_adaptive", "diffusion_forcing"])
def test_a_non_recurrent_model_is_refused(strategy):
    with pytest.raises(ValueError, match="model: strategy .* needs a recurrent-depth model"):
        jspec.decode(tiny_model(), [[1, 2, 3]], strategy, max_new_tokens=4)


def test_generic_strategies_run_a_recurrent_model_at_its_mean_recurrence(model):
    greedy = jspec.decode(model, PROMPTS, "greedy", max_new_tokens=NEW, stop_tokens=[])
    recurrent = jspec.decode(model, PROMPTS, "recurrent", max_new_tokens=NEW, stop_tokens=[])
    assert greedy.sequences() == recurrent.sequences()


# --- the Huginn-0125 checkpoint format -------------------------------------------------------------------------


def test_huginn_directory_round_trips(model, tmp_path):
    trained = model.replace(params=jax.tree.map(  # nonzero q/k biases, so their permutation is exercised
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), model.params))
    path = jspec.save(trained, tmp_path / "huginn")
    hf_config = json.loads((path / "config.json").read_text())
    assert hf_config["model_type"] == "huginn_raven" and hf_config["architectures"] == ["RavenForCausalLM"]
    assert (hf_config["n_embd"], hf_config["n_heads"], hf_config["n_layers_in_recurrent_block"]) == (32, 4, 2)
    from jspec.checkpoint import safetensors

    names = set(safetensors.load_checkpoint(path))
    assert {"transformer.wte.weight", "transformer.prelude.0.attn.Wqkv.weight", "transformer.prelude.0.attn.qk_bias",
            "transformer.adapter.weight", "transformer.core_block.1.mlp.fc.weight", "transformer.core_block.1.norm_4.weight",
            "transformer.coda.0.attn.proj.weight", "transformer.ln_f.weight", "freqs_cis"} <= names
    assert "lm_head.weight" not in names  # tied, as transformers' save_pretrained leaves it out
    loaded = jspec.load(path)
    assert isinstance(loaded, rc.RecurrentModel) and loaded.config == trained.config.replace(name="huginn")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), trained.params, loaded.params))


def test_huginn_weights_use_interleaved_rope(model, tmp_path):
    """Huginn's Wqkv rows are in the interleaved-pair RoPE order: the reference's complex rotation on the saved
    weights gives the same attention scores as jspec's rotate-half on its own."""
    path = jspec.save(model.replace(params=jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), model.params)), tmp_path / "h")
    tensors = huginn.params_to_huginn(jspec.load(path).params, CONFIG)
    from jspec.checkpoint import safetensors

    saved = safetensors.load_checkpoint(path)
    x = np.random.default_rng(0).normal(size=(6, 32))
    d, h, dh = 32, 4, 8
    wqkv, bias = saved["transformer.prelude.0.attn.Wqkv.weight"], saved["transformer.prelude.0.attn.qk_bias"]
    q = (x @ wqkv[:d].T).reshape(6, h, dh) + bias[0, 0]
    k = (x @ wqkv[d:2 * d].T).reshape(6, h, dh) + bias[1, 0]
    angles = np.arange(6)[:, None] * (1.0 / CONFIG.rope_theta ** (np.arange(0, dh, 2) / dh))[None]

    def complex_rope(v):  # the reference's apply_rotary_emb_complex_like
        pairs = v.reshape(6, h, dh // 2, 2)
        c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
        return np.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 1] * c + pairs[..., 0] * s], -1).reshape(6, h, dh)

    reference_scores = np.einsum("thd,shd->hts", complex_rope(q), complex_rope(k))
    layer = jax.tree.map(lambda a: np.asarray(a)[0], jspec.load(path).params["prelude"])
    qj = (x @ layer["q"] + layer["q_bias"]).reshape(6, h, dh)
    kj = (x @ layer["k"] + layer["k_bias"]).reshape(6, h, dh)
    ours = np.einsum("thd,shd->hts", _rope(qj, CONFIG.rope_theta), _rope(kj, CONFIG.rope_theta))
    assert np.max(np.abs(ours - reference_scores)) < 1e-4
    assert set(tensors) == set(saved)


REFERENCE_DIR = os.environ.get("JSPEC_HUGINN_REFERENCE")  # a directory holding recpre/raven_{modeling,config}_minimal.py


@pytest.mark.skipif(not REFERENCE_DIR, reason="set JSPEC_HUGINN_REFERENCE to a checkout of seal-rg/recurrent-pretraining")
def test_reference_modeling_file_gives_the_same_logits(tmp_path):
    """The reference RavenForCausalLM (seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py, written for
    transformers 4.47: two shims for transformers 5) on a tiny random config, its state dict and config written as
    a Huginn directory, against jspec's forward of that directory (s_0 = 0, r = 1 and 3)."""
    import sys
    import types

    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    sys.path.insert(0, REFERENCE_DIR)
    from recpre import raven_modeling_minimal as reference
    from recpre.raven_config_minimal import RavenConfig

    reference.RavenForCausalLM._tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    reference.CausalLMOutputRecurrentLatents = lambda **fields: types.SimpleNamespace(**fields)
    config = RavenConfig(n_embd=32, n_heads=4, n_layers=4, block_size=64, vocab_size=61, intermediate_size=48,
                         n_layers_in_prelude=1, n_layers_in_recurrent_block=2, n_layers_in_coda=1, mean_recurrence=4,
                         mean_backprop_depth=2, torch_dtype="float32")
    torch.manual_seed(0)
    model = reference.RavenForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "qk_bias" in name:
                parameter.normal_(0, 0.1)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = jspec.load(tmp_path)
    ids = torch.tensor([SEQUENCE])
    for r in (1, 3):
        with torch.no_grad():
            expected = model(ids, num_steps=torch.tensor([r]), init_scale=0.0).logits.numpy()
        ours, _ = loaded.forward(jnp.asarray(ids.numpy()), jnp.arange(len(SEQUENCE))[None], num_recurrences=r)
        assert np.max(np.abs(np.asarray(ours) - expected)) < 1e-4


def test_huginn_config_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="injection_type"):
        huginn.config_from_huginn({"injection_type": "add", "n_embd": 32, "n_heads": 4})
    with pytest.raises(ValueError, match="missing tensors"):
        huginn.params_from_huginn({}, CONFIG)


# --- the shipped demo --------------------------------------------------------------------------------------------


def test_shipped_demo_loss_falls_with_recurrences():
    """demo-code-recurrent (a Huginn directory in jspec/assets) loads as a recurrent-depth model, and more
    recurrences than one lower its held-out loss (the r=1 model is the shallowest network it can be)."""
    from jspec.train import recurrence_eval

    shipped = jspec.load("demo-code-recurrent")
    assert isinstance(shipped, rc.RecurrentModel) and shipped.config.mean_recurrence == 4
    windows = recurrence_eval.heldout_windows(shipped.tokenizer, 256, 4)
    losses = {r: recurrence_eval.heldout_loss(shipped, windows, r) for r in (1, 2, 4)}
    print("held-out loss by r:", losses)
    assert losses[2] < losses[1] and losses[4] < losses[1]
