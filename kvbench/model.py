"""The torch decoder, read top-down: Linear -> Attention -> MLP -> Block -> Decoder.

Inference only (no dropout). One forward serves prefill (the whole prompt) and decode (one token) alike:
it takes token ids, an optional KV cache and the position of the first id.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from kvbench.cache import KVCache, Mask, attend, hide_padding, sliding_mask
from kvbench.config import ModelConfig

INIT_STD = 0.02  # GPT-2's initialiser range
Position = Union[int, torch.Tensor]  # an int, or a 0-d tensor in the compiled decode step (no recompiles)
# How an uncached forward attends (naive's baseline, which a strategy chooses: Strategy.baseline): None,
# causally; an int W, each query within the last W positions (the sliding strategy's band); or a rule
# (query positions (T,), key positions (S,)) -> bool (T, S) (a plugin's own visibility)
AttentionRule = Union[None, int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


KERNELS = ("matmul", "mv", "linear", "onednn")
IN_OUT = frozenset({"matmul", "onednn"})  # kernels that keep W as (in, out); the others as (out, in)
PACKED_ROWS = 16  # oneDNN packs W for this many rows of x; any count runs, this one (a batched step) fastest
SEVERAL_POSITIONS_PACKED_ROWS = 64  # a prompt or naive step of more rows runs x @ W: as fast from 128 rows
# (measured), and no primitive per row count (a long naive run would churn oneDNN's cache of 1024)


def onednn_pack(w_out_in: torch.Tensor, rows: int) -> torch.Tensor:
    """W (out, in) reordered once into oneDNN's blocked layout, tuned for products of `rows` rows of x."""
    return torch.ops.mkldnn._reorder_linear_weight(w_out_in, rows)


def onednn_matmul(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, in) @ W + bias by oneDNN on a weight from onednn_pack: (N, out)."""
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


class Linear(nn.Module):
    """y = x @ W + b, computed by one of four kernels, each with the weight layout it streams fastest.

    Why: decoding multiplies a single row by every weight, a matrix-vector product whose speed depends on
    the kernel and on how W lies in memory. Measured on CPU (docs/perf.md): float32 is fastest as
    x @ W with W (in, out) contiguous ("matmul", GPT-2's Conv1D layout and kvbench's file format);
    bfloat16 as torch.mv with W (out, in) ("mv"); "linear" is F.linear on W (out, in), as nn.Linear does;
    "onednn" is oneDNN's matmul on a copy of W packed once in its blocked layout (CPU): MKL's sgemm re-packs W
    on every call and, on an AMD EPYC, runs a batch of 16 rows at ~45 GFLOP/s against oneDNN's ~160. W
    itself stays (in, out): a compiled step, which cannot call the packed kernel, runs x @ W on it, and so do
    products of fewer than `packed_from_rows` rows, where x @ W measured faster (kvbench/kernels.py), and
    passes of several positions per sequence (a prompt, a naive step) past SEVERAL_POSITIONS_PACKED_ROWS rows.
    oneDNN builds a primitive for each new row count (1-3 ms per Linear, measured) and keeps 1024 of them; a
    decode step's rows (the batch) repeat every step, but a long naive run's grow by one each step and would
    evict and rebuild them all, a cost its baseline must not pay (docs/perf.md).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))  # (in, out) for "matmul" and "onednn"
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.kernel = "matmul"
        self._packed = None  # "onednn": W packed for oneDNN, built on first use (not a parameter: never saved)
        self.packed_from_rows = 1  # "onednn": x with fewer rows runs x @ W, where it measured faster (kernels.py)

    def use_kernel(self, kernel: str) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
        if (kernel in IN_OUT) != (self.kernel in IN_OUT):  # switching between (in, out) and (out, in)
            self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=False)
        self.kernel = kernel
        self._packed = None  # packed again on first use, from the weight as it is now
        self.packed_from_rows = 1  # a forced kernel runs at every row count; kernels.for_decoding measures

    def __getstate__(self):
        # copies (deepcopy, pickle) drop oneDNN's packed weight, an opaque tensor that cannot be copied; the
        # copy packs its own on first use
        return {**self.__dict__, "_packed": None}

    def _apply(self, fn, *args, **kwargs):
        self._packed = None  # .to(device or dtype) makes a new weight: the packed copy would be stale
        self.packed_from_rows = 1  # and the row count measured for the old dtype and device no longer holds
        return super()._apply(fn, *args, **kwargs)

    def packed(self) -> torch.Tensor:
        if getattr(self, "_packed", None) is None:
            self._packed = onednn_pack(self.weight.detach().t().contiguous(), PACKED_ROWS)  # from (out, in)
        return self._packed

    def rows_by_output(self) -> torch.Tensor:
        """W as (out, in): one row per output feature (for a tied embedding, one row per token)."""
        return self.weight.t() if self.kernel in IN_OUT else self.weight

    def runs_packed(self, x: torch.Tensor) -> bool:
        """Whether the onednn kernel runs x (..., positions, in) on the packed W: enough rows for packing to pay;
        a decode step's (one position per sequence) at any count, a longer pass's up to a few dozen rows; not
        inside torch.compile."""
        if torch.compiler.is_compiling():
            return False
        rows = x.numel() // x.shape[-1]
        one_position = x.dim() >= 3 and x.shape[-2] == 1  # 2-D x may be flattened positions: capped below
        return (one_position or rows <= SEVERAL_POSITIONS_PACKED_ROWS) and rows >= self.packed_from_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        if self.kernel == "onednn" and self.runs_packed(x):
            # (inductor cannot lower the packed kernel: a compiled step runs x @ W below)
            y = onednn_matmul(x2d, self.packed(), self.bias)  # (N, out)
        elif self.kernel in IN_OUT:
            y = x2d @ self.weight if self.bias is None else torch.addmm(self.bias, x2d, self.weight)  # (N, out)
        elif self.kernel == "mv" and x2d.shape[0] == 1:  # F.linear does not pick the vector kernel itself
            y = torch.mv(self.weight, x2d[0])[None]  # (1, out)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2d, self.weight, self.bias)  # (N, out)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


