"""The machine's limits, measured in the same run as the benchmark, and what a decode step must do.

A cached decode step reads every weight once (plus the K/V it attends to) and does little arithmetic per
byte read: it is memory-bound, so its floor is bytes read / read bandwidth. Naive recomputation does
arithmetic proportional to the sequence length each step, so its time follows FLOPs instead; both counts
are reported so a reader can see which limit each strategy runs into.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kvbench.bench.timing import median_seconds
from kvbench.cache import kv_bytes_formula

BANDWIDTH_MIN_BYTES = 64 * 2**20  # smaller buffers would measure a cache level, not the read path


def weight_bytes_per_step(model, batch: int) -> int:
    """Bytes of parameters (and cached source K/V) one decode step reads: the model family says which."""
    return model.step_weight_bytes(batch)


def kv_bytes_read(model, tokens: float, batch: int) -> float:
    """Bytes of K and V one decode step attends to when `tokens` positions are visible."""
    c = model.config
    element = model.dtype.itemsize
    return kv_bytes_formula(c.n_layers, c.n_kv_heads, c.head_dim, 1, batch, element) * tokens  # K/V heads only


def matmul_weights(model) -> int:
    """Elements of the weight matrices every new token is multiplied through (LM head and tables apart)."""
    return model.step_matrices()


def cached_step_flops(model, visible: float, batch: int) -> float:
    """One cached decode step: each matrix once for the new token, attention over `visible` keys (and, in an
    encoder-decoder, over the source's cached cross K/V)."""
    c = model.config
    attention = 2 * 2 * c.n_layers * c.n_heads * c.head_dim * (visible + model.source_len)  # q.k scores, weighted v
    return batch * (2 * matmul_weights(model) + 2 * c.d_model * c.vocab_size + attention)


def naive_step_flops(model, seq_len: float, batch: int) -> float:
    """One naive step: every decoder block over the whole sequence, causal attention, LM head on the last
    position (an encoder-decoder's encoder rerun and cross projections are not counted: a lower bound)."""
    c = model.config
    attention = 2 * 2 * c.n_layers * c.n_heads * c.head_dim * seq_len * (seq_len + 1) / 2
    return batch * (2 * matmul_weights(model) * seq_len + attention + 2 * c.d_model * c.vocab_size)


@dataclass
class MachineLimits:
    bandwidth_bytes: int  # size of the buffer read: the same bytes as one decode step
    bandwidth_gbs: dict  # GB/s by read kernel
    best_bandwidth_gbs: float  # the floor uses the fastest read seen
    matmul_gflops: float  # dense matmul in the benchmark's dtype: the ceiling for arithmetic-bound work

    def to_dict(self) -> dict:
        return asdict(self)


def _median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # first touch and one-off costs stay out
    return median_seconds(fn, device, repeats)


def _read_bandwidth(device: torch.device, nbytes: int, repeats: int) -> tuple[int, dict[str, float]]:
    """Bytes actually read (nbytes rounded to whole rows) and the GB/s of each read kernel."""
    columns = 1024
    buffer = torch.ones(nbytes // 4 // columns, columns, device=device)  # (rows, 1024) float32
    vector = torch.ones(columns, device=device)
    read = buffer.numel() * 4
    kernels = {"sum": buffer.sum, "matrix_vector": lambda: buffer @ vector}
    return read, {name: read / _median_time(fn, device, repeats) / 1e9 for name, fn in kernels.items()}


@torch.inference_mode()
def measure_limits(device: torch.device, step_bytes: int, dtype: torch.dtype, repeats: int = 9) -> MachineLimits:
    """Read bandwidth over a buffer the size of one decode step's reads, and dense matmul throughput."""
    nbytes = max(step_bytes, BANDWIDTH_MIN_BYTES)
    read, gbs = _read_bandwidth(device, nbytes, repeats)
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    gflops = 2 * n**3 / _median_time(lambda: a @ b, device, 5) / 1e9
    return MachineLimits(read, {k: round(v, 2) for k, v in gbs.items()}, round(max(gbs.values()), 2), round(gflops, 1))
