"""The encoder-decoder transformer ("Attention Is All You Need"), read top-down, and its two caches.

The decoder has two kinds of attention, and so two caches: its causal self-attention K/V grow by one token
per step (any strategy of cache.py), while its cross-attention K/V are projections of the encoder output,
which does not change during a generation: computed once, reused at every step.

Generation code (generate.py, verify.py, the benchmark) works on a `SourceBound` model: the encoder-decoder
with one source batch attached, which looks like a decoder-only model (hidden, forward, lm_head, config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvbench.cache import KVCache
from kvbench.config import Seq2SeqConfig
from kvbench.model import (MLPS, Attention, AttentionRule, Block, LanguageModel, Linear, Pass, Position, begin_pass, check_positions,
                           end_pass, layer_norm, matrix_elements, parameter_bytes, positions_for, random_ids, row_bytes,
                           use_kernel)

CrossKV = list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: K and V (B, H, S, hd) of the source


class CrossAttention(nn.Module):
    """Decoder queries attend to every encoder position (no mask): K/V come from the encoder output."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.d_model = config.n_heads, config.head_dim, config.d_model
        self.q = Linear(config.d_model, config.d_model, config.bias)
        self.kv = Linear(config.d_model, 2 * config.d_model, config.bias)
        self.proj = Linear(config.d_model, config.d_model, config.bias)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = memory.shape
        kv = self.kv(memory).view(B, S, 2, self.n_heads, self.head_dim)  # (B, S, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, hd)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.d_model)  # (B, T, D)
        return self.proj(y)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the source, MLP; each with a residual and a LayerNorm."""

    def __init__(self, config: Seq2SeqConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln1, self.ln2, self.ln3 = (layer_norm(config.d_model, config) for _ in range(3))
        self.attn = Attention(config, layer_idx)
        self.cross = CrossAttention(config)
        self.mlp = MLPS[config.mlp](config)

    def forward(self, x: torch.Tensor, step: Pass, cross_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), step)
            x = x + self.cross(self.ln2(x), *cross_kv)
            return x + self.mlp(self.ln3(x))
        x = self.ln1(x + self.attn(x, step))
        x = self.ln2(x + self.cross(x, *cross_kv))
        return self.ln3(x + self.mlp(x))


class Seq2Seq(LanguageModel):
    """Encoder (source embedding + positions, bidirectional blocks) and decoder (target embedding + positions,
    decoder blocks, LM head). Final LayerNorms only with pre-norm, as in the decoder-only model."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        d, learned = config.d_model, config.positional == "learned"
        self.src_emb = nn.Parameter(torch.empty(config.src_vocab_size, d))
        self.tgt_emb = None if config.tie_embeddings else nn.Parameter(torch.empty(config.tgt_vocab_size, d))
        self.src_pos_emb = nn.Parameter(torch.empty(config.max_seq_len, d)) if learned else None
        self.tgt_pos_emb = nn.Parameter(torch.empty(config.max_seq_len, d)) if learned else None
        self.positions = positions_for(config)
        self.encoder = nn.ModuleList(Block(config, i) for i in range(config.n_encoder_layers))
        self.encoder_norm = layer_norm(d, config) if config.norm == "pre" else nn.Identity()
        self.decoder = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_decoder_layers))
        self.ln_f = layer_norm(d, config) if config.norm == "pre" else nn.Identity()
        self.lm_head = Linear(d, config.tgt_vocab_size, bias=False)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, S, D) for source ids (B, S): every position sees every other (mask None)."""
        check_positions(self.config, 0, src.shape[1])
        x = self.positions.add(F.embedding(src, self.src_emb), 0, self.src_pos_emb)  # (B, S, D)
        bidirectional = Pass(cache=None, start_pos=0, mask=None)
        for block in self.encoder:
            x = block(x, bidirectional)
        return self.encoder_norm(x)

    def project_memory(self, memory: torch.Tensor) -> CrossKV:
        """Every decoder layer's cross-attention K/V of the encoder output."""
        return [block.cross.project_memory(memory) for block in self.decoder]

    def decode_hidden(self, ids: torch.Tensor, cross_kv: CrossKV, cache: KVCache | None, start_pos: Position,
                      visibility: AttentionRule = None, pads: torch.Tensor | None = None) -> torch.Tensor:
        """Final decoder hidden states (B, T, D) for target ids (B, T) at positions start_pos..."""
        check_positions(self.config, start_pos, ids.shape[1])
        table = self.lm_head.rows_by_output() if self.tgt_emb is None else self.tgt_emb  # (V, D)
        x = self.positions.add(F.embedding(ids, table), start_pos, self.tgt_pos_emb, pads)  # (B, T, D)
        step = begin_pass(self.config, self.positions, cache, start_pos, ids.shape[1], visibility, ids.device, pads)
        for block, kv in zip(self.decoder, cross_kv, strict=True):
            x = block(x, step, kv)
        end_pass(cache)
        return self.ln_f(x)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of every target position, teacher-forced: one pass, no cache."""
        memory = self.encode(src)
        return self.lm_head(self.decode_hidden(tgt, self.project_memory(memory), None, 0))

    def use_kernel(self, kernel: str) -> Seq2Seq:
        return use_kernel(self, kernel)

    def bind(self, src: torch.Tensor) -> SourceBound:
        return SourceBound(self, src)

    def for_generation(self, batch: int, src_len: int, seed: int) -> SourceBound:
        """Bound to a seeded random source batch (B, src_len), drawn with seed + 1 so that it differs from
        the target prompt drawn with seed."""
        return self.bind(random_ids(self.config.src_vocab_size, batch, src_len, seed + 1).to(self.device))


class Seq2SeqCache(KVCache):
    """The decoder's self-attention cache, plus what a generation keeps of its source.

    The encoder output is computed once per generation (at the prefill) and kept. With `keep_cross`, every
    layer's cross-attention K/V are projected from it once and reused at every step (the full cache);
    without, they are projected again at every step (the self-attention cache only).
    """

    def __init__(self, self_cache: KVCache, keep_cross: bool):
        self.self_cache, self.keep_cross = self_cache, keep_cross
        self.memory: torch.Tensor | None = None  # (B, S, D) encoder output
        self.cross_kv: CrossKV | None = None
        self.projections = 0  # how many times the cross K/V were computed this generation (tests count)

    def begin(self, start_pos, n_new, pads=None):
        self.self_cache.begin(start_pos, n_new, pads)

    def end(self):
        self.self_cache.end()

    def update(self, layer, start_pos, k, v):
        return self.self_cache.update(layer, start_pos, k, v)

    def attend(self, layer, start_pos, q, k, v, mask):
        return self.self_cache.attend(layer, start_pos, q, k, v, mask)

    def mask(self, start_pos, n_new):
        return self.self_cache.mask(start_pos, n_new)

    def reset(self):
        self.self_cache.reset()
        self.memory, self.cross_kv, self.projections = None, None, 0

    def contents(self, layer, length):
        return self.self_cache.contents(layer, length)

    def storage_bound(self, exact):
        return self.self_cache.storage_bound(exact)

    def release(self, row):
        self.self_cache.release(row)

    def memory_use(self, row_tokens):
        return self.self_cache.memory_use(row_tokens)  # self-attention's: the source's K/V are in nbytes

    @property
    def nbytes(self):
        kept = sum(k.nbytes + v.nbytes for k, v in self.cross_kv) if self.keep_cross and self.cross_kv else 0
        return self.self_cache.nbytes + kept

    def expected_bytes(self, tokens):
        if not (self.keep_cross and self.cross_kv):
            return self.self_cache.expected_bytes(tokens)
        k = self.cross_kv[0][0]
        B, H, S, hd = k.shape
        return self.self_cache.expected_bytes(tokens) + 2 * len(self.cross_kv) * B * H * S * hd * k.element_size()

    def cross_for(self, model: Seq2Seq, src: torch.Tensor) -> CrossKV:
        if self.memory is None:
            self.memory = model.encode(src)  # once per generation: the source does not change
        if self.keep_cross and self.cross_kv is not None:
            return self.cross_kv
        self.projections += 1
        cross_kv = model.project_memory(self.memory)
        if self.keep_cross:
            self.cross_kv = cross_kv
        return cross_kv


class SourceBound(LanguageModel):
    """An encoder-decoder with one source batch attached: generation code treats it as a decoder-only model.

    Without a cache (naive), every call recomputes everything, the encoder included.
    """

    def __init__(self, model: Seq2Seq, src: torch.Tensor):
        super().__init__()
        self.model, self.src = model, src
        self.config, self.lm_head = model.config, model.lm_head

    def hidden(self, ids: torch.Tensor, cache: Seq2SeqCache | None = None, start_pos: Position = 0,
               visibility: AttentionRule = None, pads: torch.Tensor | None = None) -> torch.Tensor:
        if cache is None:
            cross_kv = self.model.project_memory(self.model.encode(self.src))
        else:
            cross_kv = cache.cross_for(self.model, self.src)
        return self.model.decode_hidden(ids, cross_kv, cache, start_pos, visibility, pads)

    def forward(self, ids: torch.Tensor, cache: Seq2SeqCache | None = None, start_pos: Position = 0,
                last_only: bool = False, visibility: AttentionRule = None, pads: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(ids, cache, start_pos, visibility, pads)
        return self.lm_head(h[:, -1:] if last_only else h)

    def with_rows(self, batch: int, seed: int) -> SourceBound:
        return self.model.for_generation(batch, self.source_len, seed)

    def wrap_cache(self, cache: KVCache | None, keep_cross: bool = True) -> KVCache | None:
        return None if cache is None else Seq2SeqCache(cache, keep_cross=keep_cross)

    @property
    def source_len(self) -> int:
        return self.src.shape[1]

    def step_weight_bytes(self, batch: int) -> int:
        """Bytes one cached decode step reads: the decoder's blocks without their cross-attention K/V
        projections (their output is cached), the final norm and LM head, one target token and position row,
        and the cached cross-attention K/V of the source. The encoder ran once, at the prefill: not read."""
        m = self.model
        blocks = parameter_bytes(m.decoder) - parameter_bytes(*(block.cross.kv for block in m.decoder))
        tables = (batch * row_bytes(m.tgt_emb) if m.tgt_emb is not None else 0) + row_bytes(m.tgt_pos_emb)
        cross_kv = 2 * len(m.decoder) * self.source_len * m.config.d_model * batch * self.dtype.itemsize
        return blocks + parameter_bytes(m.ln_f, m.lm_head) + tables + cross_kv

    def step_matrices(self) -> int:
        m = self.model
        return matrix_elements(m.decoder) - matrix_elements(*(block.cross.kv for block in m.decoder))
