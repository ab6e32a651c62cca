"""Allocations that cannot fit are refused up front with a line naming what to lower; the allocator's own
failure, if an estimate misses one, becomes the same kind of advice, never a traceback."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, write_yaml
from kvbench import memory
from kvbench.cli import app
from kvbench.cli.common import fail_cleanly
from kvbench.config import ModelConfig
from kvbench.model import Linear
from kvbench.kernels import decode_kernel
from kvbench.weights import model_bytes, new_model
from test_bad_input import assert_refused

TINY = str(CONFIGS / "tiny.yaml")
HUGE = 1_000_000_000_000


def test_a_sliding_window_that_cannot_fit_names_window(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", TINY, "--strategies", "sliding", "--window",
                                 "1000000000", "--new-tokens", "2"])
    assert_refused(result, "--window", "GiB", "available")


def test_a_batch_that_cannot_fit_names_batch_size(runner):
    result = runner.invoke(app, ["kv-evaluate", "--config", TINY, "--batch-size", "100000000", "--new-tokens", "2"])
    assert_refused(result, "--batch-size", "static cache")


@pytest.mark.parametrize("key", ["vocab_size", "max_seq_len"])
def test_a_config_too_large_for_memory_names_its_key(runner, tmp_path, key):
    result = runner.invoke(app, ["evaluate", "--config", str(write_yaml(tmp_path, **{key: HUGE}))])
    assert_refused(result, key, "TiB")


def test_model_bytes_are_the_real_models():
    config = ModelConfig(**{**dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=97, max_seq_len=128)})
    model = new_model(config)
    real = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert model_bytes(config, device="meta") == real and model_bytes(config, torch.bfloat16) == real // 2
    # float32 on CPU packs a second copy of every Linear weight for oneDNN: counted too
    packed = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Linear))
    expected = real + (packed if decode_kernel(torch.device("cpu"), torch.float32) == "onednn" else 0)
    assert model_bytes(config, torch.float32, "cpu") == expected


def test_cache_bytes_follow_the_formula():
    config = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=97, max_seq_len=128)
    formula = 2 * 2 * 4 * 8 * 100 * 3 * 4  # K and V x layers x heads x head_dim x tokens x batch x float32
    assert memory.cache_bytes(config, "static", 3, 100, None, torch.float32) == formula
    assert memory.cache_bytes(config, "dynamic", 3, 100, None, torch.float32) == formula
    assert memory.cache_bytes(config, "sliding", 3, 100, 10, torch.float32) == formula // 10
    assert memory.cache_bytes(config, "naive", 3, 100, None, torch.float32) == 0


def test_available_memory_is_read_from_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert memory.available_bytes("cpu") == 1000 * 1024


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 256000000000 bytes. Error code 12 (Cannot allocate memory)",
    "DefaultCPUAllocator: not enough memory: you tried to allocate 256000000000 bytes."])
def test_the_allocators_failure_becomes_advice(capsys, message):
    @fail_cleanly
    def command():
        raise RuntimeError(message)

    with pytest.raises(Exception) as exit_:
        command()
    assert getattr(exit_.value, "exit_code", None) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "238.4 GiB" in err and "--batch-size" in err


def test_other_runtime_errors_are_not_disguised_as_memory():
    @fail_cleanly
    def command():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        command()


def test_available_memory_on_cuda_is_its_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (123, 456))
    assert memory.available_bytes("cuda:0") == 123
