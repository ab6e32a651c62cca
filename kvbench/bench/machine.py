"""What machine and software a result came from, for meta.json."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import kvbench
from kvbench.errors import KVBenchError

REPO = Path(kvbench.__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def git_state() -> dict:
    """Commit of the kvbench checkout the code runs from (None when installed from a package)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if commit else None}


def machine_info(device: torch.device) -> dict:
    info = {
        "kvbench_version": kvbench.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_name": device_name(device),
        **git_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, cuda_version=torch.version.cuda,
                    gpu_driver=_nvidia_driver())
    return info


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check_threads(threads: int | None, resuming: Path | None = None) -> None:
    """More torch threads than cores only slows a run down, and far more crashes torch (a segfault at 100000)."""
    cores = available_cores()
    if threads is None or threads <= cores:
        return
    if resuming is None:
        raise KVBenchError(f"--threads {threads} exceeds the {cores} cores this machine lets kvbench use; "
                           f"give at most {cores}")
    raise KVBenchError(f"{resuming} records --threads {threads}, more than the {cores} cores this machine lets "
                       "kvbench use; resume on a machine with that many cores, or start a new run")