class RMSNorm(nn.Module):
    """x / rms(x) * gain, computed in float32 whatever the model's dtype (as Llama does): no centring, no bias."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


NORMS = {  # config `norm_type` -> a norm over d_model features; a new one is one entry here (and in the reference)
    "layernorm": lambda d, c: nn.LayerNorm(d, eps=c.layer_norm_eps, bias=c.bias),
    "rmsnorm": lambda d, c: RMSNorm(d, c.layer_norm_eps),
}


def layer_norm(d_model: int, config: ModelConfig) -> nn.Module:
    """The config's norm (LayerNorm or RMSNorm) over d_model features."""
    return NORMS[config.norm_type](d_model, config)


@dataclass
class Rotation:
    """RoPE's cos and sin (T, hd) for the positions of one forward pass: features i and i + hd/2 of each
    query and key form a pair rotated by angle position x frequency_i (the "rotate half" layout)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, T, hd) rotated by its positions' angles, in x's dtype."""
        first, second = x.chunk(2, dim=-1)  # each (B, H, T, hd/2)
        swapped = torch.cat([-second, first], dim=-1)  # (B, H, T, hd): the pair's partner, sign of a 90° turn
        return x * self.cos.to(x.dtype) + swapped * self.sin.to(x.dtype)


@dataclass
class Pass:
    """What every layer of one forward pass shares: the cache, where the pass starts, who sees whom, and
    (RoPE) the rotation of its positions."""

    cache: KVCache | None
    start_pos: Position
    mask: Mask  # visibility over the keys attention gets, with rows per query head group (see group_rows)
    rotation: Rotation | None = None


