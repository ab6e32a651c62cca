"""ModelConfig: the validated description of a model, loaded from YAML or from a checkpoint directory."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from kvbench.errors import KVBenchError

# torch's generators take seeds up to 2**64 - 1; kvbench also draws with seed + 1, so it accepts 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1


def check_seed(name: str, seed: int) -> None:
    """Refuse a seed torch cannot take, naming the option or key it came from."""
    if not 0 <= seed <= MAX_SEED:
        raise KVBenchError(f"{name} must be an integer in 0..{MAX_SEED} (2**63 - 1) (got {seed})")


class RopeScaling(BaseModel):
    """Llama 3's frequency-dependent stretch of RoPE: long wavelengths slowed by `factor`, short ones kept,
    those between blended, so that a model trained on original_max_position_embeddings reaches further."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rope_type: Literal["llama3"] = "llama3"  # the only scaling kvbench implements; others are refused
    factor: float = Field(gt=0, allow_inf_nan=False)
    low_freq_factor: float = Field(gt=0, allow_inf_nan=False)
    high_freq_factor: float = Field(gt=0, allow_inf_nan=False)
    original_max_position_embeddings: int = Field(gt=0)

    @model_validator(mode="after")
    def _factors_ordered(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_scaling: high_freq_factor ({self.high_freq_factor}) must exceed "
                             f"low_freq_factor ({self.low_freq_factor})")
        return self


class ArchitectureConfig(BaseModel):
    """What every model family shares. Strict: unknown keys and wrong types are errors, never coerced.

    The defaults are GPT-2's layout; a Llama-family decoder sets positional: rope, norm_type: rmsnorm,
    mlp: gated, activation: silu, bias: false and usually n_kv_heads < n_heads.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    d_model: int = Field(gt=0)  # width of the residual stream
    n_heads: int = Field(gt=0)  # query heads
    n_kv_heads: int = Field(default=0, ge=0)  # key/value heads, shared by groups of query heads; 0 (absent) = n_heads
    head_dim: int = Field(default=0, ge=0)  # width of one head; 0 (absent) = d_model / n_heads
    d_ff: int = Field(gt=0)  # hidden width of the MLP (GPT-2: 4 * d_model)
    max_seq_len: int = Field(gt=0)  # longest sequence (prompt + generated) the positions cover
    positional: Literal["learned", "sinusoidal", "rope"] = "learned"  # learned table (GPT-2), fixed sin/cos, rotary
    rope_theta: float = Field(default=10000.0, gt=0, allow_inf_nan=False)  # RoPE's base wavelength
    rope_scaling: RopeScaling | None = None  # Llama 3's long-context frequency scaling
    norm: Literal["pre", "post"] = "pre"  # where the norms sit: before each sublayer (GPT-2) or after the residual add
    norm_type: Literal["layernorm", "rmsnorm"] = "layernorm"  # LayerNorm (GPT-2) or RMSNorm (Llama)
    mlp: Literal["standard", "gated"] = "standard"  # act(x W1) W2, or (act(x Wg) * x Wu) W2 (SwiGLU with silu)
    activation: Literal["gelu", "gelu_exact", "relu", "silu"] = "gelu"  # gelu = tanh approximation, as GPT-2 uses
    tie_embeddings: bool = True  # the LM head reuses the (target) token embedding matrix
    bias: bool = True  # biases in linear layers and LayerNorms
    attention_bias: bool | None = None  # biases of the Q/K/V projections (Qwen2: true, others none); null = `bias`
    layer_norm_eps: float = Field(default=1e-5, gt=0, allow_inf_nan=False)  # epsilon of every norm
    seed: int = Field(default=0, ge=0, le=MAX_SEED)  # seeds the random initialisation when no weights are given
    sliding_window: int | None = Field(default=None, gt=0)  # default window W of the `sliding` strategy
    weights: str | None = None  # .safetensors path; relative paths are relative to the YAML file

    @field_validator("layer_norm_eps", "rope_theta", mode="before")
    @classmethod
    def _yaml_float_spelling(cls, value: Any) -> Any:
        # YAML 1.1 reads `1e-5` (no dot) as a string; accept that spelling, and only that, for floats.
        # An integer (`rope_theta: 500000`) is a float too.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return float(value) if type(value) is int else value

    @model_validator(mode="before")
    @classmethod
    def _derived_heads(cls, data: Any) -> Any:
        """Fill n_kv_heads and head_dim from n_heads and d_model when absent, so that every reader sees ints."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        d_model, n_heads = data.get("d_model"), data.get("n_heads")
        if type(n_heads) is int and n_heads > 0 and data.get("n_kv_heads") is None:
            data["n_kv_heads"] = n_heads
        if type(d_model) is int and type(n_heads) is int and n_heads > 0 and data.get("head_dim") is None:
            if d_model % n_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}); choose n_heads "
                                 f"among {_divisors(d_model)}, or give head_dim")
            data["head_dim"] = d_model // n_heads
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ArchitectureConfig:
        if self.n_kv_heads == 0 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): each K/V head "
                             f"serves a whole group of query heads; choose among {_divisors(self.n_heads)}")
        if self.head_dim == 0:
            raise ValueError("head_dim must be a positive integer")
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model (got {self.d_model})")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"rope rotates pairs of features: head_dim must be even (got {self.head_dim})")
        if self.rope_scaling is not None and self.positional != "rope":
            raise ValueError(f"rope_scaling applies to positional: rope only (positional is {self.positional})")
        return self

    @property
    def groups(self) -> int:
        """Query heads per K/V head: 1 for multi-head attention, n_heads for multi-query."""
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_bias(self) -> bool:
        return self.bias if self.attention_bias is None else self.attention_bias

    @property
    def unbounded_positions(self) -> bool:
        """Positions computed for any index (sinusoidal, rotary), not read from a table of max_seq_len rows."""
        return self.positional != "learned"


