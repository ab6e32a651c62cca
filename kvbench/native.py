"""kvbench's C++ kernels, compiled on first use with the machine's own compiler and loaded with ctypes.

Why not a torch extension: building against torch's headers takes a minute; these kernels take plain pointers,
compile in about a second, and need nothing but a C++ compiler (the one torch.compile uses on CPU). Why
-march=native: the kernel is built where it runs, so it uses the vector units this CPU has. The built library
is cached per source, compiler, flags and CPU (~/.cache/kvbench/native, or $KVBENCH_CACHE_DIR), so a later
process loads it in a millisecond.

Where no compiler works, `load` returns None with the reason in `why_not`, and callers fall back to their torch
kernels: nothing in kvbench needs this module to be right, only to be fast.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

import torch  # noqa: F401  (loaded first: its OpenMP runtime is the one our libraries bind to)

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
why_not: dict[str, str] = {}  # source name -> why it could not be built or loaded


def cache_dir() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE_DIR") or Path.home() / ".cache" / "kvbench") / "native"


COMPILE_TIMEOUT_S = 120


def compiler() -> list[str] | None:
    """The C++ compiler's command: $CXX (which may be a wrapper, `ccache g++`), else g++, c++ or clang++."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return [found] if found else None


# /proc/cpuinfo's lines that say which instructions a CPU has (x86: vendor, model, flags; ARM: implementer,
# part, features), not those that change while it runs (MHz, bogomips)
CPU_KEYS = ("vendor_id", "cpu family", "model", "model name", "stepping", "flags", "Features", "CPU implementer",
            "CPU architecture", "CPU variant", "CPU part", "CPU revision")


def cpu_signature() -> str:
    """What -march=native depends on, so that a cache directory shared by two machines never hands one a
    library built for the other's instructions."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # no /proc (macOS): the platform's own description
        return f"{platform.platform()} {platform.processor()} {platform.machine()}"
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in CPU_KEYS}))


def compiler_version(cxx: list[str]) -> str:
    done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    return done.stdout


def build(source: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile kvbench/csrc/<source> into a shared library (or find it built); raises OSError or
    subprocess.CalledProcessError with the compiler's message."""
    cxx = compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    code = resources.files("kvbench").joinpath("csrc", source).read_text()
    flags = [*FLAGS, *extra_flags]
    key = "\0".join([code, *cxx, compiler_version(cxx), *flags, cpu_signature()])
    target = cache_dir() / f"{Path(source).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        src, out = Path(work) / source, Path(work) / target.name
        src.write_text(code)
        subprocess.run([*cxx, *flags, str(src), "-o", str(out)], check=True, capture_output=True, text=True,
                       timeout=COMPILE_TIMEOUT_S)
        os.replace(out, target)  # atomic: a process racing us loads a whole library or builds its own
    return target


def _open(source: str, extra_flags: tuple[str, ...]) -> ctypes.CDLL:
    """Load the built library; one that will not load (truncated, say, by a full disk) is built again once."""
    path = build(source, extra_flags)
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return ctypes.CDLL(str(build(source, extra_flags)))


