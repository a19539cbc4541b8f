"""Hugging Face checkpoint directories in and out: config.json, safetensors weights, tokenizer.json.

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, and
DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (MLA and MoE layers; their fields and tensors are described in
jspec/checkpoint/hf_deepseek.py). The
config is read the way transformers 5 reads it (its class defaults for missing fields, RoPE settings in the
new `rope_parameters` or the old `rope_theta` + `rope_scaling` layout) and mapped onto `TransformerConfig`.

Guarantees:
- `load_hf` either returns a model whose forward equals the transformers model of the same directory (to
  float tolerance: same weights, same RoPE, same masks, float32 norms and softmax), or raises ValueError
  naming what it cannot represent: the architecture, the config field (a RoPE type other than default or
  llama3, a per-layer sliding-window pattern, an MLP bias, a nonzero output-projection bias, quantization),
  or the tensor (missing, unexpected, wrong shape: expected vs got, in torch's [out, in] layout).
- `save_hf` writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads into a model
  with the same logits, and that `load_hf` reads back into an equal model. It never writes into a non-empty
  directory unless asked (`overwrite=True`, then an atomic replace). The architecture is the simplest
  one that expresses the config: Qwen3ForCausalLM when qk_norm, else Qwen2ForCausalLM when qkv_bias, else
  MistralForCausalLM when sliding_window, else LlamaForCausalLM.

- One mapping serves both ways of reading: `lazy_params_from_hf` validates the tensors and maps them onto the
  parameter pytree as lazy tensors (`jspec.checkpoint.lazy`: transposed, stacked into layer groups and cast
  without reading); `load_hf` reads them whole, or with `mesh=` places each on the mesh reading only the
  addressable devices' slices from the safetensors files. Both give the same values bit for bit.

Weight mapping (torch Linear weights are [out, in]; jspec stores [in, out], so every matrix is transposed):
    model.embed_tokens.weight [V, D]                    embed [V, D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight    layers[i].{q,k,v,o} (transposed)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias        layers[i].{q,k,v}_bias
    model.layers.{i}.self_attn.{q,k}_norm.weight        layers[i].{q,k}_norm
    model.layers.{i}.input_layernorm.weight             layers[i].attn_norm
    model.layers.{i}.post_attention_layernorm.weight    layers[i].mlp_norm
    model.layers.{i}.mlp.{gate,up,down}_proj.weight     layers[i].{gate,up,down} (transposed)
    model.norm.weight                                   final_norm
    lm_head.weight [V, D]                               lm_head [D, V] (absent when embeddings are tied)
Both use the rotate-half RoPE convention, so q and k need no permutation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jspec import sharding
from jspec.checkpoint import hf_deepseek, lazy, safetensors
from jspec.checkpoint.directories import check_destination, write_directory
from jspec.models.config import DTYPES, RopeScaling, TransformerConfig, YarnScaling
from jspec.models import transformer
from jspec.models.model import Model
from jspec.tokenizer import HFTokenizer

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", *hf_deepseek.ARCHITECTURES)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                **hf_deepseek.MODEL_TYPES}
_ARCH_MODEL_TYPES = {arch: model_type for model_type, arch in _MODEL_TYPES.items()}

# transformers 5's class defaults for the fields a hand-written config.json may leave out
_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    "MistralForCausalLM": dict(num_key_value_heads=8, head_dim=None, max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2, sliding_window=4096),
    "Qwen2ForCausalLM": dict(num_key_value_heads=32, head_dim=None, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
    "Qwen3ForCausalLM": dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
    **hf_deepseek.DEFAULTS,
}
_ACTIVATIONS = ("silu", "swish")
DIFFUSION_KEY = "jspec_diffusion"  # config.json entry for jspec's diffusion-LM options (kind, block_size, shifted_logits)
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some older checkpoints carry; recomputed from the config


# --- config -------------------------------------------------------------------------------------------


def architecture_of(hf_config: dict[str, Any]) -> str:
    """The supported architecture a config.json names (`architectures[0]`, else its `model_type`)."""
    architectures = hf_config.get("architectures") or []
    if architectures:
        architecture = architectures[0]
    elif hf_config.get("model_type") in _MODEL_TYPES:
        architecture = _MODEL_TYPES[hf_config["model_type"]]
    else:
        architecture = hf_config.get("model_type")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"config.json: unsupported architecture {architecture!r}; supported: {list(ARCHITECTURES)}")
    return architecture


def config_from_hf(
    hf_config: dict[str, Any],
    *,
    dtype: str | None = None,
    name: str | None = None,
    generation_config: dict[str, Any] | None = None,
) -> TransformerConfig:
    """A `TransformerConfig` from a parsed config.json (and optionally generation_config.json, whose
    eos_token_id joins the config's: it is what `generate` stops on).

    Raises ValueError naming the architecture or the field jspec cannot represent.
    """
    architecture = architecture_of(hf_config)
    defaults = _DEFAULTS[architecture]

    def field(key: str, default: Any = None) -> Any:
        return hf_config[key] if key in hf_config else defaults.get(key, default)

    def required(key: str) -> Any:
        value = hf_config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config.json ({architecture}): {key} must be a positive int, got {value!r}")
        return value

    vocab_size, hidden_size = required("vocab_size"), required("hidden_size")
    num_layers, num_heads = required("num_hidden_layers"), required("num_attention_heads")
    intermediate_size = required("intermediate_size")
    num_kv_heads = field("num_key_value_heads") or num_heads
    head_dim = field("head_dim") or hidden_size // num_heads
    mla = moe = None
    if hf_deepseek.is_deepseek(architecture):
        mla, moe = hf_deepseek.mla_moe_from_hf(architecture, field, num_layers)
        # MLA layers do not use head_dim (transformers sets it to the RoPE dims); kept at its default when that is valid
        head_dim = hidden_size // num_heads if (hidden_size // num_heads) % 2 == 0 else mla.qk_rope_head_dim

    if field("hidden_act", "silu") not in _ACTIVATIONS:
        raise ValueError(f"config.json ({architecture}): hidden_act {field('hidden_act')!r} is not supported; jspec's MLP is SwiGLU (silu)")
    if hf_config.get("quantization_config"):
        raise ValueError(f"config.json ({architecture}): quantization_config is not supported (quantized weights)")
    if architecture == "LlamaForCausalLM" and field("mlp_bias", False):
        raise ValueError(f"config.json ({architecture}): mlp_bias=true is not supported (jspec's MLP has no biases)")

    if architecture == "Qwen2ForCausalLM":
        qkv_bias = True  # Qwen2 always biases q, k, v (never o)
    elif architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        qkv_bias = bool(field("attention_bias", False))  # biases q, k, v and o; o's must be zero (checked on the weights)
    else:
        qkv_bias = False  # Mistral and DeepSeek have no attention biases

    sliding_window, layer_types = _sliding_window(hf_config, architecture, num_layers, field)
    rope_theta, rope_scaling = _rope(hf_config, architecture, field)

    if dtype is None:
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"config.json ({architecture}): dtype {dtype!r} is not supported; pass dtype= one of {DTYPES}")
    elif dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")

    eos = _token_list(field("eos_token_id"))
    if generation_config is not None:
        eos += [t for t in _token_list(generation_config.get("eos_token_id")) if t not in eos]
    dropped = [t for t in eos if not 0 <= t < vocab_size]
    if dropped:
        warnings.warn(f"config.json ({architecture}): eos_token_id(s) {dropped} are outside the vocabulary [0, {vocab_size}); ignored")
    eos = [t for t in eos if 0 <= t < vocab_size]
    bos = field("bos_token_id")
    bos = bos if isinstance(bos, int) and 0 <= bos < vocab_size else None
    pad = field("pad_token_id")
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab_size else 0
    mask = hf_config.get("mask_token_id")
    diffusion = hf_config.get(DIFFUSION_KEY) or {}
    if not isinstance(diffusion, dict):
        raise ValueError(f"config.json: {DIFFUSION_KEY} must be an object with kind, block_size, shifted_logits; got {diffusion!r}")

    return TransformerConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        head_dim=None if head_dim == hidden_size // num_heads and head_dim * num_heads == hidden_size else head_dim,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(field("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=architecture == "Qwen3ForCausalLM",
        sliding_window=sliding_window,
        layer_types=layer_types,
        dtype=dtype,
        max_position_embeddings=int(field("max_position_embeddings", 4096)),
        bos_token_id=bos,
        eos_token_ids=tuple(eos),
        pad_token_id=pad,
        mask_token_id=mask if isinstance(mask, int) else None,
        diffusion=diffusion.get("kind"),
        diffusion_block_size=diffusion.get("block_size"),
        shifted_logits=bool(diffusion.get("shifted_logits", False)),
        name=name or hf_config.get("_name_or_path") or architecture,
        mla=mla,
        moe=moe,
    )


def _token_list(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _sliding_window(hf_config: dict[str, Any], architecture: str, num_layers: int, field) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types): None layer types when every layer is of one kind (the config default)."""
    if architecture == "LlamaForCausalLM" or hf_deepseek.is_deepseek(architecture):
        return None, None
    window = field("sliding_window")
    if architecture == "MistralForCausalLM":
        return _positive_window(window, architecture), None  # every layer
    # Qwen2 / Qwen3: a layer slides when use_sliding_window and its layer type is "sliding_attention"
    if not field("use_sliding_window", False) or window is None:
        return None, None
    layer_types = hf_config.get("layer_types") or [
        "sliding_attention" if i >= field("max_window_layers", 28) else "full_attention" for i in range(num_layers)
    ]
    if len(layer_types) != num_layers:
        raise ValueError(f"config.json ({architecture}): layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"config.json ({architecture}): layer_types {unknown} are not supported; jspec loads "
                         "'full_attention' and 'sliding_attention' layers")
    if set(layer_types) == {"full_attention"}:
        return None, None
    window = _positive_window(window, architecture)
    return window, (None if set(layer_types) == {"sliding_attention"} else tuple(layer_types))


def _positive_window(window: Any, architecture: str) -> int | None:
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ValueError(f"config.json ({architecture}): sliding_window must be a positive int or null, got {window!r}")
    return window


def _rope(hf_config: dict[str, Any], architecture: str, field) -> tuple[float, RopeScaling | YarnScaling | None]:
    """(rope_theta, Llama-3 or (DeepSeek) YaRN scaling or None) from either config layout:
    transformers 5: `rope_parameters = {rope_type, rope_theta, ...}`; transformers 4: top-level `rope_theta`
    and `rope_scaling = {type or rope_type, ...}` (or null)."""
    parameters: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):  # the new layout wins where both are present
        value = hf_config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"config.json ({architecture}): {key} must be an object or null, got {value!r}")
        nested = [v for v in value.values() if isinstance(v, dict)]
        if nested:  # per-layer-type RoPE: fine only if every layer type uses the same settings
            if any(v != nested[0] for v in nested):
                raise ValueError(f"config.json ({architecture}): {key} differs between layer types ({value}); not supported")
            value = nested[0]
        parameters.update(value)
    theta = parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    partial = parameters.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"config.json ({architecture}): partial_rotary_factor={partial} is not supported (RoPE over the whole head)")
    rope_type = parameters.get("rope_type", parameters.get("type", "default")) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "yarn" and hf_deepseek.is_deepseek(architecture):
        return theta, hf_deepseek.yarn_from_hf(parameters, architecture, field)
    if rope_type != "llama3":
        raise ValueError(
            f"config.json ({architecture}): rope type {rope_type!r} is not supported; supported: 'default', 'llama3'"
        )
    try:
        scaling = RopeScaling(
            factor=float(parameters["factor"]),
            low_freq_factor=float(parameters["low_freq_factor"]),
            high_freq_factor=float(parameters["high_freq_factor"]),
            original_max_position_embeddings=int(
                parameters.get("original_max_position_embeddings", field("max_position_embeddings", 4096))
            ),
        )
    except KeyError as error:
        raise ValueError(f"config.json ({architecture}): llama3 rope scaling lacks {error.args[0]!r}") from None
    return theta, scaling


