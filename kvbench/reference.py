"""An independent NumPy float64 forward pass: the oracle `evaluate` checks the torch model against.

Written apart from model.py on purpose: no torch, no shared helpers, attention done head by head with an
explicit mask and a hand-written softmax, so that a bug in the torch model cannot hide in shared code.
It reads the same kvbench-named weights (see weights.py for the names).
"""

from __future__ import annotations

import numpy as np

from kvbench.config import ModelConfig


def _norm(x: np.ndarray, gain: np.ndarray, shift: np.ndarray | None, eps: float, kind: str = "layernorm") -> np.ndarray:
    if kind == "rmsnorm":  # no centring, no shift: divide by the root mean square
        return x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * gain
    centred = x - x.mean(axis=-1, keepdims=True)
    variance = (centred**2).mean(axis=-1, keepdims=True)
    y = centred / np.sqrt(variance + eps) * gain
    return y if shift is None else y + shift


def _act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "relu":
        return np.maximum(x, 0.0)
    if kind == "silu":
        return x / (1.0 + np.exp(-x))
    if kind == "gelu":  # the tanh approximation GPT-2 uses
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    from math import erf  # exact GELU: x * Phi(x)

    return x * 0.5 * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def _affine(w: dict[str, np.ndarray], prefix: str, x: np.ndarray) -> np.ndarray:
    y = x @ w[prefix + ".weight"]
    bias = w.get(prefix + ".bias")
    return y if bias is None else y + bias


def _sincos_table(n_positions: int, first: int, d_model: int) -> np.ndarray:
    table = np.zeros((n_positions, d_model))
    for offset in range(n_positions):
        pos = first + offset
        for i in range(0, d_model, 2):
            angle = pos / np.power(10000.0, i / d_model)
            table[offset, i] = np.sin(angle)
            table[offset, i + 1] = np.cos(angle)
    return table


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _heads(q_all: np.ndarray, k_all: np.ndarray, v_all: np.ndarray, allowed: np.ndarray | None,
           cfg: ModelConfig) -> np.ndarray:
    """Scaled dot-product attention head by head; `allowed` (T, S) masks keys, None allows all.
    Query head h reads K/V head h // (n_heads / n_kv_heads): consecutive query heads share one."""
    heads, per_kv = [], cfg.n_heads // cfg.n_kv_heads
    for h in range(cfg.n_heads):
        cols = slice(h * cfg.head_dim, (h + 1) * cfg.head_dim)
        kv = h // per_kv
        kv_cols = slice(kv * cfg.head_dim, (kv + 1) * cfg.head_dim)
        scores = q_all[:, cols] @ k_all[:, kv_cols].T / np.sqrt(cfg.head_dim)
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        heads.append(_softmax(scores) @ v_all[:, kv_cols])
    return np.concatenate(heads, axis=1)


def _rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Rotation speed of each feature pair, theta^(-2i/hd), with Llama 3's scaling applied pair by pair."""
    half = cfg.head_dim // 2
    freqs = np.array([cfg.rope_theta ** (-2.0 * i / cfg.head_dim) for i in range(half)])
    scaling = cfg.rope_scaling
    if scaling is None:
        return freqs
    original = scaling.original_max_position_embeddings
    for i, f in enumerate(freqs):
        wavelength = 2 * np.pi / f
        if wavelength < original / scaling.high_freq_factor:  # fast rotation: kept
            continue
        if wavelength > original / scaling.low_freq_factor:  # slow rotation: slowed by `factor`
            freqs[i] = f / scaling.factor
        else:  # in between: a linear blend of the two, by where the wavelength lies
            t = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
            freqs[i] = (1 - t) * f / scaling.factor + t * f
    return freqs


def _rotate(x: np.ndarray, n_heads: int, cfg: ModelConfig) -> np.ndarray:
    """RoPE on rows (T, n_heads * hd) at positions 0..T-1: in each head, features i and i + hd/2 are a point
    of the plane, turned by angle position x frequency_i."""
    half = cfg.head_dim // 2
    angle = np.arange(x.shape[0])[:, None] * _rope_frequencies(cfg)[None, :]  # (T, hd/2)
    cos, sin = np.cos(angle), np.sin(angle)
    out = x.copy()
    for h in range(n_heads):
        a = slice(h * cfg.head_dim, h * cfg.head_dim + half)
        b = slice(h * cfg.head_dim + half, (h + 1) * cfg.head_dim)
        out[:, a] = x[:, a] * cos - x[:, b] * sin
        out[:, b] = x[:, b] * cos + x[:, a] * sin
    return out


def _self_attention(w: dict[str, np.ndarray], prefix: str, x: np.ndarray, cfg: ModelConfig,
                    window: int | None, causal: bool = True) -> np.ndarray:
    seq = x.shape[0]
    fused = _affine(w, prefix + ".qkv", x)
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    q_all, k_all = fused[:, :q_width], fused[:, q_width: q_width + kv_width]
    v_all = fused[:, q_width + kv_width:]
    if cfg.positional == "rope":
        q_all, k_all = _rotate(q_all, cfg.n_heads, cfg), _rotate(k_all, cfg.n_kv_heads, cfg)
    allowed = np.tril(np.ones((seq, seq), dtype=bool)) if causal else None
    if window is not None:  # each query sees only its last `window` positions, itself included
        allowed &= ~np.tril(np.ones((seq, seq), dtype=bool), k=-window)
    return _affine(w, prefix + ".proj", _heads(q_all, k_all, v_all, allowed, cfg))