@cache
def load(source: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library of kvbench/csrc/<source>, or None (reason in why_not[source])."""
    if os.environ.get("KVBENCH_NO_NATIVE"):
        why_not[source] = "KVBENCH_NO_NATIVE is set"
        return None
    try:
        return _open(source, extra_flags)
    except subprocess.CalledProcessError as error:
        said = (error.stderr or "").strip().splitlines()
        why_not[source] = f"compiling {source} failed: {said[-1] if said else f'exit code {error.returncode}'}"
    except subprocess.TimeoutExpired:
        why_not[source] = f"compiling {source} took over {COMPILE_TIMEOUT_S} s"
    except OSError as error:
        why_not[source] = f"{source}: {error}"
    return None


# --- decode attention (kvbench/csrc/attention.cpp) ----------------------------------------------------------

ATTENTION = "attention.cpp"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def attention_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    lib = load(ATTENTION, extra_flags)
    if lib is not None and not hasattr(lib, "declared"):
        lib.kvbench_int8_attention.restype = lib.kvbench_float_attention.restype = ctypes.c_int
        lib.kvbench_int8_attention.argtypes = [_PTR] * 7 + [_I64] * 10 + [ctypes.c_int]
        lib.kvbench_float_attention.argtypes = [_PTR] * 5 + [_I64] * 8 + [ctypes.c_int]
        lib.kvbench_attention_isa.restype = ctypes.c_char_p
        lib.declared = True
    return lib


def attention_isa(extra_flags: tuple[str, ...] = ()) -> str | None:
    """'avx512' or 'generic': which loops the built kernels run; None where they could not be built."""
    lib = attention_library(extra_flags)
    return None if lib is None else lib.kvbench_attention_isa().decode()


def _kernel_reads(q, k, v, visible, values: torch.dtype) -> bool:
    """Whether q, k, v and the mask have the shapes, dtypes, device and layout the kernels read (they see
    bare pointers): q (B, H, R, hd) float32; k, v (B, H, S, hd) of `values` with keys hd apart and the same
    strides; visible bool (B | 1, 1, R, S)."""
    B, H, R, hd = q.shape
    S = k.shape[2]
    return (all(t.device.type == "cpu" for t in (q, k, v, visible)) and hd in (64, 128) and S > 0
            and q.dtype == torch.float32 and k.shape == v.shape == (B, H, S, hd) and k.dtype == v.dtype == values
            and k.stride() == v.stride() and k.stride(-1) == 1 and k.stride(-2) == hd
            and visible.dtype == torch.bool and visible.dim() == 4 and visible.shape[0] in (1, B)
            and visible.shape[1:] == (1, R, S))


def _mask_bytes(visible: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The mask as (B | 1, R, S) bytes and its batch stride (0: one mask for every batch row)."""
    shared = visible.shape[0] == 1 or visible.stride(0) == 0
    mask = (visible[:1, 0] if shared else visible[:, 0]).contiguous().view(torch.uint8)  # (B | 1, R, S)
    return mask, 0 if shared else mask.shape[1] * mask.shape[2]


def int8_attention(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
                   visible: torch.Tensor, extra_flags: tuple[str, ...] = ()) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(hd)) v over int8 k = kq * ks, v = vq * vs, by the C++ kernel; None where it does not
    apply (not on the CPU, head_dim not 64 or 128, a layout it does not read, no compiler), so that the caller
    runs its own. q (B, H, R, hd); kq, vq (B, H, S, hd) int8; ks, vs (B, H, S, 1) float32; visible bool
    (B | 1, 1, R, S); returns (B, H, R, hd) float32."""
    q32 = q.to(torch.float32)
    B, H, R, hd = q.shape
    S = kq.shape[2]
    if not (_kernel_reads(q32, kq, vq, visible, torch.int8) and ks.shape == vs.shape == (B, H, S, 1)
            and ks.dtype == vs.dtype == torch.float32 and ks.stride() == vs.stride() and ks.stride(2) == 1):
        return None
    lib = attention_library(extra_flags)
    if lib is None:
        return None
    q32, (mask, mask_batch) = q32.contiguous(), _mask_bytes(visible)  # q (B, H, R, hd)
    out = torch.empty_like(q32)  # (B, H, R, hd)
    failed = lib.kvbench_int8_attention(
        q32.data_ptr(), kq.data_ptr(), ks.data_ptr(), vq.data_ptr(), vs.data_ptr(), mask.data_ptr(),
        out.data_ptr(), B, H, R, S, hd, kq.stride(0), kq.stride(1), ks.stride(0), ks.stride(1), mask_batch,
        torch.get_num_threads())
    return None if failed else out


def float_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                    extra_flags: tuple[str, ...] = ()) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(hd)) v over float32 K/V by the C++ kernel; None where it does not apply (as
    int8_attention). q (B, H, R, hd), k, v (B, H, S, hd) float32, visible bool (B | 1, 1, R, S)."""
    if not _kernel_reads(q, k, v, visible, torch.float32):
        return None
    lib = attention_library(extra_flags)
    if lib is None:
        return None
    B, H, R, hd = q.shape
    q, (mask, mask_batch) = q.contiguous(), _mask_bytes(visible)  # q (B, H, R, hd)
    out = torch.empty_like(q)  # (B, H, R, hd)
    failed = lib.kvbench_float_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), out.data_ptr(), B, H, R, k.shape[2], hd,
        k.stride(0), k.stride(1), mask_batch, torch.get_num_threads())
    return None if failed else out