class Attention(nn.Module):
    """Causal self-attention with a fused QKV projection; grouped-query when n_kv_heads < n_heads.

    With grouped-query attention each K/V head serves `groups` consecutive query heads (as Llama's repeat_kv
    pairs them). Rather than copying K/V once per query head, the group's queries are laid out as extra rows
    of one query block per K/V head: (B, Hkv, groups x T, hd). Caches and attention kernels then see as
    many query heads as K/V heads and need not know about groups.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.groups = config.groups
        q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.widths = (q_width, kv_width, kv_width)
        self.qkv = Linear(config.d_model, sum(self.widths), config.qkv_bias)
        self.proj = Linear(q_width, config.d_model, config.bias)

    def heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)

    def forward(self, x: torch.Tensor, step: Pass) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.widths, dim=-1)  # (B, T, Hq*hd), (B, T, Hkv*hd), (B, T, Hkv*hd)
        q, k, v = self.heads(q, self.n_heads), self.heads(k, self.n_kv_heads), self.heads(v, self.n_kv_heads)
        if step.rotation is not None:  # keys are rotated before they are cached
            q, k = step.rotation.apply(q), step.rotation.apply(k)
        q = q.reshape(B, self.n_kv_heads, self.groups * T, self.head_dim)  # (B, Hkv, g*T, hd): a view unless g>1, T>1
        if step.cache is None:
            y = attend(q, k, v, step.mask)  # (B, Hkv, g*T, hd)
        else:
            y = step.cache.attend(self.layer_idx, step.start_pos, q, k, v, step.mask)  # stores k, v first
        y = y.reshape(B, self.n_heads, T, self.head_dim)  # (B, Hq, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, Hq*hd)
        return self.proj(y)


def group_rows(mask: Mask, groups: int, n_new: int, device: torch.device) -> Mask:
    """A mask over n_new query rows repeated for each query head of a K/V group: (groups x T, S) rows, in
    the order Attention lays the group's queries out. None stays None (every row sees every key)."""
    if groups == 1 or mask is None:
        return mask
    if isinstance(mask, str):  # "causal": square lower-triangular, spelled out (SDPA's flag cannot repeat)
        mask = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()  # (T, T)
    return mask.repeat(*[1] * (mask.dim() - 2), groups, 1)  # (g*T, S) or, per row, (B, 1, g*T, S)


ACTIVATIONS = {  # config `activation` -> the function; a new one is one entry here (and in the reference)
    "gelu": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's
    "gelu_exact": F.gelu,
    "relu": F.relu,
    "silu": F.silu,  # SwiGLU's, in a gated MLP
}


class MLP(nn.Module):
    """act(x W_fc) W_proj: GPT-2's feed-forward sublayer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = Linear(config.d_model, config.d_ff, config.bias)
        self.proj = Linear(config.d_ff, config.d_model, config.bias)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class GatedMLP(nn.Module):
    """(act(x W_gate) * x W_up) W_proj: Llama's SwiGLU with activation silu. Gate and up are one fused
    matrix (d_model, 2 d_ff), gate first, so decoding streams them in a single matrix-vector product."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = Linear(config.d_model, 2 * config.d_ff, config.bias)
        self.proj = Linear(config.d_ff, config.d_model, config.bias)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)  # each (B, T, d_ff)
        return self.proj(self.activation(gate) * up)


MLPS = {"standard": MLP, "gated": GatedMLP}  # config `mlp` -> the feed-forward sublayer


class Block(nn.Module):
    """Attention then MLP, each with a residual; the norm before (pre-norm) or after (post-norm) the sublayer."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln1 = layer_norm(config.d_model, config)
        self.attn = Attention(config, layer_idx)
        self.ln2 = layer_norm(config.d_model, config)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, x: torch.Tensor, step: Pass) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), step)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, step))
        return self.ln2(x + self.mlp(x))


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """'Attention Is All You Need' encodings: sin on even features, cos on odd, any position (no table)."""
    inv_freq = torch.exp(torch.arange(0, d_model, 2, device=positions.device) * (-math.log(10000.0) / d_model))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(positions), d_model)  # (T, D)


def pass_positions(start_pos: Position, n_new: int, device: torch.device,
                   pads: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of a pass's columns: (T,), or per row (B, T) in a ragged batch, whose row b starts at
    column pads[b] (its padding gets position 0: it is never attended, any valid position will do)."""
    columns = start_pos + torch.arange(n_new, device=device)  # (T,)
    return columns if pads is None else (columns[None, :] - pads[:, None]).clamp_min(0)  # (B, T)