class ModelConfig(ArchitectureConfig):
    """A decoder-only transformer (GPT-2's family): the default."""

    family: Literal["decoder"] = "decoder"
    n_layers: int = Field(gt=0)  # transformer blocks
    vocab_size: int = Field(gt=0)  # token ids are 0 .. vocab_size-1


class Seq2SeqConfig(ArchitectureConfig):
    """An encoder-decoder transformer ("Attention Is All You Need"): the decoder cross-attends to the encoder."""

    family: Literal["encoder-decoder"]
    n_encoder_layers: int = Field(gt=0)  # bidirectional self-attention blocks over the source
    n_decoder_layers: int = Field(gt=0)  # causal self-attention + cross-attention blocks
    src_vocab_size: int = Field(gt=0)  # source token ids are 0 .. src_vocab_size-1
    tgt_vocab_size: int = Field(gt=0)  # target token ids (and logits) are 0 .. tgt_vocab_size-1

    @model_validator(mode="after")
    def _classic_attention(self) -> Seq2SeqConfig:
        # cross-attention is written for full multi-head attention over absolute positions
        if self.positional == "rope":
            raise ValueError("positional: rope is not supported for the encoder-decoder; use learned or sinusoidal")
        if self.n_kv_heads != self.n_heads or self.head_dim * self.n_heads != self.d_model:
            raise ValueError("the encoder-decoder needs n_kv_heads = n_heads and head_dim = d_model / n_heads")
        return self

    @property
    def n_layers(self) -> int:
        return self.n_decoder_layers  # the layers that own a self-attention KV cache

    @property
    def vocab_size(self) -> int:
        return self.tgt_vocab_size  # what is generated


SCHEMAS = {"decoder": ModelConfig, "encoder-decoder": Seq2SeqConfig}  # family -> its config (families.py: the rest)
AnyConfig = Union[ModelConfig, Seq2SeqConfig]


class TransformersConfig(BaseModel):
    """A checkpoint directory run by transformers' own modeling code (`--engine transformers`, hf_engine.py):
    the sizes kvbench reads from its config for cache shapes, memory estimates and the floor. The model and
    its caches are transformers' own; `hf_config` (not dumped) is the config transformers loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Literal["transformers"] = "transformers"
    model_type: str  # transformers' name for the architecture: llama, mistral, gpt2, ...
    n_layers: int
    n_heads: int
    n_kv_heads: int  # K/V heads a cache stores (grouped-query attention: fewer than n_heads)
    head_dim: int
    d_model: int
    vocab_size: int
    max_seq_len: int  # max_position_embeddings
    sliding_window: int | None = None  # the window of the model's sliding-attention layers, if it has any
    _hf_config: Any = PrivateAttr(default=None)

    @property
    def hf_config(self) -> Any:
        return self._hf_config

    @property
    def unbounded_positions(self) -> bool:
        return False  # positions past max_position_embeddings are the model's business: never run there


class LoadedConfig(BaseModel):
    """A ModelConfig plus where it came from: a name for result files and the weight file, resolved."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: Path
    model: Union[ModelConfig, Seq2SeqConfig, TransformersConfig]
    weights_path: Path | None = None
    layout: str | None = None  # the checkpoint layout of a save_pretrained directory (kvbench.checkpoints)

    @property
    def engine(self) -> str:
        """Whose modeling code runs it: load_config's `engine`, which the config's family records."""
        return "transformers" if self.model.family == "transformers" else "kvbench"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


