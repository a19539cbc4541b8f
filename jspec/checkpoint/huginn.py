"""Huginn-0125 checkpoint directories (`RavenForCausalLM`, model_type "huginn_raven") in and out: config.json,
safetensors weights, tokenizer.json. `jspec.load` reaches `load_huginn` through `load_hf` (it dispatches on the
config's model_type); `jspec.save` of a `RecurrentModel` writes this format (`save_huginn`).

Config fields (seal-rg/recurrent-pretraining, recpre/raven_config_minimal.py) onto `RecurrentConfig`:
    n_embd -> hidden_size, n_heads -> num_heads, intermediate_size, vocab_size (padded_vocab_size),
    n_layers_in_prelude / n_layers_in_recurrent_block / n_layers_in_coda -> num_{prelude,core,coda}_layers,
    mean_recurrence, mean_backprop_depth, rope_base -> rope_theta, norm_eps -> rms_norm_eps, qk_bias,
    tie_embeddings, block_size -> max_position_embeddings, bos/eos/pad_token_id.
Anything the minimal modeling file does not compute (another block, norm, MLP, nonlinearity or injection class,
bias=true, test-time noise) raises ValueError naming the field.

Weights (torch Linear weights are [out, in]; jspec stores [in, out]):
    transformer.wte.weight [V, D]                          embed
    transformer.{prelude,core_block,coda}.{i}.norm_{1..4}.weight           {prelude,core,coda}.norm_{1..4}[i]
    transformer.{...}.{i}.attn.Wqkv.weight [3D, D]         q, k, v (rows [q | k | v], q and k permuted, below)
    transformer.{...}.{i}.attn.qk_bias [2, 1, H, Dh]       q_bias, k_bias (permuted likewise)
    transformer.{...}.{i}.attn.proj.weight [D, D]          o
    transformer.{...}.{i}.mlp.fc.weight [2F, D]            gate (rows :F), up (rows F:)
    transformer.{...}.{i}.mlp.proj.weight [D, F]           down
    transformer.adapter.weight [D, 2D]                     adapter
    transformer.ln_f.weight [D]                            final_norm
    lm_head.weight [V, D]                                  tied to wte (Huginn-0125: ignored on load, not written);
                                                           lm_head [D, V] otherwise
    freqs_cis                                              a RoPE table buffer: ignored on load, written on save
Huginn applies RoPE to interleaved feature pairs (2j, 2j+1) of each head; jspec rotates halves (j, j + Dh/2).
Reordering each head's q and k features as [0, 2, 4, ..., 1, 3, 5, ...] maps one onto the other and leaves every
q.k product unchanged, so the loaded model computes the same logits (tests/test_recurrent.py runs the reference
modeling file against it when it is available).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jspec.checkpoint import safetensors
from jspec.checkpoint.directories import check_destination, write_directory
from jspec.models.config import DTYPES
from jspec.models.recurrent import STACKS, RecurrentConfig, RecurrentModel
from jspec.tokenizer import HFTokenizer

ARCHITECTURE = "RavenForCausalLM"
MODEL_TYPE = "huginn_raven"
HF_STACKS = {"prelude": "prelude", "core": "core_block", "coda": "coda"}
# Fields whose value must be the one the minimal modeling file computes with.
_FIXED = {"architecture_class_name": "RecurrentGPT", "block_class_name": "SandwichBlock",
          "norm_class_name": "RMSNorm_llama", "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU",
          "injection_type": "linear", "bias": False}
_DEFAULTS = {"n_embd": 5280, "n_heads": 55, "block_size": 4096, "vocab_size": 65536, "tie_embeddings": True,
             "intermediate_size": 17920, "norm_eps": 1e-6, "n_layers_in_recurrent_block": 4, "mean_recurrence": 32,
             "mean_backprop_depth": 8, "n_layers_in_prelude": 2, "n_layers_in_coda": 2, "qk_bias": True,
             "rope_base": 50000.0}


def is_huginn_config(hf_config: dict[str, Any]) -> bool:
    return hf_config.get("model_type") == MODEL_TYPE or ARCHITECTURE in (hf_config.get("architectures") or [])


def config_from_huginn(hf_config: dict[str, Any], *, dtype: str | None = None, name: str | None = None) -> RecurrentConfig:
    """A `RecurrentConfig` from a parsed Huginn config.json; ValueError naming a field jspec cannot compute."""
    field = lambda key: hf_config.get(key, _DEFAULTS.get(key))  # noqa: E731
    for key, expected in _FIXED.items():
        if key in hf_config and hf_config[key] != expected:
            raise ValueError(f"config.json ({ARCHITECTURE}): {key}={hf_config[key]!r} is not supported (expected {expected!r})")
    if hf_config.get("test_time_noise", 0):
        raise ValueError(f"config.json ({ARCHITECTURE}): test_time_noise={hf_config['test_time_noise']!r} is not supported (0 only)")
    layers = field("n_layers_in_prelude") + field("n_layers_in_recurrent_block") + field("n_layers_in_coda")
    if "n_layers" in hf_config and hf_config["n_layers"] != layers:
        raise ValueError(f"config.json ({ARCHITECTURE}): n_layers={hf_config['n_layers']} is not prelude + core + coda = {layers}")
    dtype = dtype or hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    eos = hf_config.get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return RecurrentConfig(
        vocab_size=field("vocab_size"), hidden_size=field("n_embd"), num_heads=field("n_heads"),
        intermediate_size=field("intermediate_size"), num_prelude_layers=field("n_layers_in_prelude"),
        num_core_layers=field("n_layers_in_recurrent_block"), num_coda_layers=field("n_layers_in_coda"),
        mean_recurrence=field("mean_recurrence"), mean_backprop_depth=field("mean_backprop_depth"),
        rope_theta=float(field("rope_base")), rms_norm_eps=float(field("norm_eps")), qk_bias=bool(field("qk_bias")),
        tie_embeddings=bool(field("tie_embeddings")), dtype=dtype, max_position_embeddings=field("block_size"),
        bos_token_id=hf_config.get("bos_token_id"), eos_token_ids=tuple(eos),
        pad_token_id=hf_config.get("pad_token_id") or 0, name=name or "huginn")


def config_to_huginn(config: RecurrentConfig) -> dict[str, Any]:
    """config.json for a `RecurrentConfig` (the reference's RavenConfig fields)."""
    out = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "n_embd": config.hidden_size,
        "n_heads": config.num_heads, "n_layers": config.num_layers, "block_size": config.max_position_embeddings,
        "vocab_size": config.vocab_size, "padding_multiple": 1, "tie_embeddings": config.tie_embeddings,
        "tie_word_embeddings": config.tie_embeddings, "intermediate_size": config.intermediate_size,
        "norm_eps": config.rms_norm_eps, "init_strategy": "takase", "init_orthogonal": False,
        "state_init": "like-init", "n_layers_in_recurrent_block": config.num_core_layers,
        "mean_recurrence": config.mean_recurrence, "sampling_scheme": "poisson-lognormal-filling",
        "mean_backprop_depth": config.mean_backprop_depth, "n_layers_in_prelude": config.num_prelude_layers,
        "n_layers_in_coda": config.num_coda_layers, "qk_bias": config.qk_bias,
        "activation_checkpoint_impl": "per-iteration", "rope_base": config.rope_theta, "torch_dtype": config.dtype,
        "bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids) or None,
        "pad_token_id": config.pad_token_id, **_FIXED,
    }
    return out


