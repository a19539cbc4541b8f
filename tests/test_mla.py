"""DeepSeek-style models: multi-head latent attention with a latent-only cache, MoE MLPs, Hugging Face DeepseekV2/V3
checkpoints in and out, and every decoding strategy that applies on an MLA model.

- The absorbed decode form equals the expanded form (< 1e-5 fp32); the cache holds exactly kv_lora_rank +
  qk_rope_head_dim values per token and layer.
- Tiny random DeepseekV3 (dense-only; one dense + one MoE layer; no q_lora with YaRN) and DeepseekV2 (MoE, group
  limited) models built by transformers here: logits equal (< 1e-4 fp32), greedy tokens on a ragged batch equal
  transformers' generate, save_hf round trips through transformers with equal logits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jspec
from jspec.checkpoint.hf import config_from_hf, load_hf, save_hf
from jspec.models.attention.mla import absorbed_attention, expanded_attention, softmax_scale, split_kv_b
from jspec.models.config import MLAConfig, MoEConfig, TransformerConfig, YarnScaling

FP32_TOLERANCE = 1e-4
VOCAB = 128
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def tiny_config(**overrides) -> TransformerConfig:
    values = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128,
                  max_position_embeddings=128, mla=MLAConfig(q_lora_rank=32, **MLA), eos_token_ids=())
    values.update(overrides)
    return TransformerConfig(**values)


def random_model(seed: int = 0, **overrides) -> jspec.Model:
    return jspec.Model.random(tiny_config(**overrides), seed, init_scale=0.3)


def test_absorbed_equals_expanded():
    config = tiny_config()
    mla = config.mla
    keys = jax.random.split(jax.random.key(0), 5)
    batch, length, slots, heads = 2, 3, 11, config.num_heads
    q_nope = jax.random.normal(keys[0], (batch, length, heads, mla.qk_nope_head_dim))
    q_rope = jax.random.normal(keys[1], (batch, length, heads, mla.qk_rope_head_dim))
    latent = jax.random.normal(keys[2], (batch, slots, mla.kv_lora_rank))
    rope_key = jax.random.normal(keys[3], (batch, slots, mla.qk_rope_head_dim))
    kv_b = 0.3 * jax.random.normal(keys[4], (mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim)))
    mask = jnp.arange(slots)[None, None, :] <= jnp.array([[5, 6, 7], [8, 9, 10]])[:, :, None]

    @jax.jit
    def both(q_nope, q_rope, latent, rope_key, kv_b, mask):
        expanded = expanded_attention(q_nope, q_rope, latent, rope_key, kv_b, mask, config)
        w_uk, w_uv = split_kv_b(kv_b, config)
        return expanded, absorbed_attention(q_nope, q_rope, latent, rope_key, w_uk, w_uv, mask, softmax_scale(config))

    expanded, absorbed = both(q_nope, q_rope, latent, rope_key, kv_b, mask)
    assert expanded.shape == absorbed.shape == (batch, length, heads, mla.v_head_dim)
    assert float(jnp.abs(expanded - absorbed).max()) < 1e-5


def test_cache_holds_only_latents_and_decode_equals_full_forward():
    model = random_model(moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       first_k_dense_replace=1, n_shared_experts=1))
    mla = model.config.mla
    cache = model.new_cache(2, 16)
    # layer 0 (dense) and layer 1 (MoE) are separate groups, each with its own entry of latents and RoPE keys
    assert model.config.layer_groups == (("mla", 0, 1), ("mla", 1, 2))
    for entry in cache.entries:
        assert type(entry).__name__ == "LatentEntry"
        assert entry.latent.shape == (1, 2, 16, mla.kv_lora_rank) and entry.rope_key.shape == (1, 2, 16, mla.qk_rope_head_dim)
    assert sum(leaf.size for leaf in jax.tree.leaves(cache.entries)) == 2 * 2 * 16 * (mla.kv_lora_rank + mla.qk_rope_head_dim)

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 10)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    forward = jax.jit(lambda model, tokens, positions, cache: model.forward(tokens, positions, cache))
    full, _ = forward(model, tokens, positions, None)  # expanded form over the chunk
    logits, cache = forward(model, tokens[:, :6], positions[:, :6], cache)  # prefill: expanded over the cache
    steps = [logits]
    cache = cache.with_lengths(jnp.full((2,), 6))
    for t in range(6, 10):  # decode: absorbed
        logits, cache = forward(model, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        cache = cache.with_lengths(cache.lengths + 1)
        steps.append(logits)
    assert float(jnp.abs(jnp.concatenate(steps, axis=1) - full).max()) < 1e-4


@pytest.fixture(scope="module")
def greedy_reference():
    target = random_model(0, num_layers=2)
    prompts = [[5, 17, 3, 99, 42, 7, 5, 17], [9, 2, 44], [1, 2, 3, 1, 2]]
    return target, prompts, jspec.decode(target, prompts, "greedy", max_new_tokens=12, stop_tokens=[]).sequences()


@pytest.mark.parametrize("strategy, options", [
    ("sample", dict(temperature=0.0)),
    ("prompt_lookup", dict(num_draft_tokens=3)),
    ("speculative", dict(num_draft_tokens=3)),  # MLA draft of one layer
    ("speculative", dict(tree=(2, 2, 1))),  # tree verification: custom masks
    ("speculative", dict(num_draft_tokens=2, gqa_draft=True)),
    ("self_speculative", dict(skip_layers=(1,), num_draft_tokens=2)),
])
def test_strategies_on_an_mla_target_equal_greedy(strategy, options, greedy_reference):
    target, prompts, greedy = greedy_reference
    options = dict(options)
    if strategy == "speculative":
        if options.pop("gqa_draft", False):
            draft = jspec.Model.random(TransformerConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                                                         num_kv_heads=1, intermediate_size=64, eos_token_ids=()), 1)
        else:
            draft = random_model(1, num_layers=1)
        options["draft"] = draft
    out = jspec.decode(target, prompts, strategy, max_new_tokens=12, stop_tokens=[], key=3, **options)
    assert out.sequences() == greedy


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="mla.qk_rope_head_dim"):
        MLAConfig(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=7, v_head_dim=16)
    with pytest.raises(ValueError, match="moe.n_group"):
        MoEConfig(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=8, n_group=4)
    with pytest.raises(ValueError, match="moe.num_experts_per_tok"):
        MoEConfig(n_routed_experts=8, num_experts_per_tok=5, moe_intermediate_size=8, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="TransformerConfig.mla"):
        tiny_config(mla=None, layer_types=("mla", "mla"))
    with pytest.raises(ValueError, match="attention_impl"):
        random_model().with_kernels(attention_impl="pallas_sparse")
    config = tiny_config(moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=8),
                         rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale_all_dim=1.0))
    assert TransformerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- Hugging Face DeepseekV2 / V3 ------------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_hf import hf_greedy, hf_logits, randomize_weights  # noqa: E402  (tests/ is on the path under pytest)

HF_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, q_lora_rank=32, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, **MLA)
YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
        "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
MOE = dict(first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
# name: (config class, model class, overrides)
FAMILIES = {
    "v3_dense": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(first_k_dense_replace=2)),
    "v3_moe": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(MOE, n_group=2, topk_group=1, n_shared_experts=1)),
    "v3_no_qlora_yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                         dict(first_k_dense_replace=2, q_lora_rank=None, rope_parameters=dict(YARN))),
    "v2_moe_grouped": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                       dict(MOE, topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2,
                            routed_scaling_factor=1.5)),
}
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
PROMPTS = [[5, 17, 3, 99, 42, 7], [9, 2, 44]]
NEW_TOKENS = 12


def build_hf(family: str, seed: int = 0):
    config_class, model_class, overrides = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**HF_BASE, **overrides})
    torch.manual_seed(seed)
    model = randomize_weights(getattr(transformers, model_class)(config).eval())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # exercise the selection-only bias
                buffer.copy_(0.3 * torch.randn_like(buffer))
    return model


def jspec_logits(model: jspec.Model, tokens: np.ndarray) -> np.ndarray:
    tokens = jnp.asarray(tokens, jnp.int32)
    return np.asarray(model.forward(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deepseek_matches_transformers_and_save_hf_round_trips(family, tmp_path):
    hf_model = build_hf(family)
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    assert model.config.mla is not None and (model.config.moe is not None) == ("moe" in family)
    want = hf_logits(hf_model, TOKENS)
    got = jspec_logits(model, TOKENS)
    difference = float(np.abs(got - want).max())
    print(f"{family}: max abs logit difference {difference:.2e} (logits up to {np.abs(want).max():.1f})")
    assert difference < FP32_TOLERANCE

    out = jspec.decode(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    for prompt, row in zip(PROMPTS, out.sequences()):
        assert row == hf_greedy(hf_model, prompt, NEW_TOKENS)

    save_hf(model, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["architectures"] == [FAMILIES[family][1]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(reloaded).__name__ == FAMILIES[family][1]
    assert np.abs(hf_logits(reloaded, TOKENS) - want).max() < 1e-5
    again = load_hf(tmp_path / "saved")
    assert again.config == model.config.replace(name="saved")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(model.params)))


@pytest.mark.parametrize("field, value, message", [
    ("num_key_value_heads", 2, "num_key_value_heads=2 is not supported"),
    ("attention_bias", True, "attention_bias=True is not supported"),
    ("scoring_func", "softmax", "scoring_func='softmax' is not supported"),
    ("moe_layer_freq", 2, "moe_layer_freq=2 is not supported"),
])
def test_unsupported_deepseek_fields_are_named(field, value, message):
    values = {**HF_BASE, **MOE, "architectures": ["DeepseekV3ForCausalLM"], field: value}
    with pytest.raises(ValueError, match=message):
        config_from_hf(values)
