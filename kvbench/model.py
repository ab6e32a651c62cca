"""The torch decoder, read top-down: Linear -> Attention -> MLP -> Block -> Decoder.

Inference only (no dropout). One forward serves prefill (the whole prompt) and decode (one token) alike:
it takes token ids, an optional KV cache and the position of the first id.
"""

from __future__ import annotations

import functools
import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from kvbench.cache import KVCache, Mask, attend, sliding_mask
from kvbench.config import ModelConfig

INIT_STD = 0.02  # GPT-2's initialiser range
Position = Union[int, torch.Tensor]  # an int, or a 0-d tensor in the compiled decode step (no recompiles)


KERNELS = ("matmul", "mv", "linear")


class Linear(nn.Module):
    """y = x @ W + b, computed by one of three kernels, each with the weight layout it streams fastest.

    Why: decoding multiplies a single row by every weight, a matrix-vector product whose speed depends on
    the kernel and on how W lies in memory. Measured on CPU (docs/perf.md): float32 is fastest as
    x @ W with W (in, out) contiguous ("matmul", GPT-2's Conv1D layout and kvbench's file format);
    bfloat16 as torch.mv with W (out, in) ("mv"); "linear" is F.linear on W (out, in), as nn.Linear does.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))  # (in, out) for "matmul"
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        self.kernel = "matmul"

    def use_kernel(self, kernel: str) -> None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose from {KERNELS}")
        if (kernel == "matmul") != (self.kernel == "matmul"):  # switching between (in, out) and (out, in)
            self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=False)
        self.kernel = kernel

    def rows_by_output(self) -> torch.Tensor:
        """W as (out, in): one row per output feature (for a tied embedding, one row per token)."""
        return self.weight.t() if self.kernel == "matmul" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        if self.kernel == "matmul":
            y = x2d @ self.weight if self.bias is None else torch.addmm(self.bias, x2d, self.weight)  # (N, out)
        elif self.kernel == "mv" and x2d.shape[0] == 1:  # F.linear does not pick the vector kernel itself
            y = torch.mv(self.weight, x2d[0])[None]  # (1, out)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2d, self.weight, self.bias)  # (N, out)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def layer_norm(d_model: int, config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(d_model, eps=config.layer_norm_eps, bias=config.bias)


class Attention(nn.Module):
    """Causal multi-head self-attention with fused QKV projection."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns
        self.n_heads, self.head_dim, self.d_model = config.n_heads, config.head_dim, config.d_model
        self.qkv = Linear(config.d_model, 3 * config.d_model, config.bias)
        self.proj = Linear(config.d_model, config.d_model, config.bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None, start_pos: Position, mask: Mask) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if cache is None:
            y = attend(q, k, v, mask)  # (B, H, T, hd)
        else:
            y = cache.attend(self.layer_idx, start_pos, q, k, v, mask)  # (B, H, T, hd): stores k, v first
        y = y.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, D)
        return self.proj(y)


ACTIVATIONS = {  # config `activation` -> the function; a new one is one entry here (and in the reference)
    "gelu": functools.partial(F.gelu, approximate="tanh"),  # GPT-2's
    "gelu_exact": F.gelu,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = Linear(config.d_model, config.d_ff, config.bias)
        self.proj = Linear(config.d_ff, config.d_model, config.bias)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class Block(nn.Module):
    """Attention then MLP, each with a residual; LayerNorm before (pre-norm) or after (post-norm) the sublayer."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln1 = layer_norm(config.d_model, config)
        self.attn = Attention(config, layer_idx)
        self.ln2 = layer_norm(config.d_model, config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None, start_pos: Position, mask: Mask) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), cache, start_pos, mask)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, cache, start_pos, mask))
        return self.ln2(x + self.mlp(x))


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """'Attention Is All You Need' encodings: sin on even features, cos on odd, any position (no table)."""
    inv_freq = torch.exp(torch.arange(0, d_model, 2, device=positions.device) * (-math.log(10000.0) / d_model))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(len(positions), d_model)  # (T, D)


class LanguageModel(nn.Module):
    """What every model kvbench generates with has: an LM head, whose weight says where the model lives."""

    lm_head: Linear

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
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # Post-norm blocks already end in a LayerNorm, so only pre-norm needs a final one (as GPT-2 has).
        self.ln_f = layer_norm(d, config) if config.norm == "pre" else nn.Identity()
        self.lm_head = Linear(d, config.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor, start_pos: Position) -> torch.Tensor:
        table = self.lm_head.rows_by_output() if self.tok_emb is None else self.tok_emb  # (V, D), maybe a view
        return add_positions(F.embedding(ids, table), self.pos_emb, start_pos)  # (B, T, D)

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: Position = 0,
               window: int | None = None) -> torch.Tensor:
        """Final hidden states (B, T, D) for ids (B, T) at positions start_pos.., after the final norm.

        Without a cache the sequence attends causally to itself, or within the last `window` positions.
        """
        check_positions(self.config, start_pos, ids.shape[1])
        x = self.embed(ids, start_pos)
        mask = begin_pass(cache, start_pos, ids.shape[1], window, ids.device)
        for block in self.blocks:
            x = block(x, cache, start_pos, mask)
        end_pass(cache)
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start_pos: Position = 0,
                last_only: bool = False, window: int | None = None) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only when last_only."""
        h = self.hidden(ids, cache, start_pos, window)
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


def add_positions(x: torch.Tensor, table: torch.Tensor | None, start_pos: Position) -> torch.Tensor:
    """x (B, T, D) plus the positions start_pos..: a learned table's rows, or sinusoidal encodings if None."""
    T = x.shape[1]
    if isinstance(start_pos, int) and table is not None:
        return x + table[start_pos:start_pos + T]  # a view: no gather on the eager path
    positions = start_pos + torch.arange(T, device=x.device)  # (T,)
    if table is not None:
        return x + table[positions]
    return x + sinusoidal_positions(positions, x.shape[-1]).to(x.dtype)


def begin_pass(cache: KVCache | None, start_pos: Position, n_new: int, window: int | None,
               device: torch.device) -> Mask:
    """Tell the cache a forward pass starts; the visibility every layer of the pass uses."""
    if cache is not None:
        cache.begin(start_pos, n_new)
    return self_attention_mask(cache, start_pos, n_new, window, device)


def end_pass(cache: KVCache | None) -> None:
    if cache is not None:
        cache.end()


def self_attention_mask(cache: KVCache | None, start_pos: Position, n_new: int, window: int | None,
                        device: torch.device) -> Mask:
    """With a cache, the cache decides; without one the sequence attends causally to itself, or within
    the last `window` positions."""
    if cache is not None:
        return cache.mask(start_pos, n_new)
    if window is None or window >= n_new:
        return "causal"
    positions = torch.arange(n_new, device=device)
    return sliding_mask(positions, positions, window)  # (T, T) banded causal


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
                is_norm = isinstance(module, nn.LayerNorm)
                if every_tensor and (is_norm or name == "bias"):
                    p.copy_((1.0 if is_norm and name == "weight" else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
                elif name == "bias":
                    p.zero_()
                elif is_norm:
                    p.fill_(1.0)
                else:
                    std = residual_std if module_name.endswith("proj") else INIT_STD
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
