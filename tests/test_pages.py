"""Huge pages: what the allocator was asked, what the kernel allows, what the process got, and that the CLI
asks before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvbench import pages


def test_system_policy_is_the_bracketed_word(tmp_path, monkeypatch):
    policy = tmp_path / "enabled"
    policy.write_text("always [madvise] never\n")
    monkeypatch.setattr(pages, "SYSTEM_POLICY", policy)
    assert pages.system_policy() == "madvise"
    monkeypatch.setattr(pages, "SYSTEM_POLICY", tmp_path / "absent")
    assert pages.system_policy() is None


def test_huge_page_bytes_read_from_smaps(tmp_path, monkeypatch):
    smaps = tmp_path / "smaps_rollup"
    smaps.write_text("Rss:  1000 kB\nAnonymous:  900 kB\nAnonHugePages:    409600 kB\nShmemHugePages: 0 kB\n")
    monkeypatch.setattr(pages, "PROCESS_MEMORY", smaps)
    assert pages.huge_page_bytes() == 409600 * 1024
    monkeypatch.setattr(pages, "PROCESS_MEMORY", tmp_path / "absent")
    assert pages.huge_page_bytes() is None


@pytest.mark.parametrize("state, says", [
    ({"torch_allocator": "1", "system_policy": "madvise", "process_bytes": 412_000_000}, "huge pages: 412 MB"),
    ({"torch_allocator": "0", "system_policy": "madvise", "process_bytes": 0}, "off (THP_MEM_ALLOC_ENABLE=0)"),
    ({"torch_allocator": "1", "system_policy": "never", "process_bytes": 0}, "policy is never"),
    ({"torch_allocator": "1", "system_policy": "madvise", "process_bytes": 0}, "none in use"),
    ({"torch_allocator": "yes", "system_policy": "madvise", "process_bytes": 0}, "off (THP_MEM_ALLOC_ENABLE=yes)"),
    ({"torch_allocator": "", "system_policy": "madvise", "process_bytes": 0}, "off (THP_MEM_ALLOC_ENABLE=(empty))"),
    ({"torch_allocator": "1", "system_policy": None, "process_bytes": None}, "not reported"),
])
def test_describe(state, says):
    assert says in pages.describe(state)


# The CLI's entry point runs `kvbench --help` (which loads torch, as every command does), then a buffer of
# 64 MB is touched: with the variable the CLI sets, it lands in huge pages; opted out, it does not.
TOUCH_AFTER_MAIN = """
import sys
from kvbench.cli import main
sys.argv = ["kvbench", "--help"]
try:
    main()
except SystemExit:
    pass
import torch
from kvbench.pages import huge_page_bytes
before = huge_page_bytes()
buffer = torch.empty(16 << 20)
buffer.fill_(1.0)
print(huge_page_bytes() - before, file=sys.stderr)
"""


def _huge_bytes_after_main(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != pages.HUGE_PAGES_ENV}
    if env_value is not None:
        env[pages.HUGE_PAGES_ENV] = env_value
    done = subprocess.run([sys.executable, "-c", TOUCH_AFTER_MAIN], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.strip().splitlines()[-1])


@pytest.mark.skipif(pages.system_policy() != "madvise" or pages.huge_page_bytes() is None,
                    reason="needs a kernel that gives huge pages to buffers that ask (policy madvise)")
def test_cli_puts_large_buffers_in_huge_pages_unless_told_not_to():
    assert _huge_bytes_after_main(None) >= 32 << 20  # most of the 64 MB (its ends need not be 2 MB-aligned)
    assert _huge_bytes_after_main("0") == 0