def interleaved_to_halves(head_dim: int) -> np.ndarray:
    """Feature order [0, 2, 4, ..., 1, 3, 5, ...] of one head: Huginn's RoPE pairs (2j, 2j+1) become (j, j + Dh/2)."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _head_order(config: RecurrentConfig) -> np.ndarray:  # [H * Dh]: jspec feature -> Huginn feature
    dh = config.head_size
    return (np.arange(config.num_heads)[:, None] * dh + interleaved_to_halves(dh)[None, :]).reshape(-1)


def expected_tensors(config: RecurrentConfig) -> dict[str, tuple[int, ...]]:
    d, f, v, h, dh = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_heads, config.head_size
    shapes = {"transformer.wte.weight": (v, d), "transformer.adapter.weight": (d, 2 * d), "transformer.ln_f.weight": (d,)}
    for stack in STACKS:
        for i in range(config.stack_layers(stack)):
            prefix = f"transformer.{HF_STACKS[stack]}.{i}."
            shapes.update({prefix + f"norm_{n}.weight": (d,) for n in range(1, 5)})
            shapes.update({prefix + "attn.Wqkv.weight": (3 * d, d), prefix + "attn.proj.weight": (d, d),
                           prefix + "mlp.fc.weight": (2 * f, d), prefix + "mlp.proj.weight": (d, f)})
            if config.qk_bias:
                shapes[prefix + "attn.qk_bias"] = (2, 1, h, dh)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def params_from_huginn(tensors: dict[str, Any], config: RecurrentConfig) -> dict[str, Any]:
    """The parameter pytree from Huginn tensors (numpy or lazy file tensors); ValueError naming a missing,
    unexpected or misshapen tensor."""
    expected = expected_tensors(config)
    optional = {"freqs_cis", "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - optional)
    if missing or unexpected:
        raise ValueError(f"{ARCHITECTURE} checkpoint: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{ARCHITECTURE} checkpoint: tensor {name!r} has shape {list(tensors[name].shape)}, "
                             f"the config implies {list(shape)}")
    dtype = jnp.dtype(config.dtype)
    read = lambda name: np.asarray(_whole(tensors[name]), dtype=np.float32)  # noqa: E731
    as_param = lambda array: jnp.asarray(array, dtype)  # noqa: E731
    order = _head_order(config)
    d, f = config.hidden_size, config.intermediate_size

    def layer(prefix: str) -> dict[str, Any]:
        qkv = read(prefix + "attn.Wqkv.weight")
        fc = read(prefix + "mlp.fc.weight")
        out = {f"norm_{n}": read(prefix + f"norm_{n}.weight") for n in range(1, 5)}
        out.update(q=qkv[:d][order].T, k=qkv[d:2 * d][order].T, v=qkv[2 * d:].T, o=read(prefix + "attn.proj.weight").T,
                   gate=fc[:f].T, up=fc[f:].T, down=read(prefix + "mlp.proj.weight").T)
        if config.qk_bias:
            bias = read(prefix + "attn.qk_bias").reshape(2, -1)
            out.update(q_bias=bias[0][order], k_bias=bias[1][order])
        return out

    params: dict[str, Any] = {"embed": as_param(read("transformer.wte.weight"))}
    for stack in STACKS:
        layers = [layer(f"transformer.{HF_STACKS[stack]}.{i}.") for i in range(config.stack_layers(stack))]
        names = layers[0].keys() if layers else _empty_layer_names(config)
        params[stack] = {name: as_param(np.stack([l[name] for l in layers]) if layers else
                                        np.zeros((0, *_layer_shape(config, name)), np.float32)) for name in names}
    params["adapter"] = as_param(read("transformer.adapter.weight").T)
    params["final_norm"] = as_param(read("transformer.ln_f.weight"))
    if not config.tie_embeddings:
        params["lm_head"] = as_param(read("lm_head.weight").T)
    return params


def _whole(tensor: Any) -> np.ndarray:
    """A numpy array from an array or a lazy file tensor (`jspec.checkpoint.lazy`)."""
    return tensor.read_all() if hasattr(tensor, "read_all") else np.asarray(tensor)


def _empty_layer_names(config: RecurrentConfig) -> list[str]:
    names = ["norm_1", "norm_2", "norm_3", "norm_4", "q", "k", "v", "o", "gate", "up", "down"]
    return names + (["q_bias", "k_bias"] if config.qk_bias else [])


def _layer_shape(config: RecurrentConfig, name: str) -> tuple[int, ...]:
    d, f, hd = config.hidden_size, config.intermediate_size, config.num_heads * config.head_size
    return {"q": (d, hd), "k": (d, hd), "v": (d, hd), "o": (hd, d), "gate": (d, f), "up": (d, f), "down": (f, d),
            "q_bias": (hd,), "k_bias": (hd,)}.get(name, (d,))


def params_to_huginn(params: dict[str, Any], config: RecurrentConfig) -> dict[str, np.ndarray]:
    """Huginn tensors (torch layout, the params' dtype) from the parameter pytree; the inverse of
    `params_from_huginn`, plus the RoPE buffer `freqs_cis` the reference registers (a tied lm_head is left out)."""
    inverse = np.argsort(_head_order(config))
    host = lambda x: np.asarray(x)  # noqa: E731
    tensors: dict[str, np.ndarray] = {"transformer.wte.weight": host(params["embed"])}
    for stack in STACKS:
        leaves = {name: host(value) for name, value in params[stack].items()}
        for i in range(config.stack_layers(stack)):
            prefix = f"transformer.{HF_STACKS[stack]}.{i}."
            for n in range(1, 5):
                tensors[prefix + f"norm_{n}.weight"] = leaves[f"norm_{n}"][i]
            q, k = leaves["q"][i].T[inverse], leaves["k"][i].T[inverse]
            tensors[prefix + "attn.Wqkv.weight"] = np.concatenate([q, k, leaves["v"][i].T])
            tensors[prefix + "attn.proj.weight"] = leaves["o"][i].T
            tensors[prefix + "mlp.fc.weight"] = np.concatenate([leaves["gate"][i].T, leaves["up"][i].T])
            tensors[prefix + "mlp.proj.weight"] = leaves["down"][i].T
            if config.qk_bias:
                bias = np.stack([leaves["q_bias"][i][inverse], leaves["k_bias"][i][inverse]])
                tensors[prefix + "attn.qk_bias"] = bias.reshape(2, 1, config.num_heads, config.head_size)
    tensors["transformer.adapter.weight"] = host(params["adapter"]).T
    tensors["transformer.ln_f.weight"] = host(params["final_norm"])
    if not config.tie_embeddings:  # tied: left out, as transformers' save_pretrained does (the model ties it on load)
        tensors["lm_head.weight"] = host(params["lm_head"]).T
    tensors["freqs_cis"] = rope_buffer(config)
    return {name: np.ascontiguousarray(value) for name, value in tensors.items()}


def rope_buffer(config: RecurrentConfig) -> np.ndarray:
    """The reference's persistent `freqs_cis` buffer [1, block_size, 1, Dh/2, 2] (cos, sin) in float32."""
    dh = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    angles = np.outer(np.arange(config.max_position_embeddings, dtype=np.float32), inv_freq).astype(np.float32)
    return np.stack([np.cos(angles), np.sin(angles)], axis=-1)[None, :, None].astype(np.float32)


def load_huginn(path: str | Path, dtype: str | None = None, *, mesh: Any = None, rules: Any = None) -> RecurrentModel:
    """A `RecurrentModel` from a Huginn directory (config.json, model.safetensors or a sharded index, tokenizer.json
    when present). mesh/rules: placed with `jspec.sharding.shard` after reading (not read slice by slice)."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    config = config_from_huginn(hf_config, dtype=dtype, name=hf_config.get("_name_or_path") or path.name)
    params = params_from_huginn(safetensors.lazy_checkpoint(path), config)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = HFTokenizer.from_file(path / "tokenizer.json", config.eos_token_ids, config.bos_token_id)
    model = RecurrentModel(params=params, config=config, tokenizer=tokenizer)
    if mesh is None:
        return model
    from jspec import sharding

    return sharding.shard(model, mesh, rules)


def save_huginn(model: RecurrentModel, path: str | Path, *, overwrite: bool = False,
                max_shard_bytes: int = safetensors.DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` as a Huginn directory that `load_huginn` (and `jspec.load`) reads back into an equal model,
    and the reference modeling file loads; tokenizer.json too when the model has an `HFTokenizer`. A non-empty
    `path` raises ValueError unless `overwrite` (then replaced atomically)."""
    from jspec.checkpoint.hf import _tokenizer_config

    check_destination(path, overwrite=overwrite)
    config = model.config
    tokenizer_eos = tuple(getattr(model.tokenizer, "eos_token_ids", ()) or ())
    if not config.eos_token_ids and tokenizer_eos:
        config = config.replace(eos_token_ids=tokenizer_eos)
    tensors = params_to_huginn(model.params, config)

    def write(directory: Path) -> None:
        safetensors.save_checkpoint(tensors, directory, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config_to_huginn(config), indent=2, sort_keys=True) + "\n")
        if isinstance(model.tokenizer, HFTokenizer):
            model.tokenizer.save(directory / "tokenizer.json")
            (directory / "tokenizer_config.json").write_text(
                json.dumps(_tokenizer_config(model.tokenizer, config), indent=2, sort_keys=True) + "\n")

    return write_directory(path, write, overwrite=overwrite)
