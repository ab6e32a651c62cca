"""The machine's limits, measured in the same run as the benchmark, and what a decode step must do.

A cached decode step reads every weight once (plus the K/V it attends to) and does ~2 FLOPs per weight
element per sequence. At batch 1 that is memory-bound; at a large batch the same bytes feed B times the
arithmetic, so a step can be bound by either. The floor is therefore

    floor_ms = max(bytes read / read bandwidth, FLOPs / matmul throughput at the step's rows)

with `bound` saying which term won. Both limits are measured honestly: the read bandwidth is the best of
several kernels (a reduction, a copy, matrix-vector products in both weight layouts) over a buffer the size
of the step's reads, never only the kernel the model itself uses (a floor that the model's own kernel
defines could never show the model's overhead); the throughput is a dense matmul with as many rows as the
batch, in the run's dtype, on a weight block that stays in cache (so that it measures arithmetic, not reads).

On a GPU, one probe call lasts tens of microseconds, as long as the launch and synchronisation around it: each
timing is a block of back-to-back calls instead. Its buffers are at least four times the L2 cache, so that the
reads come from HBM. Its arithmetic limit is the chip's dense peak in the run's dtype (a large square product)
for every batch, because a skinny product on a GPU is launch and latency bound, not arithmetic bound: probed
per batch, it would put a "compute" floor above the memory floor of a batch-1 step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from kvbench.bench.timing import wall_times
from kvbench.cache import kv_bytes_formula
from kvbench.model import onednn_matmul, onednn_pack

BANDWIDTH_MIN_BYTES = 64 * 2**20  # smaller buffers would measure a cache level, not the read path
SIZES_APART = 1.5  # probe a second buffer size only when the largest step reads this much more than the smallest
COMPUTE_BLOCK_BYTES = 8 * 2**20  # weight block of the throughput probe: cache-resident (L2/L3), big enough that
# one call is arithmetic, not call overhead (1 MiB measured ~28 GFLOP/s at 16 rows: overhead-bound)
COMPUTE_CALLS = 5  # matmuls per timed call of the throughput probe (one is short to time)
PROBE_COLUMNS = 768  # inner dimension of the matrix-vector probes (GPT-2's d_model)
GPU_BLOCK_SECONDS = 2e-3  # a timed block of back-to-back GPU calls: the ~20 us launch and sync around it is noise
GPU_BLOCK_MAX_CALLS = 200
L2_MULTIPLE = 4  # a GPU probe's buffer against the L2 cache: reads of a buffer that fits it would come from it
PEAK_MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # square product of the peak probe (8192: ~1.4 ms in bf16 on H100)


def weight_bytes_per_step(model, batch: int) -> int:
    """Bytes of parameters (and cached source K/V) one decode step reads: the model family says which."""
    return model.step_weight_bytes(batch)


def kv_heads(config) -> int:
    """Heads of K and V a cache holds: fewer than the query heads under grouped-query attention."""
    return getattr(config, "n_kv_heads", None) or config.n_heads


def kv_bytes_read(model, tokens: float, batch: int) -> float:
    """Bytes of K and V one decode step attends to when `tokens` positions are visible (full precision)."""
    c = model.config
    element = model.dtype.itemsize
    return kv_bytes_formula(c.n_layers, kv_heads(c), c.head_dim, 1, batch, element) * tokens


def matmul_weights(model) -> int:
    """Elements of the weight matrices every new token is multiplied through (LM head and tables apart)."""
    return model.step_matrices()


def attention_flops(config, visible: float) -> float:
    """q.k scores and the weighted sum of v, for every query head, over `visible` keys, per sequence."""
    return 2 * 2 * config.n_layers * config.n_heads * config.head_dim * visible


def cached_step_flops(model, visible: float, batch: int) -> float:
    """One cached decode step: each matrix once for the new token, attention over `visible` keys (and, in an
    encoder-decoder, over the source's cached cross K/V)."""
    c = model.config
    attention = attention_flops(c, visible + model.source_len)
    return batch * (2 * matmul_weights(model) + 2 * c.d_model * c.vocab_size + attention)


def naive_step_flops(model, seq_len: float, batch: int) -> float:
    """One naive step: every decoder block over the whole sequence, causal attention, LM head on the last
    position (an encoder-decoder's encoder rerun and cross projections are not counted: a lower bound)."""
    c = model.config
    attention = attention_flops(c, seq_len * (seq_len + 1) / 2)
    return batch * (2 * matmul_weights(model) * seq_len + attention + 2 * c.d_model * c.vocab_size)


@dataclass
class MachineLimits:
    """Every probe's result (meta.json records them all) and what the floor takes from them."""

    bandwidth: list[dict] = field(default_factory=list)  # {buffer_bytes, kernel, gbs} per probe
    matmul_by_rows: dict = field(default_factory=dict)  # rows (= batch) -> GFLOP/s, L2-resident weight block
    matmul_gflops: float = 0.0  # a large square matmul: the ceiling for naive's arithmetic
    dtype: str = "float32"

    def best_gbs(self, step_bytes: float) -> float:
        """The fastest read measured over the probed buffer size nearest (in ratio) to step_bytes."""
        sizes = {p["buffer_bytes"] for p in self.bandwidth}
        size = min(sizes, key=lambda s: abs(math.log(s / max(step_bytes, 1))))
        return max(p["gbs"] for p in self.bandwidth if p["buffer_bytes"] == size)

    @property
    def best_bandwidth_gbs(self) -> float:
        return max(p["gbs"] for p in self.bandwidth)

    def throughput_gflops(self, rows: int) -> float:
        by_rows = {int(r): g for r, g in self.matmul_by_rows.items()}  # JSON keys come back as strings
        return by_rows.get(rows) or by_rows[min(by_rows, key=lambda r: abs(r - rows))]

    def floor(self, step_bytes: float, step_flops: float, batch: int) -> tuple[float, str]:
        """(floor in ms, "memory" or "compute") of a step reading step_bytes and doing step_flops."""
        memory_ms = 1000 * step_bytes / (self.best_gbs(step_bytes) * 1e9)
        compute_ms = 1000 * step_flops / (self.throughput_gflops(batch) * 1e9)
        return (memory_ms, "memory") if memory_ms >= compute_ms else (compute_ms, "compute")

    def to_dict(self) -> dict:
        return {**asdict(self), "best_bandwidth_gbs": self.best_bandwidth_gbs}

    @classmethod
    def from_dict(cls, data: dict) -> MachineLimits:
        """Also reads meta.json of runs before the floor had several probes (one bandwidth per kernel)."""
        if isinstance(data.get("bandwidth"), list):
            return cls(data["bandwidth"], data["matmul_by_rows"], data["matmul_gflops"], data.get("dtype", "float32"))
        probes = [{"buffer_bytes": data["bandwidth_bytes"], "kernel": k, "gbs": g}
                  for k, g in data["bandwidth_gbs"].items()]
        return cls(probes, {1: math.inf}, data["matmul_gflops"])  # bytes only, as those runs' floor was


def _best_time(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call: the fastest of `repeats` timings, after one untimed call. A probe measures what the
    machine can do, and a shared machine's noise only ever slows a call (a median let one disturbed probe put
    the floor of a committed run above the step it was to bound: 78 against 165 GFLOP/s in the run before).
    On a GPU each timing is a block of back-to-back calls (GPU_BLOCK_SECONDS), one call on a CPU."""
    fn()  # first touch and one-off costs stay out
    calls = block_calls(wall_times(fn, device, 1)[0]) if device.type == "cuda" else 1

    def block():
        for _ in range(calls):
            fn()

    return min(wall_times(block, device, repeats)) / calls


def block_calls(one_call_s: float) -> int:
    """Back-to-back calls that fill a GPU timing block, given one call's synchronised time."""
    return min(max(math.ceil(GPU_BLOCK_SECONDS / max(one_call_s, 1e-9)), 1), GPU_BLOCK_MAX_CALLS)


def min_probe_bytes(device: torch.device) -> int:
    """The smallest buffer whose reads measure the memory itself: past the caches a CPU keeps per core (and a
    shared L3 slice), and L2_MULTIPLE times a GPU's L2 (50 MB on H100, 60 on H200)."""
    if device.type != "cuda":
        return BANDWIDTH_MIN_BYTES
    return gpu_probe_bytes(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


def gpu_probe_bytes(l2_bytes: int) -> int:
    return max(BANDWIDTH_MIN_BYTES, L2_MULTIPLE * l2_bytes)


def read_probes(device: torch.device, nbytes: int) -> tuple[int, dict]:
    """Kernels that read a float32 buffer of about nbytes once: (bytes read, {name: fn})."""
    rows = max(-(-nbytes // (4 * PROBE_COLUMNS)), 1)  # rounded up: at least nbytes
    buffer = torch.ones(rows, PROBE_COLUMNS, device=device)  # (rows, 768): W (out, in)
    as_in_out = buffer.view(PROBE_COLUMNS, rows)  # the same bytes read as W (in, out)
    x_in, x_row, out = torch.ones(PROBE_COLUMNS, device=device), torch.ones(1, PROBE_COLUMNS, device=device), \
        torch.empty_like(buffer)
    kernels = {
        "sum": buffer.sum,
        "copy": lambda: out.copy_(buffer),  # counted as bytes read only: it also writes as many
        "x @ W, W (in, out)": lambda: x_row @ as_in_out,
        "F.linear, W (out, in)": lambda: F.linear(x_row, buffer),
        "torch.mv, W (out, in)": lambda: torch.mv(buffer, x_in),
        **packed_matmul("oneDNN matmul, W packed", x_row, buffer),
    }
    return buffer.numel() * 4, kernels


def packed_matmul(name: str, x: torch.Tensor, w_out_in: torch.Tensor) -> dict:
    """{name: x @ W by oneDNN on W packed once}, on a CPU whose torch has oneDNN; else {}. It beats MKL's
    sgemm on skinny products here (MKL re-packs W on every call), so a floor without it would be too low."""
    if w_out_in.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return {}
    try:
        packed = onednn_pack(w_out_in, x.shape[0])
        onednn_matmul(x, packed)
    except RuntimeError:  # a dtype oneDNN does not take on this CPU
        return {}
    return {name: lambda: onednn_matmul(x, packed)}


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int) -> list[dict]:
    read, kernels = read_probes(device, max(nbytes, min_probe_bytes(device)))
    return [{"buffer_bytes": read, "kernel": name, "gbs": round(read / _best_time(fn, device, repeats) / 1e9, 2)}
            for name, fn in kernels.items()]


def measure_throughput(device: torch.device, dtype: torch.dtype, rows: int, inner: int, repeats: int) -> float:
    """GFLOP/s of (rows, inner) @ (inner, N) with the (inner, N) block L2-resident: the best of the BLAS's
    matmul and oneDNN's on a packed W (CPU)."""
    cols = max(COMPUTE_BLOCK_BYTES // (inner * dtype.itemsize), 16)
    x = torch.randn(rows, inner, device=device, dtype=dtype)
    w = torch.randn(inner, cols, device=device, dtype=dtype)
    kernels = {"x @ W": lambda: x @ w, **packed_matmul("oneDNN", x, w.t().contiguous())}

    def calls(kernel):
        for _ in range(COMPUTE_CALLS):
            kernel()

    best = min(_best_time(lambda: calls(kernel), device, repeats) for kernel in kernels.values())
    return 2 * rows * inner * cols * COMPUTE_CALLS / best / 1e9


def probe_sizes(step_bytes: list[float]) -> list[int]:
    """Buffer sizes to probe: the smallest step's reads, and the largest's if it is far bigger (a big batch
    at a long context reads its cache on top of the weights, possibly from another level of the hierarchy)."""
    low, high = int(min(step_bytes)), int(max(step_bytes))
    return [low] if high < SIZES_APART * low else [low, high]


@torch.inference_mode()
def measure_limits(device: torch.device, step_bytes: list[float] | float, dtype: torch.dtype,
                   batches: list[int] = (1,), inner: int = PROBE_COLUMNS, repeats: int = 9) -> MachineLimits:
    """Read bandwidth over buffers the size of the steps' reads, and matmul throughput per batch size."""
    sizes = probe_sizes(step_bytes if isinstance(step_bytes, (list, tuple)) else [step_bytes])
    bandwidth = [probe for size in sizes for probe in measure_bandwidth(device, size, repeats)]
    peak = round(peak_gflops(device, dtype), 1)
    if device.type == "cuda":  # the chip's peak bounds every batch's arithmetic (module docstring)
        by_rows = {b: peak for b in batches}
    else:
        by_rows = {b: round(measure_throughput(device, dtype, b, inner, repeats), 1) for b in batches}
    return MachineLimits(bandwidth, by_rows, peak, str(dtype).removeprefix("torch."))


def peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """A large square product in the run's dtype: the ceiling of naive's arithmetic (and on a GPU of every
    step's)."""
    n = PEAK_MATMUL_SIZE["cuda" if device.type == "cuda" else "cpu"]
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, device, 5) / 1e9