def config_to_hf(config: TransformerConfig) -> dict[str, Any]:
    """A config.json dict that transformers (5, and 4.4x) reads as the same model (see the module doc for the
    architecture chosen). Written in both RoPE layouts (`rope_parameters`, and `rope_theta` + `rope_scaling`)."""
    if config.mla is not None:
        architecture = hf_deepseek.architecture_for(config)
    elif config.moe is not None:
        raise ValueError("moe: mixture-of-experts MLPs are written only as DeepSeek checkpoints (with mla)")
    elif config.qk_norm:
        architecture = "Qwen3ForCausalLM"
    elif config.qkv_bias:
        architecture = "Qwen2ForCausalLM"
    elif config.layer_types is not None:
        raise ValueError(
            f"layer_types: per-layer attention kinds {config.layer_types} are written as Qwen2 (qkv_bias) or Qwen3 "
            "(qk_norm) checkpoints; this config has neither, and Llama / Mistral configs have no per-layer windows"
        )
    elif config.sliding_window is not None or config.hidden_size % config.num_heads:
        # Mistral with sliding_window null is Llama; it also takes a hidden size that is not a multiple of the
        # head count (with an explicit head_dim), which LlamaConfig rejects
        architecture = "MistralForCausalLM"
    else:
        architecture = "LlamaForCausalLM"
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if isinstance(config.rope_scaling, YarnScaling):
        if config.mla is None:
            raise ValueError("rope_scaling: YaRN is written only for DeepSeek (mla) checkpoints")
        rope.update(hf_deepseek.yarn_to_hf(config.rope_scaling))
    elif config.rope_scaling is not None:
        scaling = config.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    eos = list(config.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": _ARCH_MODEL_TYPES[architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": config.rope_theta,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling is not None else None,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "dtype": config.dtype,
        "torch_dtype": config.dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if hf_deepseek.is_deepseek(architecture):
        out.pop("head_dim")
        out.update(hf_deepseek.config_fields_to_hf(config, architecture))
    if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        out["attention_bias"] = config.qkv_bias  # o_proj then carries a zero bias
    if architecture == "LlamaForCausalLM":
        out["mlp_bias"] = False
    if architecture == "MistralForCausalLM":
        out["sliding_window"] = config.sliding_window
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        types = list(config.attention_types)
        sliding = "sliding_attention" in types
        out.update(
            use_sliding_window=sliding,
            sliding_window=config.sliding_window,
            # transformers derives layer_types from max_window_layers when absent; both are written consistently
            max_window_layers=types.index("sliding_attention") if sliding else config.num_layers,
            layer_types=types,
        )
    if config.mask_token_id is not None:
        out["mask_token_id"] = config.mask_token_id
    if config.diffusion is not None:  # transformers keeps unknown keys as attributes; jspec reads them back
        out[DIFFUSION_KEY] = {
            "kind": config.diffusion, "block_size": config.diffusion_block_size, "shifted_logits": config.shifted_logits
        }
    return out


# --- weights ------------------------------------------------------------------------------------------


def _expected_tensors(config: TransformerConfig, o_bias: bool) -> dict[str, tuple[tuple[int, ...], tuple, bool]]:
    """{HF name: (shape in the checkpoint, destination path in params (None: checked, not kept), transpose)}."""
    d, f, v, dh = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_size
    q_dim, kv_dim = config.num_heads * dh, config.num_kv_heads * dh
    out: dict[str, tuple[tuple[int, ...], tuple, bool]] = {"model.embed_tokens.weight": ((v, d), ("embed",), False)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        if config.mla is not None:
            for name, (shape, key, transpose) in hf_deepseek.layer_tensors(config, i, hf_deepseek.architecture_for(config)).items():
                out[p + name] = (shape, ("layers", i, key) if key else None, transpose)
            continue
        layer = {
            "self_attn.q_proj.weight": ((q_dim, d), "q", True),
            "self_attn.k_proj.weight": ((kv_dim, d), "k", True),
            "self_attn.v_proj.weight": ((kv_dim, d), "v", True),
            "self_attn.o_proj.weight": ((d, q_dim), "o", True),
            "input_layernorm.weight": ((d,), "attn_norm", False),
            "post_attention_layernorm.weight": ((d,), "mlp_norm", False),
            "mlp.gate_proj.weight": ((f, d), "gate", True),
            "mlp.up_proj.weight": ((f, d), "up", True),
            "mlp.down_proj.weight": ((d, f), "down", True),
        }
        if config.qkv_bias:
            layer.update(
                {
                    "self_attn.q_proj.bias": ((q_dim,), "q_bias", False),
                    "self_attn.k_proj.bias": ((kv_dim,), "k_bias", False),
                    "self_attn.v_proj.bias": ((kv_dim,), "v_bias", False),
                }
            )
        if o_bias:
            layer["self_attn.o_proj.bias"] = ((d,), None, False)
        if config.qk_norm:
            layer.update({"self_attn.q_norm.weight": ((dh,), "q_norm", False), "self_attn.k_norm.weight": ((dh,), "k_norm", False)})
        for name, (shape, key, transpose) in layer.items():
            out[p + name] = (shape, ("layers", i, key) if key else None, transpose)
    out["model.norm.weight"] = ((d,), ("final_norm",), False)
    if not config.tie_embeddings:
        out["lm_head.weight"] = ((v, d), ("lm_head",), True)
    return out


def tensor_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape (torch layout)} of the checkpoint `save_hf` writes for `config`."""
    o_bias = config_to_hf(config).get("attention_bias", False)
    return {name: shape for name, (shape, _, _) in _expected_tensors(config, o_bias).items()}


def params_from_hf(
    tensors: dict[str, Any], config: TransformerConfig, *, o_bias: bool = False, interleaved_rope: bool = False
) -> dict[str, Any]:
    """The jspec parameter pytree from HF-named tensors (numpy arrays or lazy tensors), cast to `config.dtype`.

    o_bias: the checkpoint has `o_proj.bias` tensors (Llama / Qwen3 attention_bias); they must be all zero.
    Raises ValueError naming every missing tensor, unexpected tensor, or wrong shape.
    """
    return read_params(lazy_params_from_hf(tensors, config, o_bias=o_bias, interleaved_rope=interleaved_rope))


def read_params(params: dict[str, Any]) -> dict[str, Any]:
    """A lazy parameter pytree (`lazy_params_from_hf`) read whole into jax arrays (on the default device)."""
    return jax.tree.map(lambda tensor: jnp.asarray(tensor.read_all()), params)


def lazy_params_from_hf(
    tensors: dict[str, Any], config: TransformerConfig, *, o_bias: bool = False, interleaved_rope: bool = False
) -> dict[str, Any]:
    """interleaved_rope: a DeepSeek checkpoint whose RoPE rows are interleaved (permuted to rotate-half here).
    `params_from_hf`'s pytree with a `jspec.checkpoint.lazy.LazyTensor` per leaf (transposed, cast and stacked
    as the parameters need; nothing of the weights read yet), after the same validation: what `read_params` reads
    whole and `jspec.sharding.shard` reads device slice by device slice. Arrays among `tensors` are wrapped."""
    tensors = {k: t if lazy.is_lazy(t) else lazy.InMemory(np.asarray(t)) for k, t in tensors.items()
               if not k.endswith(_IGNORED_SUFFIXES)}
    expected = _expected_tensors(config, o_bias)
    missing = sorted(set(expected) - set(tensors), key=_natural)
    if missing:
        raise ValueError(f"checkpoint: missing tensor(s) {_listed(missing)} for {config.name} ({config.num_layers} layers)")
    extra = sorted(set(tensors) - set(expected), key=_natural)
    if config.tie_embeddings and "lm_head.weight" in extra:
        if _equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            extra.remove("lm_head.weight")  # a redundant copy of the tied embedding
        else:
            raise ValueError("checkpoint: lm_head.weight differs from model.embed_tokens.weight, but tie_word_embeddings is true")
    if extra:
        raise ValueError(f"checkpoint: unexpected tensor(s) {_listed(extra)} (not part of {config.name}'s architecture)")

    dtype = np.dtype(jnp.dtype(config.dtype))
    params: dict[str, Any] = {"embed": None, "layers": [{} for _ in range(config.num_layers)], "final_norm": None}
    layers = params["layers"]
    for name, (shape, destination, transpose) in expected.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            layout = " (torch [out, in] layout)" if len(shape) == 2 else ""
            raise ValueError(f"checkpoint: tensor {name} has shape {tuple(tensor.shape)}, expected {shape}{layout}")
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            raise ValueError(f"checkpoint: tensor {name} has dtype {tensor.dtype}, expected a floating-point dtype")
        if destination is None:  # an o_proj bias: jspec has none, so it must be zero
            if np.any(np.asarray(tensor.read_all(), np.float32) != 0):
                raise ValueError(
                    f"checkpoint: tensor {name} is a nonzero output-projection bias, which jspec's transformer does not "
                    "support (attention_bias=true is supported only when o_proj.bias is all zero)"
                )
            continue
        order = hf_deepseek.rope_row_order(config, name) if interleaved_rope else None
        if order is not None:
            tensor = tensor.reordered(order)
        value = (tensor.T if transpose else tensor).astype(dtype)
        if destination[0] != "layers":
            params[destination[0]] = value
        elif isinstance(destination[2], tuple):  # expert e of a stacked expert tensor
            key, expert = destination[2]
            layers[destination[1]].setdefault(key, {})[expert] = value
        else:
            layers[destination[1]][destination[2]] = value
    for layer in layers:  # stack expert tensors in expert order
        for key, parts in list(layer.items()):
            if isinstance(parts, dict):
                layer[key] = lazy.stack([parts[e] for e in range(len(parts))])
    params["groups"] = transformer.stack_layers(config, params.pop("layers"), stack=lazy.stack)
    return params


def _equal(a: lazy.LazyTensor, b: lazy.LazyTensor) -> bool:
    """Whether two tensors hold equal values, compared block by block (never both whole in memory)."""
    return tuple(a.shape) == tuple(b.shape) and all(
        np.array_equal(block, b.read((slice(first, first + len(block)),))) for first, block in lazy.read_rows(a)
    )


def params_to_hf(params: dict[str, Any], config: TransformerConfig) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (torch layout, the params' dtype) for `config_to_hf(config)`'s architecture."""
    hf_config = config_to_hf(config)
    o_bias = hf_config.get("attention_bias", False)
    architecture = hf_config["architectures"][0]
    interleaved = hf_deepseek.is_deepseek(architecture) and hf_deepseek.interleaved_rope(architecture, hf_config.get)
    params = {**params, "layers": [transformer.layer_params(config, params, i) for i in range(config.num_layers)]}
    out = {}
    for name, (shape, destination, transpose) in _expected_tensors(config, o_bias).items():
        if destination is None:
            out[name] = np.zeros(shape, np.asarray(params["final_norm"]).dtype)
            continue
        value = params
        for key in destination:
            value = value[key[0]][key[1]] if isinstance(key, tuple) else value[key]  # (key, expert)
        array = np.asarray(value)
        out[name] = array.T if transpose else array
        order = hf_deepseek.rope_row_order(config, name) if interleaved else None
        if order is not None:  # back to the interleaved layout: the inverse permutation
            out[name] = out[name][np.argsort(order)]
        if out[name].shape != shape:
            raise ValueError(f"params: {'.'.join(map(str, destination))} has shape {array.shape}, which does not fit {name} {shape}")
    return out


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _listed(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --- directories --------------------------------------------------------------------------------------


def load_hf(path: str | Path, dtype: str | None = None, *, mesh: Any = None, rules: Any = None) -> Model:
    """A `jspec.Model` from a Hugging Face model directory (config.json, model.safetensors or a sharded
    index, and tokenizer.json when present, wrapped as an `HFTokenizer` with the config's EOS ids).

    dtype: parameter dtype ("float32", "bfloat16", "float16"); default: the config's `dtype`/`torch_dtype`,
    else float32. See the module doc for what is guaranteed and what raises.
    mesh, rules: place the parameters straight onto a `jax.sharding.Mesh` by their logical axes (see
    `jspec.sharding`): each parameter becomes a global array whose addressable devices' slices are read from the
    safetensors files, transposed, stacked and cast slice by slice; no host ever holds a whole checkpoint (at
    most the slices of one tensor at a time beyond what its devices hold). On several hosts each process reads
    only its own devices' slices. Equal, bit for bit, to `jspec.sharding.shard(load_hf(path), mesh, rules)`.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"load_hf: {path} has no config.json (not a Hugging Face model directory)")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load_hf: {config_path} is not valid JSON ({error})") from None
    from jspec.checkpoint import huginn

    if huginn.is_huginn_config(hf_config):  # a recurrent-depth model (Huginn-0125): its own family and format
        return huginn.load_huginn(path, dtype, mesh=mesh, rules=rules)
    generation_path = path / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
    config = config_from_hf(hf_config, dtype=dtype, name=hf_config.get("_name_or_path") or path.name, generation_config=generation)
    plan = None if mesh is None else sharding.MeshSharding.create(mesh, rules, sharding.logical_counts(config))
    architecture = architecture_of(hf_config)
    o_bias = architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM") and config.qkv_bias
    interleaved = hf_deepseek.is_deepseek(architecture) and hf_deepseek.interleaved_rope(
        architecture, lambda key, default=None: hf_config.get(key, hf_deepseek.DEFAULTS[architecture].get(key, default)))
    params = lazy_params_from_hf(safetensors.lazy_checkpoint(path), config, o_bias=o_bias, interleaved_rope=interleaved)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = HFTokenizer.from_file(path / "tokenizer.json", config.eos_token_ids, config.bos_token_id)
    if plan is None:
        return Model(params=read_params(params), config=config, tokenizer=tokenizer)
    return sharding.shard_with(Model(params=params, config=config, tokenizer=tokenizer), plan)


def save_hf(
    model: Model, path: str | Path, *, overwrite: bool = False, max_shard_bytes: int = safetensors.DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Write `model` as a Hugging Face directory: config.json, model.safetensors (sharded with an index above
    `max_shard_bytes`), and tokenizer.json + tokenizer_config.json when the model has an `HFTokenizer`.

    `transformers.AutoModelForCausalLM.from_pretrained(path)` then gives the same logits, and `load_hf(path)`
    an equal model (equal parameters and config; where the config names no EOS ids but the tokenizer does, the
    tokenizer's are written into config.json, so both stop where `jspec.decode` would). Returns the directory.

    path: a new or empty directory; a non-empty one (another model, a jspec checkpoint, anything) raises
    ValueError unless `overwrite`, which replaces the whole directory atomically: the old content stays until the
    new directory is complete, and stays if writing fails (`jspec.checkpoint.directories`).
    """
    check_destination(path, overwrite=overwrite)  # before any work
    config = model.config
    tokenizer_eos = tuple(getattr(model.tokenizer, "eos_token_ids", ()) or ())
    if not config.eos_token_ids and tokenizer_eos:
        # jspec.decode stops on the tokenizer's EOS when the config names none; HF reads EOS from the config only
        config = config.replace(eos_token_ids=tokenizer_eos)
    hf_config = config_to_hf(config)
    tensors = params_to_hf(model.params, config)

    def write(directory: Path) -> None:
        safetensors.save_checkpoint(tensors, directory, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if isinstance(model.tokenizer, HFTokenizer):
            model.tokenizer.save(directory / "tokenizer.json")
            tokenizer_config = _tokenizer_config(model.tokenizer, config)
            (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")

    return write_directory(path, write, overwrite=overwrite)


def _tokenizer_config(hf_tokenizer: HFTokenizer, config: TransformerConfig) -> dict[str, Any]:
    """Enough for `transformers.AutoTokenizer.from_pretrained` to wrap tokenizer.json."""
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings}
    for key, token_id in (
        ("bos_token", config.bos_token_id),
        ("eos_token", config.eos_token_ids[0] if config.eos_token_ids else None),
    ):
        if token_id is not None and hf_tokenizer.id_to_token(token_id) is not None:
            out[key] = hf_tokenizer.id_to_token(token_id)
    return out


__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "lazy_params_from_hf", "load_hf", "params_from_hf",
           "params_to_hf", "read_params", "save_hf", "tensor_shapes"]
