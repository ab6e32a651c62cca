"""The transformers engine (`--engine transformers`): a checkpoint directory of any causal LM that transformers
loads offline, run by transformers' own modeling code, with transformers' own Cache classes as strategies.

It plugs in where a model family does (families.py): `load` reads the directory into a LoadedConfig whose
config is a TransformersConfig (family "transformers"), `build` gives a TransformersModel, which answers the
calls kvbench's generation, verification and benchmark make of any model (forward with a cache and a start
position, the logits of a whole sequence, wrap_cache, the bytes a step reads). So kv-evaluate checks
transformers' caches against transformers' uncached forward, and benchmark times them, through the same code
(and result objects, and CSV files) as kvbench's own caches; nothing there knows which engine runs.

A cache here is an EngineCache: one transformers Cache object (DynamicCache, StaticCache, ...), which
transformers' model updates itself inside its forward; kvbench's per-layer interface (update, mask) is not
used. The strategies (hf_caches.register_all) build them from the model's own config, as generate() would.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kvbench.cache import KVCache, kv_bytes_formula
from kvbench.config import LoadedConfig, TransformersConfig, shipped_config
from kvbench.errors import KVBenchError
from kvbench.strategies import CacheShape

INSTALL = "pip install 'kvbench[hf]'"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # what save_pretrained writes (transformers.utils' names)


def require_transformers() -> None:
    if importlib.util.find_spec("transformers") is None:
        raise KVBenchError(f"--engine transformers needs the transformers package; install it: {INSTALL}")


# --- loading ----------------------------------------------------------------------------------------------------

def load(text: Path | str) -> LoadedConfig:
    """A checkpoint directory as transformers reads it, offline, from the directory alone; every way it can
    fail is one line naming the directory and what transformers said."""
    require_transformers()
    path = Path(text)
    if not path.is_dir():
        what = "not found" if not path.exists() else "is a file"
        if shipped_config(str(text)) is not None:  # `--config tiny`: a kvbench config, which transformers cannot run
            what = "is one of kvbench's own configs, which only kvbench's engine runs"
        raise KVBenchError(f"--engine transformers: {path} {what}; give a checkpoint directory (config.json and "
                           "weights, as save_pretrained writes them)")
    if not (path / "config.json").is_file():
        raise KVBenchError(f"{path}: no config.json; give a directory written by save_pretrained")
    hf_config = _read_config(path)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise KVBenchError(f"{path}: no weights ({', '.join(WEIGHT_FILES)}); save the model with save_pretrained")
    config = transformers_config(hf_config)
    return LoadedConfig(name=path.name, source=path, model=config)


def _read_config(path: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KVBenchError(f"{path}: transformers cannot load its config.json ({first_line(exc)})") from None
    if type(hf_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise KVBenchError(f"{path}/config.json: model_type {hf_config.model_type!r} is not a causal language model "
                           "transformers can load (AutoModelForCausalLM)")
    return hf_config


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def transformers_config(hf_config) -> TransformersConfig:
    """The sizes kvbench needs, read the way transformers reads them (its attribute maps: GPT-2's n_layer is
    num_hidden_layers), and the window of the model's sliding layers as transformers' caches see it."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = hf_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    _, per_layer = get_layer_types_and_kwargs(text)
    windows = [kwargs["sliding_window"] for kwargs in per_layer if kwargs.get("sliding_window")]
    config = TransformersConfig(
        model_type=hf_config.model_type, n_layers=text.num_hidden_layers, n_heads=heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, d_model=text.hidden_size,
        vocab_size=text.vocab_size, max_seq_len=getattr(text, "max_position_embeddings", None) or 2**31 - 1,
        sliding_window=min(windows) if windows else None)
    config._hf_config = hf_config
    return config


