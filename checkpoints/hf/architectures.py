"""The one table between Hugging Face causal-LM checkpoints and Baton's attention models, read in both
directions: import (checkpoints/hf/importer.py) and the plain-`transformers` export of a pure-attention model
(checkpoints/hf/exporter.py).

Llama, Mistral, Qwen2 and Qwen3 are Baton's pre-norm attention block exactly (RMSNorm, GQA with RoPE in the
half-split layout HF's `rotate_half` uses, SwiGLU), so every tensor maps by name alone, with no transform; what
differs between them is only which options they carry (biases, q/k norms, a sliding window, rope scaling).
Anything the table does not name, a key or a setting, is refused by name: a checkpoint is never half read.
"""
from __future__ import annotations

from dataclasses import dataclass

from configs.errors import CheckpointError

# Baton name -> HF name, for the whole model and (prefix blocks.{i}. <-> model.layers.{i}.) for every layer.
MODEL_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "lm_head.weight": "lm_head.weight"}
LAYER_NAMES = {
    "mixer_norm.weight": "input_layernorm.weight",
    **{f"mixer.{p}_proj.{kind}": f"self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")},
    "mixer.q_norm.weight": "self_attn.q_norm.weight",
    "mixer.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"mlp.{p}.weight": f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")},
}
BATON_LAYER_PREFIX, HF_LAYER_PREFIX = "blocks.", "model.layers."


def to_hf_name(name: str) -> str:
    """A Baton state-dict key as the HF checkpoint names it (a CheckpointError for a key the table lacks)."""
    if name in MODEL_NAMES:
        return MODEL_NAMES[name]
    if name.startswith(BATON_LAYER_PREFIX):
        index, rest = name[len(BATON_LAYER_PREFIX):].split(".", 1)
        if rest in LAYER_NAMES:
            return f"{HF_LAYER_PREFIX}{index}.{LAYER_NAMES[rest]}"
    raise CheckpointError(f"{name}: no Hugging Face name for this tensor (only attention models export as plain "
                          "transformers models)")


_FROM_HF_MODEL = {hf: baton for baton, hf in MODEL_NAMES.items()}
_FROM_HF_LAYER = {hf: baton for baton, hf in LAYER_NAMES.items()}


def to_baton_name(name: str) -> str:
    """An HF checkpoint key as Baton's state dict names it (a CheckpointError naming an unknown key)."""
    if name in _FROM_HF_MODEL:
        return _FROM_HF_MODEL[name]
    if name.startswith(HF_LAYER_PREFIX):
        index, rest = name[len(HF_LAYER_PREFIX):].split(".", 1)
        if rest in _FROM_HF_LAYER:
            return f"{BATON_LAYER_PREFIX}{index}.{_FROM_HF_LAYER[rest]}"
    raise CheckpointError(f"{name}: unknown tensor in the checkpoint (not part of a Llama/Mistral/Qwen2/Qwen3 "
                          "causal LM as Baton imports it)")


@dataclass(frozen=True)
class Architecture:
    """One HF causal-LM class: how its attention options read as Baton's model.attention settings."""
    hf_class: str
    model_type: str
    qkv_bias: str | bool  # an HF config key naming whether q/k/v carry biases, or a constant for the class
    out_bias: str | bool
    qk_norm: bool  # per-head RMSNorm of queries and keys before RoPE
    window_key: str | None  # the config key of a sliding window applied to every layer (None: none)


ARCHITECTURES = {a.hf_class: a for a in (
    Architecture("LlamaForCausalLM", "llama", "attention_bias", "attention_bias", False, None),
    Architecture("MistralForCausalLM", "mistral", False, False, False, "sliding_window"),
    Architecture("Qwen2ForCausalLM", "qwen2", True, False, False, None),
    Architecture("Qwen3ForCausalLM", "qwen3", "attention_bias", "attention_bias", True, None),
)}

# Settings of these classes that change what the model computes, and the only values Baton reproduces.
REQUIRED_VALUES = {"hidden_act": ("silu",), "mlp_bias": (False, None), "use_sliding_window": (False, None),
                   "partial_rotary_factor": (1.0, None), "pretraining_tp": (1, None)}
ROPE_TYPES = ("default", "llama3")


def _setting(config, key: str | bool):
    return key if isinstance(key, bool) else bool(getattr(config, key, False))