class Positions(nn.Module):
    """How token positions enter the model: added to the embeddings (learned, sinusoidal) or as a rotation
    of each query and key (rotary). The model's learned table, if any, is passed in: it is the model's
    parameter (`pos_emb` in weight files), not this part's."""

    def __init__(self, config: ModelConfig):
        super().__init__()

    def add(self, x: torch.Tensor, start_pos: Position, table: torch.Tensor | None,
            pads: torch.Tensor | None = None) -> torch.Tensor:
        return x

    def rotation(self, start_pos: Position, n_new: int, device: torch.device,
                 pads: torch.Tensor | None = None) -> Rotation | None:
        return None


class LearnedPositions(Positions):
    def add(self, x, start_pos, table, pads=None):
        T = x.shape[1]
        if isinstance(start_pos, int) and pads is None:
            return x + table[start_pos:start_pos + T]  # a view: no gather on the eager path
        return x + table[pass_positions(start_pos, T, x.device, pads)]  # (T, D) or (B, T, D)


class SinusoidalPositions(Positions):
    def add(self, x, start_pos, table, pads=None):
        positions = pass_positions(start_pos, x.shape[1], x.device, pads)  # (T,) or (B, T)
        encoded = sinusoidal_positions(positions.reshape(-1), x.shape[-1])  # (T or B*T, D)
        return x + encoded.view(*positions.shape, x.shape[-1]).to(x.dtype)  # (T, D) or (B, T, D)


class RotaryPositions(Positions):
    """RoPE: frequency_i = theta^(-2i/hd), optionally stretched by Llama 3's scaling; angles computed in
    float32 (as transformers does, so that logits match it), cast to the model's dtype when applied."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.config = config
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)  # (hd/2,) float32

    def frequencies(self) -> torch.Tensor:
        c = self.config
        exponents = torch.arange(0, c.head_dim, 2, dtype=torch.int64).float() / c.head_dim  # (hd/2,)
        inv_freq = 1.0 / (c.rope_theta ** exponents)
        return inv_freq if c.rope_scaling is None else llama3_scaled(inv_freq, c.rope_scaling)

    def _apply(self, fn, recurse=True):
        # .to(dtype) would cast the buffer with the weights; the frequencies stay float32, only the device moves
        super()._apply(fn, recurse)
        self.inv_freq = self.frequencies().to(self.inv_freq.device)
        return self

    def rotation(self, start_pos, n_new, device, pads=None):
        positions = pass_positions(start_pos, n_new, device, pads)  # (T,) or (B, T)
        angles = positions.float()[..., None] * self.inv_freq  # (T, hd/2) or (B, T, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # pair i and i + hd/2 share an angle: (..., T, hd)
        if pads is not None:
            angles = angles[:, None]  # (B, 1, T, hd): the same for every head of a row
        return Rotation(angles.cos(), angles.sin())


def llama3_scaled(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Llama 3's RoPE scaling: wavelengths longer than original / low_freq_factor are stretched by `factor`,
    those shorter than original / high_freq_factor kept, and those between interpolated smoothly."""
    wavelength = 2 * math.pi / inv_freq
    original = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    blend = (original / wavelength - low) / (high - low)  # 0 at the long end of the band, 1 at the short end
    blended = (1 - blend) * inv_freq / scaling.factor + blend * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(in_band, blended, scaled)


POSITIONS = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions, "rope": RotaryPositions}


