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


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by two machines stays right)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(source: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile kvbench/csrc/<source> into a shared library (or find it built); raises OSError or
    subprocess.CalledProcessError with the compiler's message."""
    cxx = compiler()
    if cxx is None:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    code = resources.files("kvbench").joinpath("csrc", source).read_text()
    flags = [*FLAGS, *extra_flags]
    key = hashlib.sha256("\0".join([code, cxx, *flags, cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{Path(source).stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        src, out = Path(work) / source, Path(work) / target.name
        src.write_text(code)
        subprocess.run([cxx, *flags, str(src), "-o", str(out)], check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: a process racing us loads a whole library or builds its own
    return target


@cache
def load(source: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled library of kvbench/csrc/<source>, or None (reason in why_not[source])."""
    if os.environ.get("KVBENCH_NO_NATIVE"):
        why_not[source] = "KVBENCH_NO_NATIVE is set"
        return None
    try:
        return ctypes.CDLL(str(build(source, extra_flags)))
    except subprocess.CalledProcessError as error:
        why_not[source] = f"compiling {source} failed: {(error.stderr or '').strip().splitlines()[-1:]}"
    except OSError as error:
        why_not[source] = f"{source}: {error}"
    return None


# --- int8 attention (kvbench/csrc/int8_attention.cpp) ----------------------------------------------------------

INT8_ATTENTION = "int8_attention.cpp"


def int8_attention_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    lib = load(INT8_ATTENTION, extra_flags)
    if lib is not None and not hasattr(lib, "declared"):
        lib.kvbench_int8_attention.restype = ctypes.c_int
        lib.kvbench_int8_attention.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 10 + [ctypes.c_int]
        lib.kvbench_int8_attention_isa.restype = ctypes.c_char_p
        lib.declared = True
    return lib


def int8_attention_isa(extra_flags: tuple[str, ...] = ()) -> str | None:
    """'avx512' or 'generic': which loops the built kernel runs; None where it could not be built."""
    lib = int8_attention_library(extra_flags)
    return None if lib is None else lib.kvbench_int8_attention_isa().decode()


def int8_attention(q: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
                   visible: torch.Tensor, extra_flags: tuple[str, ...] = ()) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(hd)) v over int8 k = kq * ks, v = vq * vs, by the C++ kernel; None where it does not
    apply (not on the CPU, head_dim not 64 or 128, a layout it does not read, no compiler), so that the caller
    runs its own. q (B, H, R, hd); kq, vq (B, H, S, hd) int8 with keys hd apart (views of a longer cache are
    fine); ks, vs (B, H, S, 1) float32; visible bool (B, 1, R, S); returns (B, H, R, hd) float32."""
    B, H, R, hd = q.shape
    S = kq.shape[2]
    if q.device.type != "cpu" or hd not in (64, 128) or S == 0:
        return None
    if any(t.stride(-1) != 1 or t.stride(-2) != hd or t.stride() != kq.stride() for t in (kq, vq)):
        return None
    if ks.dtype != torch.float32 or any(t.stride(2) != 1 or t.stride() != ks.stride() for t in (ks, vs)):
        return None
    lib = int8_attention_library(extra_flags)
    if lib is None:
        return None
    q32 = q.to(torch.float32).contiguous()  # (B, H, R, hd)
    shared = visible.shape[0] == 1 or visible.stride(0) == 0  # one mask for every batch row
    mask = (visible[:1, 0] if shared else visible[:, 0]).contiguous().view(torch.uint8)  # (B | 1, R, S)
    out = torch.empty_like(q32)  # (B, H, R, hd)
    failed = lib.kvbench_int8_attention(
        q32.data_ptr(), kq.data_ptr(), ks.data_ptr(), vq.data_ptr(), vs.data_ptr(), mask.data_ptr(),
        out.data_ptr(), B, H, R, S, hd, kq.stride(0), kq.stride(1), ks.stride(0), ks.stride(1),
        0 if shared else R * S, torch.get_num_threads())
    return None if failed else out