def baton_model_config(hf_config) -> tuple[dict, Architecture]:
    """The Baton model config (a dict of ModelConfig fields) of a transformers config, and its architecture;
    a one-line CheckpointError naming the first architecture or setting Baton cannot reproduce."""
    names = list(getattr(hf_config, "architectures", None) or [])
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise CheckpointError(f"architecture {names or hf_config.model_type!r} is not supported (supported: "
                              f"{', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[names[0]]
    for key, allowed in REQUIRED_VALUES.items():
        value = getattr(hf_config, key, None)
        if value not in allowed:
            raise CheckpointError(f"{arch.hf_class} setting {key}={value!r} is not supported (Baton reproduces "
                                  f"{' or '.join(map(repr, allowed))})")
    window = getattr(hf_config, arch.window_key, None) if arch.window_key else None
    layer_types = set(getattr(hf_config, "layer_types", None) or [])
    if layer_types - {"full_attention"} and window is None:
        raise CheckpointError(f"{arch.hf_class} setting layer_types={sorted(layer_types)} is not supported "
                              "(only full attention in every layer)")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{arch.hf_class} setting rope_type={rope_type!r} is not supported "
                              f"({' or '.join(ROPE_TYPES)})")
    attention = {
        "num_heads": hf_config.num_attention_heads,
        "num_kv_heads": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        "head_dim": getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        "rope_theta": float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        "rope_scaling": None if rope_type == "default" else {
            key: rope[key] for key in ("factor", "low_freq_factor", "high_freq_factor",
                                       "original_max_position_embeddings")},
        "qkv_bias": _setting(hf_config, arch.qkv_bias),
        "out_bias": _setting(hf_config, arch.out_bias),
        "qk_norm": arch.qk_norm,
    }
    if window is not None:
        attention["window"] = int(window)
    model = {"name": f"hf_{arch.model_type}", "vocab_size": hf_config.vocab_size, "d_model": hf_config.hidden_size,
             "pattern": "W" if window is not None else "A", "n_layers": hf_config.num_hidden_layers,
             "d_ff": hf_config.intermediate_size, "norm_eps": float(hf_config.rms_norm_eps),
             "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)), "attention": attention}
    return model, arch


def hf_architecture(model_config) -> Architecture:
    """The plain transformers class a Baton attention model exports as: the one whose options it uses (Qwen3
    for q/k norms, Qwen2 for q/k/v biases alone, Mistral for a sliding window in every layer, else Llama)."""
    letters = set(model_config.pattern)
    a = model_config.attention
    if letters == {"W"}:
        if a.qkv_bias or a.out_bias or a.qk_norm or a.rope_scaling is not None:
            raise CheckpointError("a sliding-window model with biases, q/k norms or rope scaling has no plain "
                                  "transformers class")
        return ARCHITECTURES["MistralForCausalLM"]
    if letters != {"A"}:
        raise CheckpointError(f"pattern {model_config.pattern!r}: only attention models export as plain "
                              "transformers models")
    if a.qk_norm:
        if a.qkv_bias != a.out_bias:
            raise CheckpointError("q/k norms with biases on q/k/v only have no plain transformers class")
        return ARCHITECTURES["Qwen3ForCausalLM"]
    if a.qkv_bias and not a.out_bias:
        return ARCHITECTURES["Qwen2ForCausalLM"]
    if a.out_bias and not a.qkv_bias:
        raise CheckpointError("an output bias without q/k/v biases has no plain transformers class")
    return ARCHITECTURES["LlamaForCausalLM"]


def hf_config_dict(model_config, arch: Architecture, vocab_size: int) -> dict:
    """The transformers config of a Baton attention model exported as `arch` (the inverse of
    baton_model_config)."""
    a = model_config.attention
    head_dim = a.head_dim or model_config.d_model // a.num_heads
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": a.rope_scaling.factor,
                "low_freq_factor": a.rope_scaling.low_freq_factor,
                "high_freq_factor": a.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": a.rope_scaling.original_max_position_embeddings}
    config = {"architectures": [arch.hf_class], "model_type": arch.model_type, "vocab_size": vocab_size,
              "hidden_size": model_config.d_model, "intermediate_size": model_config.mlp_hidden,
              "num_hidden_layers": len(model_config.layer_mixers()), "num_attention_heads": a.num_heads,
              "num_key_value_heads": a.num_kv_heads or a.num_heads, "head_dim": head_dim,
              "hidden_act": "silu", "rms_norm_eps": model_config.norm_eps, "rope_parameters": rope,
              "tie_word_embeddings": model_config.tie_embeddings, "max_position_embeddings": 1 << 20}
    if isinstance(arch.qkv_bias, str):
        config[arch.qkv_bias] = a.qkv_bias
    if arch.window_key is not None:
        config[arch.window_key] = a.window
    return config