def skeleton(config: TransformersConfig) -> nn.Module:
    """transformers' model of the config without weights (built on the meta device by weights.shapes_only):
    its tensors' shapes, for the memory check before anything is loaded."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config.hf_config)


def build(loaded: LoadedConfig, device: torch.device | str, dtype: torch.dtype) -> TransformersModel:
    """transformers' model from the directory, its weights in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # its bars would interleave with kvbench's own progress
    try:
        model = AutoModelForCausalLM.from_pretrained(loaded.source, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise KVBenchError(f"{loaded.source}: transformers cannot load the model ({first_line(exc)})") from None
    finally:
        logging.enable_progress_bar()
    return TransformersModel(model.to(device).eval().requires_grad_(False), loaded.model)


# --- the model ----------------------------------------------------------------------------------------------------

class TransformersModel:
    """transformers' causal LM behind the calls kvbench makes of a model.

    forward(ids, cache, start_pos, last_only, pads) is one call of transformers' forward: with an EngineCache,
    transformers' model updates that cache itself; without one, it recomputes the whole sequence, uncached:
    the naive reference. A ragged batch's left padding becomes transformers' attention_mask and position ids
    counted from each row's first token, as generate() does."""

    source_len = 0  # no source attended (not an encoder-decoder)

    def __init__(self, model: nn.Module, config: TransformersConfig):
        self.model, self.config = model, config
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def for_generation(self, batch: int, src_len: int, seed: int) -> TransformersModel:
        return self

    def with_rows(self, batch: int, seed: int) -> TransformersModel:
        return self

    def wrap_cache(self, cache: KVCache | None, keep_cross: bool = True) -> KVCache | None:
        return cache

    def __call__(self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0, last_only: bool = False,
                 visibility=None, pads: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) of ids (B, T) at columns start_pos.., or (B, 1, V) of the last when last_only."""
        if visibility is not None:  # transformers' model windows attention itself, where its config says so
            raise ValueError("transformers' model takes no attention rule of kvbench's; it attends as its config says")
        if cache is not None and not isinstance(cache, EngineCache):
            return self._recorded(ids, cache, start_pos, pads)
        if cache is not None and start_pos != cache.length:  # transformers' caches append where they are
            raise ValueError(f"the transformers cache holds {cache.length} tokens; cannot write at {start_pos}")
        kwargs = {self.cache_kwarg: cache.hf if cache is not None else None}
        output = self.model(input_ids=ids, use_cache=cache is not None, logits_to_keep=1 if last_only else 0,
                            **self._positions(ids, start_pos, pads), **kwargs)
        if cache is not None:
            cache.length = start_pos + ids.shape[1]
        return output.logits

    def _positions(self, ids: torch.Tensor, start_pos: int, pads: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Position ids (B, T), and with left padding the attention mask (B, start_pos + T) hiding it."""
        columns = torch.arange(start_pos, start_pos + ids.shape[1], device=ids.device)[None]  # (1, T)
        if pads is None:
            return {"position_ids": columns}
        seen = torch.arange(start_pos + ids.shape[1], device=ids.device)[None]  # (1, S)
        return {"position_ids": (columns - pads[:, None]).clamp(min=0),
                "attention_mask": (seen >= pads[:, None]).long()}

    def _recorded(self, ids: torch.Tensor, recorder: KVCache, start_pos: int, pads) -> torch.Tensor:
        """A kvbench cache given to a fresh forward from position 0 (verify's K/V reference): transformers'
        model runs with its own DynamicCache, and each layer's K/V is then handed to `recorder.update`."""
        from transformers import DynamicCache

        if start_pos != 0:
            raise ValueError("only a fresh forward from position 0 can hand its K/V to a kvbench cache")
        engine = EngineCache(None, DynamicCache)
        logits = self(ids, engine, 0, pads=pads)
        for layer, held in enumerate(engine.hf.layers):
            recorder.update(layer, 0, held.keys, held.values)
        return logits

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0, visibility=None,
               pads: torch.Tensor | None = None) -> torch.Tensor:
        """What verify reads every position's output from (B, T, V): the logits themselves, as transformers'
        head may do more than a matrix product (soft-capping, scaling); lm_head is then the identity."""
        return self(ids, cache, start_pos, visibility=visibility, pads=pads)

    def lm_head(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def step_weight_bytes(self, batch: int) -> int:
        """Bytes of parameters one decode step reads: every weight, but of an untied embedding table only the
        looked-up rows."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())  # tied tensors once
        table = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() == table.data_ptr():
            return total
        return total - table.numel() * table.element_size() + batch * table.shape[1] * table.element_size()

    def step_matrices(self) -> int:
        """Elements of the weight matrices every new token is multiplied through (the LM head apart)."""
        head = self.model.get_output_embeddings()
        return sum(m.weight.numel() for m in self.model.modules()
                   if isinstance(m, nn.Linear) and m is not head)


# --- the caches ---------------------------------------------------------------------------------------------------

class EngineCache(KVCache):
    """One transformers Cache object, which transformers' model updates inside its forward. kvbench tracks its
    length (where the next forward writes), resets, crops and reads it back; it never writes it."""

    def __init__(self, shape: CacheShape | None, make: Callable[[], Any]):
        self.shape, self.make = shape, make
        # built now, except for the memory estimate on the meta device, which only asks for sizes
        self._hf = None if shape is not None and shape.device.type == "meta" else make()
        self.length = 0

    @property
    def hf(self):
        if self._hf is None:
            self._hf = self.make()
        return self._hf

    def update(self, layer, start_pos, k, v):
        raise TypeError("a transformers cache is written by transformers' model, not through kvbench's update()")

    def mask(self, start_pos, n_new):
        raise TypeError("a transformers cache is masked by transformers' model, not through kvbench's mask()")

    def reset(self):
        self.hf.reset()
        self.length = 0

    def crop(self, length):
        if length < self.length:
            if not getattr(self.hf, "is_croppable", True):  # transformers' own guard, which crop() leaves to callers
                raise RuntimeError(f"transformers' {type(self.hf).__name__} cannot roll back on this model "
                                   "(is_croppable is False: a sliding layer has evicted what a rollback needs)")
            self.hf.crop(length - self.length)  # transformers takes the number of tokens to drop, negated
        self.length = min(self.length, length)

    def contents(self, layer, length):
        """Every position's K/V, for the layers that hold every position in order (full-attention layers of
        the dynamic, static and offloaded caches); sliding and quantized layers are not read back."""
        held = self.hf.layers[layer]
        if getattr(held, "is_sliding", False) or not isinstance(getattr(held, "keys", None), torch.Tensor) \
                or type(held).__name__.endswith("QuantizedLayer"):
            raise NotImplementedError
        device = self.shape.device if self.shape is not None else held.keys.device
        keys, values = (t[:, :, :self.length].to(device) for t in (held.keys, held.values))  # offloaded: on CPU
        return torch.arange(keys.shape[2], device=keys.device), keys, values

    @property
    def attention_path(self) -> str:
        config = self.shape.transformers_config if self.shape is not None else None
        kind = getattr(config, "_attn_implementation", None) or "default"
        return f"transformers ({kind}), {type(self.hf).__name__}"

    @property
    def nbytes(self):
        """Every tensor the cache's layers hold (keys, values, a quantized layer's codes and scales)."""
        if self._hf is None:
            return 0
        return sum(t.nbytes for layer in self._hf.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor) and t.dim() > 0)  # not a layer's 0-d length counter

    def expected_bytes(self, tokens):
        """Full precision for `tokens` positions, a sliding layer holding at most its window."""
        s = self.shape
        layers = getattr(self._hf, "layers", None) or [None] * s.n_layers
        held = [min(tokens, getattr(layer, "sliding_window", tokens) or tokens) for layer in layers]
        return sum(kv_bytes_formula(1, s.n_heads, s.head_dim, n, s.batch, s.dtype.itemsize) for n in held)