def positions_for(config: ModelConfig) -> Positions:
    return POSITIONS[config.positional](config)


def random_ids(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """Seeded random token ids (B, L): the same ids for the same seed, whatever the device."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class LanguageModel(nn.Module):
    """What every model kvbench generates with has: an LM head, whose weight says where the model lives.

    A model that needs more than token ids to generate (an encoder-decoder needs a source) overrides the
    three methods below; generation code calls them instead of asking what kind of model it has."""

    lm_head: Linear

    def for_generation(self, batch: int, src_len: int, seed: int) -> LanguageModel:
        """The model generation runs: a decoder as it is (an encoder-decoder binds a seeded source)."""
        return self

    def with_rows(self, batch: int, seed: int) -> LanguageModel:
        """The same model for `batch` rows of new inputs (an encoder-decoder: a new seeded source)."""
        return self

    def wrap_cache(self, cache: KVCache | None, keep_cross: bool = True) -> KVCache | None:
        """A strategy's self-attention cache as this model uses it (an encoder-decoder adds its source's K/V)."""
        return cache

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype


class Decoder(LanguageModel):
    """Token embedding + positions, n_layers blocks, final norm (pre-norm only), LM head.

    The LM head is stored (d_model, vocab) so that decoding streams it row-major (see Linear). With tied
    embeddings the token embedding *is* that matrix, read column-wise: a lookup touches one column per token.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.tok_emb = None if config.tie_embeddings else nn.Parameter(torch.empty(config.vocab_size, d))
        self.pos_emb = nn.Parameter(torch.empty(config.max_seq_len, d)) if config.positional == "learned" else None
        self.positions = positions_for(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # Post-norm blocks already end in a LayerNorm, so only pre-norm needs a final one (as GPT-2 has).
        self.ln_f = layer_norm(d, config) if config.norm == "pre" else nn.Identity()
        self.lm_head = Linear(d, config.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor, start_pos: Position, pads: torch.Tensor | None = None) -> torch.Tensor:
        table = self.lm_head.rows_by_output() if self.tok_emb is None else self.tok_emb  # (V, D), maybe a view
        return self.positions.add(F.embedding(ids, table), start_pos, self.pos_emb, pads)  # (B, T, D)

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: Position = 0,
               visibility: AttentionRule = None, pads: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D) for ids (B, T) at columns start_pos.., after the final norm.

        Without a cache the sequence attends to itself as `visibility` says (causally by default).
        `pads` (B,): a ragged batch, left-padded: row b's tokens start at column pads[b] (its position 0).
        """
        check_positions(self.config, start_pos, ids.shape[1])
        x = self.embed(ids, start_pos, pads)
        step = begin_pass(self.config, self.positions, cache, start_pos, ids.shape[1], visibility, ids.device, pads)
        for block in self.blocks:
            x = block(x, step)
        end_pass(cache)
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: Position = 0,
                last_only: bool = False, visibility: AttentionRule = None, pads: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only when last_only."""
        h = self.hidden(ids, cache, start_pos, visibility, pads)
        if last_only:
            h = h[:, -1:]  # (B, 1, D): the LM head is the costliest matmul; skip it where nobody reads it
        return self.lm_head(h)

    def use_kernel(self, kernel: str) -> Decoder:
        return use_kernel(self, kernel)

    source_len = 0  # positions of a source attended at every step (an encoder-decoder's); none here

    def step_weight_bytes(self, batch: int) -> int:
        """Bytes of parameters one cached decode step reads: every block, the final norm and the LM head in
        full, one token row per sequence (an untied table; a tied one is the LM head) and one position row."""
        tables = (batch * row_bytes(self.tok_emb) if self.tok_emb is not None else 0) + row_bytes(self.pos_emb)
        return parameter_bytes(self.blocks, self.ln_f, self.lm_head) + tables

    def step_matrices(self) -> int:
        """Elements of the weight matrices every new token is multiplied through (the LM head apart)."""
        return matrix_elements(self.blocks)


