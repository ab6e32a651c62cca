"""Will it fit? Sizes of models and caches computed before allocating them, against the memory available.

An allocation that cannot succeed should be one line naming what to lower, not an allocator traceback (or,
worse, a machine thrashing in swap). Sizes come from building the model or cache on torch's "meta" device:
exact shapes, no memory, and no size formula here that could drift from the real classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvbench.errors import KVBenchError

MEMINFO = Path("/proc/meminfo")


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can take now: CUDA's free memory, else Linux's MemAvailable; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None  # not Linux: no estimate, the allocator's own error is caught at the CLI


def size_text(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError("unreachable")


def require(nbytes: int, device: torch.device | str, what: str, advice: str) -> None:
    """Raise KVBenchError when nbytes cannot fit in the device's available memory."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise KVBenchError(f"{what} needs {size_text(nbytes)} but {size_text(available)} of memory is available "
                           f"on {torch.device(device)}; {advice}")


def element_count(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def largest_tensor(module: torch.nn.Module) -> tuple[str, tuple[int, ...]]:
    name, tensor = max(module.state_dict().items(), key=lambda item: item[1].numel())
    return name, tuple(tensor.shape)


def cache_bytes(config, strategy, batch: int, tokens: int, window: int | None, dtype: torch.dtype) -> int:
    """Bytes the strategy's cache holds for `tokens` positions of `batch` sequences (0 for naive): what it
    preallocates, measured on the meta device, or for a cache that allocates nothing up front and grows
    (dynamic), the full-precision formula it grows to."""
    from kvbench.cache import kv_bytes_formula
    from kvbench.strategies import CacheShape, resolve

    shape = CacheShape.of(config, batch, tokens, dtype, torch.device("meta"), window)
    cache = resolve(strategy).new_cache(shape)
    if cache is None:
        return 0
    # what it holds up front, or what it grows to (dynamic from nothing, paged from a block per sequence)
    return max(cache.nbytes, cache.expected_bytes(tokens)) or kv_bytes_formula(config.n_layers, config.n_kv_heads, config.head_dim, tokens, batch,
                                            dtype.itemsize)