def _error_location(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"])


def error_to_report(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The one validation error to name: a misspelt key is both unknown and, if required, missing, and the
    unknown spelling is what to fix."""
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def _describe_error(error: dict[str, Any], schema: type[BaseModel], family: str,
                    source_keys: dict[str, str]) -> str:
    """One pydantic error as 'key: what is wrong (got value)', the key as the source file spells it."""
    key = _error_location(error)
    key = source_keys.get(key, key)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, schema.model_fields, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(schema.model_fields)}"
        return f"unknown key '{key}' for family {family}; {hint}"
    if error["type"] == "missing":
        return f"missing required key '{key}'"
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a rule across keys (e.g. d_model and n_heads): the message names them
        return message
    return f"{key}: {message} (got {error.get('input')!r})"


def validate_config(data: Any, origin: str, source_keys: dict[str, str] | None = None) -> AnyConfig:
    """Build the config of the mapping's family or raise KVBenchError naming the first bad key (as
    source_keys renames it: a GPT-2 config.json spells keys its own way)."""
    if not isinstance(data, dict):
        raise KVBenchError(f"{origin}: expected a mapping of config keys, got {type(data).__name__}")
    family = data.get("family", "decoder")
    if family not in SCHEMAS:
        raise KVBenchError(f"{origin}: family: must be one of {', '.join(SCHEMAS)} (got {family!r})")
    schema = SCHEMAS[family]
    try:
        return schema(**data)
    except ValidationError as exc:
        first = error_to_report(exc.errors())
        raise KVBenchError(f"{origin}: {_describe_error(first, schema, family, source_keys or {})}") from None
    except TypeError as exc:  # non-string keys, e.g. `1: 2`
        raise KVBenchError(f"{origin}: invalid key ({exc})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:  # non-string keys are refused later, by validate_config
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: int, again: int):
        super().__init__(f"key '{key}' is given twice (lines {first} and {again}); keep one")


def _read_yaml(path: Path, example: str = "the shipped configs, e.g. configs/tiny.yaml") -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KVBenchError(f"{path}: not a text file; give a YAML config") from None
    if not text.strip():
        raise KVBenchError(f"{path}: the file is empty; give a YAML mapping of keys (see {example})")
    try:
        # a SafeLoader: a config can never construct Python objects
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506
    except DuplicateKeyError as exc:
        raise KVBenchError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise KVBenchError(f"{path}: not valid YAML{where}; fix the syntax") from None


def load_yaml_config(path: Path) -> LoadedConfig:
    model = validate_config(_read_yaml(path), str(path))
    # Existence is checked when the weights are read, so that `init-weights` can create the file.
    weights = (path.parent / model.weights).resolve() if model.weights else None
    return LoadedConfig(name=path.stem, source=path, model=model, weights_path=weights)


def shipped_configs() -> Path:
    """The directory of the configs kvbench ships (package data, so present after any install).

    as_file gives a plain directory for a package installed on disk, which every pip install is; the YAMLs
    there name their weight files by relative path, so they must be read in place.
    """
    with resources.as_file(resources.files("kvbench") / "configs") as path:
        return Path(path)


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_configs().glob("*.yaml"))


def shipped_config(name: str) -> Path | None:
    """The shipped YAML a bare name (`default`, `tiny`, `tiny.yaml`) stands for, else None."""
    if Path(name).name != name or Path(name).suffix not in ("", ".yaml"):
        return None  # a path with a directory part, or another kind of file: never a shipped name
    path = shipped_configs() / f"{Path(name).stem}.yaml"
    return path if path.is_file() else None


def find_config(text: Path | str) -> Path:
    """A config argument as a path: a shipped config's bare name (`default`, `tiny`) names the shipped file
    wherever kvbench runs from (write ./tiny for a local file of that name), anything else is a path."""
    text = str(text)
    shipped = shipped_config(text) if not text.endswith(".yaml") or not Path(text).exists() else None
    if shipped is not None:
        return shipped
    path = Path(text)
    if not path.exists():
        raise KVBenchError(f"config '{text}' not found; give a YAML file, a checkpoint directory or a "
                           f"shipped config: {', '.join(shipped_names())}")
    return path


ENGINES = ("kvbench", "transformers")  # whose modeling code runs the model: kvbench's own, or transformers'


def load_config(path: Path | str, engine: str = "kvbench") -> LoadedConfig:
    """Load a YAML config file, a transformers checkpoint directory (GPT-2, Llama, Qwen2, Mistral), or a
    shipped config by name. With engine "transformers": a checkpoint directory of any causal LM that
    transformers loads offline, run by transformers' own code (hf_engine.py)."""
    from kvbench.checkpoints import load_checkpoint_dir  # it builds on this module

    if engine not in ENGINES:
        raise KVBenchError(f"--engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine == "transformers":
        from kvbench import hf_engine

        return hf_engine.load(path)
    path = find_config(path)
    return load_checkpoint_dir(path) if path.is_dir() else load_yaml_config(path)