def _cross_attention(w: dict[str, np.ndarray], prefix: str, x: np.ndarray, memory: np.ndarray,
                     cfg: ModelConfig) -> np.ndarray:
    kv = _affine(w, prefix + ".kv", memory)
    q_all = _affine(w, prefix + ".q", x)
    return _affine(w, prefix + ".proj", _heads(q_all, kv[:, : cfg.d_model], kv[:, cfg.d_model:], None, cfg))


def _mlp(w: dict[str, np.ndarray], prefix: str, x: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    hidden = _affine(w, prefix + ".fc", x)
    if cfg.mlp == "gated":  # the fused matrix holds the gate's columns, then the up projection's
        gate, up = hidden[:, : cfg.d_ff], hidden[:, cfg.d_ff:]
        hidden = _act(gate, cfg.activation) * up
    else:
        hidden = _act(hidden, cfg.activation)
    return _affine(w, prefix + ".proj", hidden)


def _block(w: dict[str, np.ndarray], p: str, x: np.ndarray, cfg: ModelConfig, window: int | None = None,
           causal: bool = True, memory: np.ndarray | None = None) -> np.ndarray:
    """One block at prefix p: self-attention, cross-attention when `memory` is given, MLP."""

    def ln(name: str, v: np.ndarray) -> np.ndarray:
        return _norm(v, w[f"{p}.{name}.weight"], w.get(f"{p}.{name}.bias"), cfg.layer_norm_eps, cfg.norm_type)

    sublayers = [lambda v: _self_attention(w, f"{p}.attn", v, cfg, window, causal)]
    if memory is not None:
        sublayers.append(lambda v: _cross_attention(w, f"{p}.cross", v, memory, cfg))
    sublayers.append(lambda v: _mlp(w, f"{p}.mlp", v, cfg))
    for i, sublayer in enumerate(sublayers, start=1):
        if cfg.norm == "pre":
            x = x + sublayer(ln(f"ln{i}", x))
        else:
            x = ln(f"ln{i}", x + sublayer(x))
    return x


def reference_logits(weights: dict[str, np.ndarray], cfg: ModelConfig, ids: np.ndarray,
                     window: int | None = None) -> np.ndarray:
    """Logits (B, T, V) in float64 for token ids (B, T) starting at position 0."""
    w = {name: np.asarray(t, dtype=np.float64) for name, t in weights.items()}
    vocab_by_dim = w["lm_head.weight"]  # (D, V)
    token_table = vocab_by_dim.T if cfg.tie_embeddings else w["tok_emb"]  # (V, D)
    out = []
    for row in np.asarray(ids):
        x = token_table[row]
        if cfg.positional == "learned":
            x = x + w["pos_emb"][: len(row)]
        elif cfg.positional == "sinusoidal":
            x = x + _sincos_table(len(row), 0, cfg.d_model)  # rope: positions enter inside attention
        for i in range(cfg.n_layers):
            x = _block(w, f"blocks.{i}", x, cfg, window)
        if cfg.norm == "pre":
            x = _norm(x, w["ln_f.weight"], w.get("ln_f.bias"), cfg.layer_norm_eps, cfg.norm_type)
        out.append(x @ vocab_by_dim)
    return np.stack(out)


def _positions(w: dict[str, np.ndarray], table: str, n: int, cfg) -> np.ndarray:
    return w[table][:n] if cfg.positional == "learned" else _sincos_table(n, 0, cfg.d_model)


def reference_seq2seq_logits(weights: dict[str, np.ndarray], cfg, src: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Encoder-decoder logits (B, T, V) in float64 for source ids (B, S) and target ids (B, T)."""
    w = {name: np.asarray(t, dtype=np.float64) for name, t in weights.items()}
    vocab_by_dim = w["lm_head.weight"]  # (D, V)
    tgt_table = vocab_by_dim.T if cfg.tie_embeddings else w["tgt_emb"]
    out = []
    for src_row, tgt_row in zip(np.asarray(src), np.asarray(tgt), strict=True):
        memory = w["src_emb"][src_row] + _positions(w, "src_pos_emb", len(src_row), cfg)
        for i in range(cfg.n_encoder_layers):
            memory = _block(w, f"encoder.{i}", memory, cfg, causal=False)
        x = tgt_table[tgt_row] + _positions(w, "tgt_pos_emb", len(tgt_row), cfg)
        if cfg.norm == "pre":
            memory = _norm(memory, w["encoder_norm.weight"], w.get("encoder_norm.bias"), cfg.layer_norm_eps,
                           cfg.norm_type)
        for i in range(cfg.n_decoder_layers):
            x = _block(w, f"decoder.{i}", x, cfg, memory=memory)
        if cfg.norm == "pre":
            x = _norm(x, w["ln_f.weight"], w.get("ln_f.bias"), cfg.layer_norm_eps, cfg.norm_type)
        out.append(x @ vocab_by_dim)
    return np.stack(out)