def parameter_bytes(*modules: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def row_bytes(table: torch.Tensor | None) -> int:
    """One row of an embedding table (what a lookup reads); 0 without a table."""
    return 0 if table is None else table.shape[1] * table.element_size()


def matrix_elements(*modules: nn.Module) -> int:
    return sum(m.weight.numel() for module in modules for m in module.modules() if isinstance(m, Linear))


def use_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Compute every Linear with `kernel`, re-laying weights to suit it (see Linear); logits are unchanged."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.use_kernel(kernel)
    return model


def kernel_choices(model: nn.Module) -> set[tuple[str, int]]:
    """(kernel, packed_from_rows) of the model's Linears: one pair when they all decode alike; none for a model
    of its own code (transformers' under --engine transformers)."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return {(m.kernel, m.packed_from_rows) for m in modules if isinstance(m, Linear)}


def pack_from_rows(model: nn.Module, rows: int) -> nn.Module:
    """Under the onednn kernel, run products of fewer than `rows` rows of x as x @ W (kernels.py measures
    where that is faster); the packed copy of W is kept."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.packed_from_rows = rows
    return model


def begin_pass(config, positions: Positions, cache: KVCache | None, start_pos: Position, n_new: int,
               visibility: AttentionRule, device: torch.device, pads: torch.Tensor | None = None) -> Pass:
    """Tell the cache a forward pass starts; what every layer of the pass uses: the visibility (with a row
    per query head of each K/V group; per sequence in a ragged batch) and the rotation of its positions."""
    if cache is not None:
        cache.begin(start_pos, n_new, pads)
    mask = self_attention_mask(cache, start_pos, n_new, visibility, device, pads)
    mask = group_rows(mask, config.groups, n_new, device)
    return Pass(cache, start_pos, mask, positions.rotation(start_pos, n_new, device, pads))


def end_pass(cache: KVCache | None) -> None:
    if cache is not None:
        cache.end()


def self_attention_mask(cache: KVCache | None, start_pos: Position, n_new: int, visibility: AttentionRule,
                        device: torch.device, pads: torch.Tensor | None = None) -> Mask:
    """With a cache, the cache decides; without one the sequence attends to itself by `visibility` (see
    AttentionRule); a ragged batch's left padding hidden."""
    if cache is not None:
        return cache.mask(start_pos, n_new)
    positions = torch.arange(n_new, device=device)  # (T,) columns
    if callable(visibility):
        return hide_padding(visibility(positions, positions), positions, positions, pads)
    band = visibility
    mask = "causal" if band is None or band >= n_new else sliding_mask(positions, positions, band)
    return hide_padding(mask, positions, positions, pads)


def check_positions(config, start_pos: Position, n_new: int) -> None:
    if isinstance(start_pos, torch.Tensor):
        return  # the compiled step: its caller checked the length, and a check here would sync the device
    end = start_pos + n_new
    if config.positional == "learned" and end > config.max_seq_len:
        raise ValueError(f"position {end - 1} is past max_seq_len {config.max_seq_len} (learned positions)")


def init_weights(model: nn.Module, seed: int, every_tensor: bool = False) -> None:
    """GPT-2's initialisation, reproducible from the seed alone on any device.

    every_tensor also randomises LayerNorm gains and all biases (GPT-2 starts them at 1 and 0), so that a
    test or a reference file catches any tensor that is read wrongly, not only the matrices.
    """
    gen = torch.Generator().manual_seed(seed)
    residual_std = INIT_STD / math.sqrt(2 * model.config.n_layers)  # GPT-2 scales residual projections
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                is_norm = isinstance(module, (nn.LayerNorm, RMSNorm))
                if every_tensor and (is_norm or name == "bias"):
                    p.copy_((1.0 if is_norm and name == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
                elif name == "bias":
                    p.zero_()
                elif is_norm:
                    p.fill_(1.0)
                else:
                    std = residual_std if module_name.endswith("proj") else INIT_STD
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
