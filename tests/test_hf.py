"""Hugging Face checkpoints in and out: tiny random transformers models, built here, read by `load_hf`, give
the same logits and the same greedy tokens in jspec; `save_hf` writes what transformers reads back; our
safetensors reader/writer agrees with the `safetensors` package and rejects damaged files clearly."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jspec  # noqa: E402
from jspec.checkpoint import safetensors as st  # noqa: E402
from jspec.checkpoint.hf import config_from_hf, load_hf, save_hf  # noqa: E402
from jspec.models.config import RopeScaling, TransformerConfig  # noqa: E402
from jspec.tokenizer import HFTokenizer  # noqa: E402

torch.set_num_threads(1)

# Max abs fp32 logit difference allowed between jspec and transformers (logits here are of magnitude ~10;
# the differences seen are ~1e-6, float32 rounding of differently ordered sums).
FP32_TOLERANCE = 1e-4
VOCAB = 128
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name: (config class, model class, config overrides, {TransformerConfig field: value} the load must give)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2), dict(num_kv_heads=2)),
    "llama3_scaled_tied_mha": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=dict(LLAMA3)),
        dict(num_kv_heads=4, tie_embeddings=True, rope_theta=500000.0,
             rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
    ),
    "mistral_window4": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=4), dict(sliding_window=4)),
    "qwen2_window_layers": (  # layer 0 full attention, layers 1-2 a 4-token window (max_window_layers=1)
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(num_hidden_layers=3, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        dict(qkv_bias=True, sliding_window=4, layer_types=("full_attention", "sliding_attention", "sliding_attention")),
    ),
    "qwen3_alternating_window": (  # local / global layers alternating, as Gemma 2/3 and gpt-oss do
        "Qwen3Config", "Qwen3ForCausalLM",
        dict(num_hidden_layers=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
             layer_types=["sliding_attention", "full_attention"] * 2),
        dict(qk_norm=True, sliding_window=3, layer_types=("sliding_attention", "full_attention") * 2),
    ),
    "qwen2_bias_tied": (
        "Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=[2, 3]),
        dict(qkv_bias=True, tie_embeddings=True, eos_token_ids=(2, 3)),
    ),
    "qwen3_norm_bias_head32": (  # q/k norm; head_dim 32 != hidden/heads; attention_bias: q/k/v/o biases, o's
        # zeroed (jspec has no o bias, and loads attention_bias as qkv_bias when o's bias is zero)
        "Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=1, head_dim=32, attention_bias=True),
        dict(qk_norm=True, qkv_bias=True, num_kv_heads=1, head_dim=32),
    ),
}
MAX_DIFFS: dict[str, float] = {}


def build_hf(family: str, seed: int = 0):
    """A random transformers model whose logits are far from uniform (weights ~ N(0, 0.3^2)), so greedy argmax
    is not decided by rounding."""
    config_class, model_class, overrides, _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**BASE, **overrides})
    torch.manual_seed(seed)
    return randomize_weights(getattr(transformers, model_class)(config).eval())


def randomize_weights(model):
    """Norm weights ~ 1 + N(0, 0.2^2), every other weight ~ N(0, 0.3^2), o_proj biases zero (in place)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.3)
            if name.endswith("o_proj.bias"):
                parameter.zero_()
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@jax.jit
def _forward(model, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.forward(tokens, positions)[0]


def jspec_logits(model: jspec.Model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model.without_tokenizer(), jnp.asarray(tokens, jnp.int32)))


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None  # never stop early: compare all new_tokens tokens
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def numpy_random_model(config: TransformerConfig, seed: int = 1) -> jspec.Model:
    """Like `Model.random(config, init_scale=0.3)` (norms near 1), drawn with numpy: no per-shape compiles."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: jspec.models.init_params(config, jax.random.key(0)))
    params = jax.tree.map_with_path(
        lambda path, leaf: jnp.asarray(
            (1.0 + 0.2 * rng.standard_normal(leaf.shape)) if "norm" in jax.tree_util.keystr(path) else 0.3 * rng.standard_normal(leaf.shape),
            leaf.dtype,
        ),
        shapes,
    )
    return jspec.Model(params=params, config=config)


def params_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))  # 12 > the Mistral window of 4
PROMPTS = [[5, 17, 3, 99, 42, 7], [9, 2, 44]]
NEW_TOKENS = 16


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_hf_matches_transformers_and_save_hf_round_trips(family, tmp_path):
    hf_model = build_hf(family)
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    for field, value in FAMILIES[family][3].items():
        assert getattr(model.config, field) == value, field
    assert model.config.dtype == "float32" and model.config.bos_token_id == 1

    want = hf_logits(hf_model, TOKENS)
    got = jspec_logits(model, TOKENS)
    MAX_DIFFS[family] = float(np.abs(got - want).max())
    print(f"{family}: max abs logit difference {MAX_DIFFS[family]:.2e} (logits up to {np.abs(want).max():.1f})")
    assert MAX_DIFFS[family] < FP32_TOLERANCE

    # greedy: jspec's compiled loop over a ragged batch equals transformers' generate, token for token
    out = jspec.decode(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    for prompt, row in zip(PROMPTS, out.sequences()):
        assert row == hf_greedy(hf_model, prompt, NEW_TOKENS)

    # save_hf: transformers reads it as the same architecture with the same logits; load_hf reads it back equal
    save_hf(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"] == [FAMILIES[family][1]]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(reloaded).__name__ == FAMILIES[family][1]
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), want, atol=1e-5, rtol=0)
    again = load_hf(tmp_path / "saved")
    assert again.config == model.config.replace(name="saved") and params_equal(again.params, model.params)


@pytest.mark.parametrize(
    "options, architecture",
    [
        # every option at once: qk_norm and qkv_bias (Qwen3 with a zero o_proj bias), a window, llama3 RoPE, tied
        (dict(qk_norm=True, qkv_bias=True, sliding_window=3, tie_embeddings=True, rope_theta=500000.0,
              rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)), "Qwen3ForCausalLM"),
        (dict(qkv_bias=True, sliding_window=5, head_dim=32), "Qwen2ForCausalLM"),  # Qwen2 with a window on every layer
        (dict(hidden_size=60, num_heads=8, head_dim=8), "MistralForCausalLM"),  # hidden % heads != 0: LlamaConfig would refuse
    ],
)
def test_save_hf_expresses_every_option(options, architecture, tmp_path):
    config = TransformerConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                         intermediate_size=96, eos_token_ids=(2,), bos_token_id=1), **options})
    model = numpy_random_model(config)
    save_hf(model, tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf_model).__name__ == architecture
    assert np.abs(hf_logits(hf_model, TOKENS) - jspec_logits(model, TOKENS)).max() < FP32_TOLERANCE
    again = load_hf(tmp_path)
    assert again.config == config.replace(name=tmp_path.name) and params_equal(again.params, model.params)


def test_sharded_bf16_save_and_load(tmp_path):
    hf_model = build_hf("qwen2_bias_tied")
    hf_model.save_pretrained(tmp_path / "hf")
    model = load_hf(tmp_path / "hf", dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    save_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / st.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "sharded" / st.SINGLE_FILE).exists()
    for shard in shards:
        assert all(v["dtype"] == "BF16" for v in st.read_header(tmp_path / "sharded" / shard)[0].values())
    again = load_hf(tmp_path / "sharded")
    assert params_equal(again.params, model.params)
    # transformers reads the bf16 shards as the same weights: computed in float32 on both sides, the logits agree
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32)
    as_fp32 = load_hf(tmp_path / "sharded", dtype="float32")
    assert np.abs(hf_logits(reloaded, TOKENS) - jspec_logits(as_fp32, TOKENS)).max() < FP32_TOLERANCE
    # a re-save needs overwrite (the directory is not empty); it replaces the whole directory, old shards included
    with pytest.raises(ValueError, match="^path: .*sharded' already exists and is not empty"):
        save_hf(model, tmp_path / "sharded")
    save_hf(model, tmp_path / "sharded", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "sharded").glob("model*")) == [st.SINGLE_FILE]


def test_old_config_layout_and_generation_config_eos(tmp_path):
    """transformers 4's layout (top-level rope_theta, rope_scaling with "type") reads like the new one, and
    generation_config.json's eos ids join the config's."""
    build_hf("llama3_scaled_tied_mha").save_pretrained(tmp_path)
    new = load_hf(tmp_path).config
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    old = load_hf(tmp_path).config
    assert old == new.replace(eos_token_ids=(2, 7)) and old.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)


def test_tokenizer_json_is_loaded_and_saved(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    build_hf("llama_gqa").save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    model = load_hf(tmp_path / "hf")
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.eos_token_ids == (2,)
    assert model.tokenizer.encode("w5 w7") == [8, 10]
    out = jspec.decode(model, ["w5 w7 w9", "w1"], max_new_tokens=NEW_TOKENS, stop_tokens=[])  # shapes as above: no compile
    assert out.sequences() == jspec.decode(model, [[8, 10, 12], [4]], max_new_tokens=NEW_TOKENS, stop_tokens=[]).sequences()
    assert out.text[0] == model.tokenizer.decode(out.sequences()[0])
    save_hf(model, tmp_path / "saved")
    assert load_hf(tmp_path / "saved").tokenizer == model.tokenizer
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert auto("w5 w7", add_special_tokens=False)["input_ids"] == [8, 10] and auto.eos_token == "</s>"
    # a config without EOS ids whose tokenizer has some: they are written to config.json (jspec.decode stops there)
    no_eos = model.replace(config=model.config.replace(eos_token_ids=()))
    save_hf(no_eos, tmp_path / "no_eos")
    assert json.loads((tmp_path / "no_eos" / "config.json").read_text())["eos_token_id"] == 2


# --- safetensors ----------------------------------------------------------------------------------------

import ml_dtypes  # noqa: E402

SAMPLE = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
    "f16": np.linspace(-1, 1, 6, dtype=np.float16).reshape(2, 3),
    "bf16": np.linspace(-2, 2, 5).astype(ml_dtypes.bfloat16),
    "i32": np.array([[1, -2], [3, 4]], np.int32),
    "i64": np.array(2**40, np.int64),  # a scalar
    "empty": np.zeros((0, 3), np.float32),
    "flags": np.array([True, False, True]),
    "transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not C-contiguous
}


def test_safetensors_agrees_with_the_reference_package(tmp_path):
    st.save_file(SAMPLE, tmp_path / "ours.safetensors", {"format": "pt"})
    theirs = safetensors_numpy.load_file(tmp_path / "ours.safetensors")
    assert sorted(theirs) == sorted(SAMPLE)
    for name, array in SAMPLE.items():
        assert theirs[name].dtype == array.dtype and theirs[name].shape == array.shape
        np.testing.assert_array_equal(theirs[name], array)
    # (the package writes a non-C-contiguous array's memory as is, so it gets contiguous arrays only)
    contiguous = {name: np.ascontiguousarray(array) if array.ndim else array for name, array in SAMPLE.items()}
    safetensors_numpy.save_file(contiguous, tmp_path / "theirs.safetensors", {"format": "pt"})
    ours = st.load_file(tmp_path / "theirs.safetensors")
    assert st.load_metadata(tmp_path / "theirs.safetensors") == {"format": "pt"}
    for name, array in SAMPLE.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
        np.testing.assert_array_equal(ours[name], array)
    # deterministic: the same tensors give the same bytes
    st.save_file(dict(reversed(SAMPLE.items())), tmp_path / "again.safetensors", {"format": "pt"})
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()


def test_reader_agrees_with_the_package_on_a_transformers_checkpoint(tmp_path):
    build_hf("qwen3_norm_bias_head32").save_pretrained(tmp_path)
    ours = st.load_checkpoint(tmp_path)
    theirs = safetensors_numpy.load_file(tmp_path / st.SINGLE_FILE)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


def _write_raw(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_damaged_safetensors_files_raise_clear_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    st.save_file({"a": np.ones((4, 4), np.float32), "b": np.ones(8, np.float32)}, good)  # b is last in the buffer
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"truncated\.safetensors, tensor 'b'.*truncated"):
        st.load_file(truncated)
    (tmp_path / "stub.safetensors").write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"stub\.safetensors.*too short"):
        st.load_file(tmp_path / "stub.safetensors")
    (tmp_path / "header.safetensors").write_bytes(data[:40])
    with pytest.raises(ValueError, match=r"header\.safetensors: header length \d+ runs past the end"):
        st.load_file(tmp_path / "header.safetensors")
    (tmp_path / "trailing.safetensors").write_bytes(data + b"\0" * 4)
    with pytest.raises(ValueError, match="trailing"):
        st.load_file(tmp_path / "trailing.safetensors")

    f32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}  # noqa: E731
    cases = {
        "overlap": ({"x": f32([2], 0, 8), "y": f32([2], 4, 12)}, 12, r"tensor 'y'.*overlaps"),
        "gap": ({"x": f32([2], 0, 8), "y": f32([2], 12, 20)}, 20, r"tensor 'y'.*gap"),
        "count": ({"x": f32([3], 0, 8)}, 8, r"tensor 'x'.*needs 12"),
        "dtype": ({"x": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}, 4, r"tensor 'x'.*unknown dtype 'F31'"),
        "shape": ({"x": f32([-1], 0, 4)}, 4, r"tensor 'x'.*shape"),
    }
    for name, (header, size, message) in cases.items():
        _write_raw(tmp_path / f"{name}.safetensors", header, b"\0" * size)
        with pytest.raises(ValueError, match=message):
            st.load_file(tmp_path / f"{name}.safetensors")
    twice = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    (tmp_path / "twice.safetensors").write_bytes(len(twice).to_bytes(8, "little") + twice + b"\0" * 4)
    with pytest.raises(ValueError, match="names 'x' twice"):
        st.load_file(tmp_path / "twice.safetensors")
    (tmp_path / "json.safetensors").write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON"):
        st.load_file(tmp_path / "json.safetensors")


def test_sharded_index_problems_raise(tmp_path):
    tensors = {f"t{i}": np.full((10,), i, np.float32) for i in range(5)}
    st.save_checkpoint(tensors, tmp_path, max_shard_bytes=80)
    loaded = st.load_checkpoint(tmp_path)
    assert all(np.array_equal(loaded[k], v) for k, v in tensors.items())
    index = json.loads((tmp_path / st.INDEX_FILE).read_text())
    first = index["weight_map"]["t0"]
    index["weight_map"]["t0"] = index["weight_map"]["t4"]
    (tmp_path / st.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor 't0' is in shard"):
        st.load_checkpoint(tmp_path)
    index["weight_map"]["t0"] = first
    (tmp_path / st.INDEX_FILE).write_text(json.dumps(index))
    (tmp_path / index["weight_map"]["t4"]).unlink()
    with pytest.raises(ValueError, match=r"shard model-0000\d-of-0000\d\.safetensors .* is missing"):
        st.load_checkpoint(tmp_path)


# --- load_hf errors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf("llama_gqa").save_pretrained(path)
    return path


def _edited_copy(source, target, config_edit=None, tensor_edit=None):
    shutil.copytree(source, target)
    if config_edit:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    if tensor_edit:
        tensors = st.load_file(target / st.SINGLE_FILE, copy=True)
        tensor_edit(tensors)
        st.save_file(tensors, target / st.SINGLE_FILE, {"format": "pt"})
    return target


def _set(key, value):
    return lambda config: config.__setitem__(key, value)


@pytest.mark.parametrize(
    "config_edit, tensor_edit, message",
    [
        (_set("architectures", ["GPT2LMHeadModel"]), None, "unsupported architecture 'GPT2LMHeadModel'"),
        (_set("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), None, "rope type 'yarn'"),
        (_set("mlp_bias", True), None, "mlp_bias"),
        (_set("hidden_act", "gelu"), None, "hidden_act 'gelu'"),
        (_set("dtype", "float64"), None, "dtype 'float64'"),
        (None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"),
        (None, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
         r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.q_proj\.bias"),
        (None, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 32), np.float32)}),
         r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(64, 32\), expected \(32, 64\)"),
        (None, lambda t: t.update({"lm_head.weight": np.zeros((VOCAB, 32), np.float32)}),
         r"lm_head\.weight has shape \(128, 32\), expected \(128, 64\)"),
        (_set("attention_bias", True), lambda t: t.update(
            {f"model.layers.{i}.self_attn.{p}_proj.bias": np.ones(n, np.float32) for i in range(2) for p, n in
             (("q", 64), ("k", 32), ("v", 32), ("o", 64))}), r"o_proj\.bias is a nonzero output-projection bias"),
    ],
)
def test_load_hf_errors_name_the_problem(llama_dir, tmp_path, config_edit, tensor_edit, message):
    path = _edited_copy(llama_dir, tmp_path / "edited", config_edit, tensor_edit)
    with pytest.raises(ValueError, match=message):
        load_hf(path)


def test_per_layer_sliding_windows_load_and_bad_layer_types_raise():
    config = {**BASE, "architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 2, "use_sliding_window": True,
              "sliding_window": 4, "max_window_layers": 1}
    assert config_from_hf(config).layer_types == ("full_attention", "sliding_attention")
    with pytest.raises(ValueError, match=r"layer_types \['chunked_attention'\] are not supported"):
        config_from_hf({**config, "layer_types": ["chunked_attention", "full_attention"]})
    with pytest.raises(ValueError, match="layer_types has 3 entries for 2 layers"):
        config_from_hf({**config, "layer_types": ["full_attention"] * 3})
    assert config_from_hf({**config, "max_window_layers": 0}).sliding_window == 4
    assert config_from_hf({**config, "max_window_layers": 0}).layer_types is None
    assert config_from_hf({**config, "use_sliding_window": False}).sliding_window is None
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive int"):
        config_from_hf({**config, "num_hidden_layers": None})
