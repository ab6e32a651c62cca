"""Checkpoint directories written by transformers' save_pretrained: each layout in one place.

A layout says which config.json `model_type`s it reads, how their keys translate into kvbench's config keys
(anything kvbench does not implement is refused, naming the key), and how the tensors of model.safetensors
are renamed and re-laid to kvbench's names. GPT-2 is one layout; Llama, Qwen2 and Mistral share another
(their tensors are named alike; their config.json options differ). A new architecture is one more entry.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kvbench.config import LoadedConfig, ModelConfig, validate_config
from kvbench.errors import KVBenchError

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values read by this layout
    config_keys: dict[str, str]  # config.json key -> kvbench key, for values that pass through unchanged
    fixed_fields: Callable[[dict[str, Any], str], dict[str, Any]]  # the rest of the config: checked, translated
    rename: Callable[[Tensors, ModelConfig], Tensors]  # checkpoint tensors -> kvbench names and layouts
    signature: re.Pattern  # matches a tensor name only checkpoints of this layout have

    def fields(self, hf: dict[str, Any], origin: str) -> dict[str, Any]:
        """kvbench config keys for a config.json. Values pass through as they are, so that a wrong type
        fails validation naming the config.json key."""
        passed = {ours: hf[theirs] for theirs, ours in self.config_keys.items() if theirs in hf}
        return {**passed, **self.fixed_fields(hf, origin)}

    def recognises(self, tensors: Tensors) -> bool:
        return any(self.signature.match(name) for name in tensors)


def refuse(origin: str, key: str, value: Any, why: str) -> KVBenchError:
    return KVBenchError(f"{origin}: '{key}: {json.dumps(value)}' is not supported by kvbench ({why})")


def mapped(table: dict[str, str], key: str, value: Any, origin: str) -> str:
    if not isinstance(value, str) or value not in table:
        raise refuse(origin, key, value, f"use one of {', '.join(table)}")
    return table[value]


# --- GPT-2 -----------------------------------------------------------------------------------------------------

GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}
GPT2_KEYS = {"n_layer": "n_layers", "n_embd": "d_model", "n_head": "n_heads", "n_inner": "d_ff",
             "vocab_size": "vocab_size", "n_positions": "max_seq_len", "tie_word_embeddings": "tie_embeddings",
             "layer_norm_epsilon": "layer_norm_eps"}


def gpt2_fields(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise refuse(origin, flag, True, "use a plain GPT-2 checkpoint")
    if hf.get("scale_attn_weights") is False:
        raise refuse(origin, "scale_attn_weights", False, "kvbench scales by 1/sqrt(head_dim)")
    activation = mapped(GPT2_ACTIVATIONS, "activation_function", hf.get("activation_function", "gelu_new"), origin)
    missing = [key for key in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions") if key not in hf]
    if missing:
        raise KVBenchError(f"{origin}: missing GPT-2 key '{missing[0]}'; is this a GPT-2 config.json?")
    fields = {"positional": "learned", "norm": "pre", "activation": activation, "bias": True}
    if hf.get("n_inner") is None:  # absent or null: GPT-2's default, 4 x n_embd
        fields["d_ff"] = 4 * hf["n_embd"] if type(hf["n_embd"]) is int else hf["n_embd"]  # bad n_embd: itself
    return fields


# GPT-2 sublayer names -> kvbench's, per block. GPT-2's Conv1D stores weights (in, out) as kvbench does.
GPT2_BLOCK_NAMES = {
    "ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
}
GPT2_BLOCK_KEY = re.compile(r"^h\.(\d+)\.(.+)\.(weight|bias)$")
GPT2_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints


def from_gpt2(tensors: Tensors, config: ModelConfig) -> Tensors:
    """Rename a transformers GPT-2 state dict to kvbench's names and layouts."""
    out: Tensors = {}
    for name, tensor in tensors.items():
        name = name.removeprefix("transformer.")
        if GPT2_IGNORED.match(name):
            continue
        block = GPT2_BLOCK_KEY.match(name)
        if block and block.group(2) in GPT2_BLOCK_NAMES:
            layer, sub, kind = block.groups()
            out[f"blocks.{layer}.{GPT2_BLOCK_NAMES[sub]}.{kind}"] = tensor
        elif name == "wte.weight":
            # GPT-2's wte is (vocab, d_model); kvbench's LM head is its transpose, stored contiguous.
            out["lm_head.weight" if config.tie_embeddings else "tok_emb"] = (
                tensor.t().contiguous() if config.tie_embeddings else tensor)
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                out["lm_head.weight"] = tensor.t().contiguous()  # (vocab, d_model) -> (d_model, vocab)
        elif name == "wpe.weight":
            out["pos_emb"] = tensor
        else:
            out[name] = tensor  # ln_f.* keep their names; anything else is reported as unexpected
    return out


