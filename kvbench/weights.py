"""Weights: safetensors I/O (never pickle), GPT-2 name mapping, and building a ready model from a config."""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvbench.config import AnyConfig, LoadedConfig
from kvbench import checkpoints, memory
from kvbench.checkpoints import to_kvbench
from kvbench.families import family_of
from kvbench.kernels import decode_kernel, for_decoding
from kvbench.errors import KVBenchError, KVBenchWarning
from kvbench.model import Decoder, Linear, init_weights
from kvbench.seq2seq import Seq2Seq

def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise KVBenchError(f"weights file '{path}' not found")
    try:
        return load_file(path)  # safetensors: plain tensors, no code can run while loading
    except (SafetensorError, OSError, ValueError) as exc:
        raise KVBenchError(f"weights file '{path}' is not a valid safetensors file ({exc}); re-create it") from None


def to_gpt2(model: Decoder) -> dict[str, torch.Tensor]:
    """kvbench's weights under transformers' GPT2LMHeadModel names (the inverse of from_gpt2)."""
    config = model.config
    if (config.positional, config.norm, config.activation, config.bias) != ("learned", "pre", "gelu", True):
        raise KVBenchError("only GPT-2-shaped configs (learned positions, pre-norm, gelu, bias) map to GPT-2")
    model = copy.deepcopy(model).use_kernel("matmul")  # (in, out), as GPT-2's Conv1D
    ours_to_gpt2 = {v: k for k, v in checkpoints.GPT2_BLOCK_NAMES.items()}
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, layer, rest = name.split(".", 2)
            sub, kind = rest.rsplit(".", 1)
            out[f"transformer.h.{layer}.{ours_to_gpt2[sub]}.{kind}"] = tensor
        elif name == "lm_head.weight":
            out["lm_head.weight"] = tensor.t().contiguous()  # (vocab, d_model)
            if config.tie_embeddings:
                out["transformer.wte.weight"] = out["lm_head.weight"]
        elif name == "tok_emb":
            out["transformer.wte.weight"] = tensor
        elif name == "pos_emb":
            out["transformer.wpe.weight"] = tensor
        else:
            out[f"transformer.{name}"] = tensor
    return out


def load_state(model: Decoder, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Copy tensors into the model, checking names and shapes first, so a mismatch names the tensor."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing:
        raise KVBenchError(f"{origin}: tensor '{missing[0]}' is missing ({len(missing)} missing); "
                           "do the weights belong to this config?")
    if unexpected:
        raise KVBenchError(f"{origin}: unexpected tensor '{unexpected[0]}'; do the weights belong to this config?")
    for name, target in expected.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise KVBenchError(f"{origin}: tensor '{name}' has shape {tuple(tensors[name].shape)} but the config "
                               f"needs {tuple(target.shape)}; fix the config or the weights")
        if not tensors[name].is_floating_point():
            raise KVBenchError(f"{origin}: tensor '{name}' has dtype {tensors[name].dtype}; weights must be floats")
    warn_non_finite(tensors, origin)
    model.load_state_dict({name: t.float() for name, t in tensors.items()})


def first_non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(name, count) of the first tensor holding NaN or inf values, or None when every value is finite."""
    for name, t in tensors.items():
        bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
        if bad:
            return name, bad
    return None


def warn_non_finite(tensors: dict[str, torch.Tensor], origin: str) -> None:
    # A warning, not an error: evaluate and kv-evaluate must be able to run on such weights and fail
    # (exit 1, saying naive is non-finite too), and that verdict is more useful than a refusal at load.
    found = first_non_finite(tensors)
    if found:
        warnings.warn(f"{origin}: tensor '{found[0]}' holds {found[1]} NaN/inf value(s); logits computed "
                      "from it will be NaN (were the weights trained with too high a learning rate?)",
                      KVBenchWarning, stacklevel=2)


def _construct(config: AnyConfig) -> Decoder | Seq2Seq:
    return family_of(config).build(config)


def shapes_only(config: AnyConfig) -> Decoder | Seq2Seq:
    """The config's model built on the meta device: every tensor's shape and dtype, no memory."""
    with torch.device("meta"):
        return _construct(config)


def model_bytes(config: AnyConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> int:
    """Bytes of the config's weights held in dtype on device, with oneDNN's packed copy of every Linear's
    weight where the decode kernel packs them (the plain weight stays: embeddings and saving read it)."""
    model = shapes_only(config)
    held = memory.element_count(model) * dtype.itemsize
    if decode_kernel(torch.device(device), dtype) == "onednn":
        held += sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear)) * dtype.itemsize
    return held


def require_model_fits(config: AnyConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Refuse a model whose weights cannot fit in the device's memory, naming the config key that makes it big."""
    model = shapes_only(config)
    name, shape = memory.largest_tensor(model)
    keys = [key for key, value in config.model_dump().items() if type(value) is int and value == max(shape)]
    memory.require(memory.element_count(model) * dtype.itemsize, device,
                   f"the model ({str(dtype).removeprefix('torch.')} weights; largest tensor '{name}' {shape}, "
                   f"from {' and '.join(keys)})", f"lower {' or '.join(keys) or 'the sizes'} in the config")


def new_model(config: AnyConfig) -> Decoder | Seq2Seq:
    """An uninitialised model of the config's family, refused before allocation when it cannot fit."""
    require_model_fits(config)
    return _construct(config)


def read_weights(loaded: LoadedConfig) -> dict[str, torch.Tensor]:
    """The config's weight file under kvbench's names, every tensor in the file's own dtype."""
    tensors = read_safetensors(loaded.weights_path)
    if loaded.model.family != "decoder":
        return tensors  # checkpoint layouts are decoder-only models'
    return to_kvbench(tensors, loaded.model, loaded.layout)


def load_cpu_model(loaded: LoadedConfig, tensors: dict[str, torch.Tensor] | None = None) -> Decoder | Seq2Seq:
    """The config's model in float32 on CPU: weights from its file (or `tensors` already read from it), or
    seeded random ones."""
    model = new_model(loaded.model)
    if loaded.weights_path is None:
        init_weights(model, loaded.model.seed)
    else:
        load_state(model, read_weights(loaded) if tensors is None else tensors, str(loaded.weights_path))
    return model.eval().requires_grad_(False)


def build_model(loaded: LoadedConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> Decoder | Seq2Seq:
    """A ready-to-run model in eval mode on device, in dtype, its weights laid out for fast decoding."""
    family = family_of(loaded.model)
    if family.load is not None:  # a family that loads its own weights (transformers' models)
        return family.load(loaded, device, dtype)
    return for_decoding(load_cpu_model(loaded).to(device=device, dtype=dtype), torch.device(device), dtype)


def save_weights(model: Decoder | Seq2Seq, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Float32 tensors in (in, out) layout under the model's names, written atomically."""
    canonical = copy.deepcopy(model).use_kernel("matmul").float()
    tensors = {name: t.detach().contiguous().cpu() for name, t in canonical.state_dict().items()}
    found = first_non_finite(tensors)
    if found:  # the last line of defence: a file of NaN weights looks valid and passes every shape check
        raise KVBenchError(f"refusing to write {path}: tensor '{found[0]}' holds {found[1]} NaN/inf value(s)")
    save_tensors(tensors, path, metadata)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written atomically, readable as any new file is (safetensors alone makes it 0600)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(path)  # a reader never sees half a file


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
