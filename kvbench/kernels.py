"""Which Linear kernel a model decodes with on this machine: chosen per dtype, and for float32 on CPU per row
count by measuring the model's own largest Linear.

Why measured: the fastest kernel is a property of the CPU, not of torch. On an AMD EPYC oneDNN's packed matmul
ran a single row 1.25x faster than MKL's x @ W (MKL re-packs W every call and takes a slow path there); on an
Intel Xeon with AMX x @ W ran it 1.25x faster than oneDNN, while oneDNN still won from 4 rows on (docs/perf.md).
A choice hard-coded for one machine is wrong on the other, so the rows at which packing starts to pay are
measured once per process, weight shape and thread count.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch import nn

from kvbench.bench.timing import wall_times
from kvbench.model import Linear, kernel_choices, onednn_matmul, pack_from_rows

ROW_COUNTS = (1, 2, 4, 8)  # rows of x tried, fewest first; past the last, packing is assumed to pay (it won
# at 16 rows on every machine measured, by 1.3-3x: the batched step it is packed for)
TIMED_CALLS = 7  # per kernel and row count, interleaved, after two warm-up calls of each
_measured: dict[tuple, int] = {}  # (in, out, dtype, threads) -> the fewest rows at which oneDNN's packed matmul won


def decode_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """The Linear kernel that decodes fastest for a dtype, as measured with `kvbench ablate` (docs/perf.md)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        return "mv"  # oneDNN's bfloat16 matrix-vector product: about 2x F.linear or x @ W here
    if device.type == "cpu" and dtype == torch.float16:
        return "linear"
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return "onednn"  # W packed once: 2.6x x @ W at batch 16; at a few rows x @ W may win (packed_from_rows)
    return "matmul"  # x @ W (in, out) beats F.linear by ~20% on the LM head; CUDA: cuBLAS


def for_decoding(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model (already on device, in dtype) with every Linear on the kernel that decodes fastest here."""
    kernel = decode_kernel(device, dtype)
    model.use_kernel(kernel)
    if kernel == "onednn":
        pack_from_rows(model, measure_packed_from_rows(model))
    return model


def packed_from_rows(model: nn.Module) -> int:
    """The row count from which the model's Linears run oneDNN's packed matmul (1: every product, or a kernel
    other than onednn)."""
    return max((rows for _, rows in kernel_choices(model)), default=1)


def measure_packed_from_rows(model: nn.Module) -> int:
    """The fewest rows of x at which oneDNN's packed matmul beats x @ W on the model's largest Linear (its LM
    head, usually: the step's costliest product), measured once per weight shape, dtype and thread count in a
    process. The model's Linears are on the onednn kernel (W (in, out), packed on first use)."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not linears:
        return 1
    largest = max(linears, key=lambda m: m.weight.numel())
    key = (*largest.weight.shape, largest.weight.dtype, torch.get_num_threads())  # threads move the crossing
    if key not in _measured:
        _measured[key] = first_row_count_packed_wins(lambda rows: time_both(largest, rows))
    return _measured[key]


def first_row_count_packed_wins(timings: Callable[[int], tuple[float, float]]) -> int:
    """The first of ROW_COUNTS whose (x @ W, packed) timings favour packing; past them all, the next power of 2."""
    for rows in ROW_COUNTS:
        matmul_s, packed_s = timings(rows)
        if packed_s < matmul_s:
            return rows
    return 2 * ROW_COUNTS[-1]


def time_both(linear: Linear, rows: int) -> tuple[float, float]:
    """Median seconds of x @ W and of oneDNN's packed matmul for `rows` rows through `linear`, interleaved."""
    weight = linear.weight.detach()
    (d_in, _), packed = weight.shape, linear.packed()  # W is (in, out) under the onednn kernel
    x = torch.randn(rows, d_in, dtype=weight.dtype, device=weight.device)  # (rows, in)
    kernels = (lambda: x @ weight, lambda: onednn_matmul(x, packed))
    seconds: list[list[float]] = [[], []]
    with torch.inference_mode():
        for _ in range(TIMED_CALLS + 2):
            for kernel, times in zip(kernels, seconds):  # interleaved: both see the same machine load
                times += wall_times(kernel, weight.device, 1)
    # the first two calls of each warm caches and oneDNN's primitive
    return statistics.median(seconds[0][2:]), statistics.median(seconds[1][2:])