GPT2 = Layout("gpt2", ("gpt2",), GPT2_KEYS, gpt2_fields, from_gpt2,
              re.compile(r"^(transformer\.)?(wte\.weight|h\.\d+\.)"))


# --- Llama, Qwen2, Mistral --------------------------------------------------------------------------------------

LLAMA_KEYS = {"num_hidden_layers": "n_layers", "hidden_size": "d_model", "num_attention_heads": "n_heads",
              "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "intermediate_size": "d_ff",
              "vocab_size": "vocab_size", "max_position_embeddings": "max_seq_len", "rms_norm_eps": "layer_norm_eps"}
LLAMA_ACTIVATIONS = {"silu": "silu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu",
                     "relu": "relu"}
LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")


def rope_fields(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """RoPE's base and scaling, from either spelling: transformers 5's `rope_parameters`, or 4's `rope_theta`
    + `rope_scaling`. Only plain RoPE and Llama 3's scaling are implemented; another type is refused."""
    if hf.get("rope_parameters") is not None:
        key, params = "rope_parameters", hf["rope_parameters"]
    else:
        key, params = "rope_scaling", hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise refuse(origin, key, params, "one RoPE for every layer is implemented, given as a mapping")
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse(origin, "partial_rotary_factor", params.get("partial_rotary_factor",
                     hf.get("partial_rotary_factor")), "RoPE rotates every feature of a head here")
    fields = {"positional": "rope", "rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}
    if kind == "default":
        return fields
    if kind != "llama3":
        raise refuse(origin, f"{key}.rope_type", kind, "kvbench implements the default RoPE and 'llama3' scaling")
    return {**fields, "rope_scaling": {k: params[k] for k in LLAMA3_SCALING_KEYS if k in params}}


def llama_family_fields(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """What Llama-architecture config.json files share: RoPE, RMSNorm, SwiGLU, no biases (Qwen2 adds Q/K/V)."""
    for key in SOFTCAPS:
        if hf.get(key) is not None:
            raise refuse(origin, key, hf[key], "logit soft-capping is not implemented")
    return {**rope_fields(hf, origin), "norm": "pre", "norm_type": "rmsnorm", "mlp": "gated", "bias": False,
            "activation": mapped(LLAMA_ACTIVATIONS, "hidden_act", hf.get("hidden_act", "silu"), origin),
            # transformers' default for these architectures is untied
            "tie_embeddings": hf.get("tie_word_embeddings", False)}


def llama_fields(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    for key in ("mlp_bias", "attention_bias"):  # Llama's attention_bias also biases the output projection
        if hf.get(key):
            raise refuse(origin, key, True, "biases on Llama's MLP or output projection are not implemented")
    return llama_family_fields(hf, origin)


def qwen2_fields(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """Qwen2: Llama's layout with biases on Q, K and V. Its sliding window applies to some layers only."""
    if hf.get("use_sliding_window"):
        raise refuse(origin, "use_sliding_window", True, "a sliding window on only some layers is not implemented")
    layer_types = hf.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise refuse(origin, "layer_types", layer_types, "every layer must be full_attention")
    return {**llama_family_fields(hf, origin), "attention_bias": True}  # Q, K, V biased; output projection not


def mistral_fields(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """Mistral: Llama's layout; attention of every layer limited to the last `sliding_window` positions.

    Within sliding_window tokens that window hides nothing, so kvbench's full-attention model is exact up to
    there and max_seq_len is capped at it; the `sliding` strategy attends exactly as Mistral does and, with
    RoPE, runs past it (its window defaults to the model's)."""
    fields = llama_family_fields(hf, origin)
    window = hf.get("sliding_window")
    if window is None:
        return fields
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise refuse(origin, "sliding_window", window, "give a positive integer or null")
    limit = hf.get("max_position_embeddings")
    capped = min(limit, window) if isinstance(limit, int) and not isinstance(limit, bool) else limit
    return {**fields, "sliding_window": window, "max_seq_len": capped}


LLAMA_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
LLAMA_RENAMED = {"input_layernorm.weight": "ln1.weight", "post_attention_layernorm.weight": "ln2.weight"}
LLAMA_TRANSPOSED = {"self_attn.o_proj.weight": "attn.proj.weight", "mlp.down_proj.weight": "mlp.proj.weight"}
LLAMA_FUSED = {  # kvbench's fused matrix <- the checkpoint's separate ones, concatenated along the output
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.fc": ("mlp.gate_proj", "mlp.up_proj"),  # gate first: GatedMLP splits gate | up
}


def llama_block(layer: int, parts: Tensors) -> Tensors:
    """One decoder layer's tensors under kvbench's names: nn.Linear's (out, in) weights transposed to (in, out),
    Q/K/V and gate/up fused. Names it does not know keep the checkpoint's, to be reported as unexpected."""
    out, prefix = {}, f"blocks.{layer}."
    for ours, theirs in LLAMA_FUSED.items():
        for kind in ("weight", "bias"):
            names = [f"{name}.{kind}" for name in theirs]
            if all(name in parts for name in names):
                fused = torch.cat([parts.pop(name) for name in names], dim=0)  # (sum of outs, in) or (sum,)
                out[f"{prefix}{ours}.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
    for theirs, ours in LLAMA_RENAMED.items():
        if theirs in parts:
            out[prefix + ours] = parts.pop(theirs)
    for theirs, ours in LLAMA_TRANSPOSED.items():
        if theirs in parts:
            out[prefix + ours] = parts.pop(theirs).t().contiguous()  # (out, in) -> (in, out)
    out.update({f"model.layers.{layer}.{name}": tensor for name, tensor in parts.items()})
    return out


def from_llama(tensors: Tensors, config: ModelConfig) -> Tensors:
    """Rename a transformers Llama / Qwen2 / Mistral state dict to kvbench's names and layouts."""
    out: Tensors = {}
    layers: dict[int, Tensors] = defaultdict(dict)
    for name, tensor in tensors.items():
        block = LLAMA_BLOCK_KEY.match(name)
        if block:
            layers[int(block.group(1))][block.group(2)] = tensor
        elif name == "model.embed_tokens.weight":  # (vocab, d_model)
            out["lm_head.weight" if config.tie_embeddings else "tok_emb"] = (
                tensor.t().contiguous() if config.tie_embeddings else tensor)
        elif name == "lm_head.weight":
            if not config.tie_embeddings:  # tied: the same matrix as the embedding
                out["lm_head.weight"] = tensor.t().contiguous()  # (vocab, d_model) -> (d_model, vocab)
        elif name == "model.norm.weight":
            out["ln_f.weight"] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved RoPE's frequencies: recomputed
            out[name] = tensor
    for layer, parts in layers.items():
        out.update(llama_block(layer, dict(parts)))
    return out


LLAMA_SIGNATURE = re.compile(r"^model\.(embed_tokens\.weight|layers\.\d+\.self_attn\.)")
LLAMA = Layout("llama", ("llama",), LLAMA_KEYS, llama_fields, from_llama, LLAMA_SIGNATURE)
QWEN2 = Layout("qwen2", ("qwen2",), LLAMA_KEYS, qwen2_fields, from_llama, LLAMA_SIGNATURE)
MISTRAL = Layout("mistral", ("mistral",), LLAMA_KEYS, mistral_fields, from_llama, LLAMA_SIGNATURE)

LAYOUTS = {layout.name: layout for layout in (GPT2, LLAMA, QWEN2, MISTRAL)}
BY_MODEL_TYPE = {model_type: layout for layout in LAYOUTS.values() for model_type in layout.model_types}


def layout_of_tensors(tensors: Tensors) -> Layout | None:
    """The checkpoint layout a weight file's tensor names belong to; None for kvbench's own names."""
    return next((layout for layout in LAYOUTS.values() if layout.recognises(tensors)), None)


def to_kvbench(tensors: Tensors, config: ModelConfig, layout_name: str | None) -> Tensors:
    """A weight file's tensors under kvbench's names: by the directory's layout, or recognised by name."""
    layout = LAYOUTS[layout_name] if layout_name else layout_of_tensors(tensors)
    return tensors if layout is None else layout.rename(tensors, config)


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KVBenchError(f"{path}: not valid JSON") from None
    if not isinstance(hf, dict):
        raise KVBenchError(f"{path}: expected a JSON object of config keys")
    return hf


def layout_for(hf: dict[str, Any], origin: str) -> Layout:
    model_type = hf.get("model_type", "gpt2")  # very old GPT-2 configs carry none
    if model_type not in BY_MODEL_TYPE:
        raise KVBenchError(f"{origin}: model_type {model_type!r} is not supported; kvbench reads "
                           f"{', '.join(BY_MODEL_TYPE)} checkpoints")
    for architecture in hf.get("architectures") or []:
        if not str(architecture).endswith("ForCausalLM") and not str(architecture).endswith("LMHeadModel"):
            raise refuse(origin, "architectures", hf["architectures"], "kvbench reads causal language models")
    return BY_MODEL_TYPE[model_type]


def load_checkpoint_dir(path: Path) -> LoadedConfig:
    """A directory written by transformers' save_pretrained: config.json and model.safetensors."""
    config_file, weights = path / "config.json", path / "model.safetensors"
    if not config_file.is_file():
        raise KVBenchError(f"{path}: a checkpoint directory needs config.json (as transformers' save_pretrained writes)")
    if not weights.is_file():
        raise KVBenchError(f"{path}: model.safetensors not found; save the model with safe_serialization (the default)")
    hf = read_config_json(config_file)
    layout = layout_for(hf, str(config_file))
    source_keys = {ours: theirs for theirs, ours in layout.config_keys.items()}
    model = validate_config(layout.fields(hf, str(config_file)), str(config_file), source_keys)
    return LoadedConfig(name=path.name, source=path, model=model, weights_path=weights, layout=layout.name)
