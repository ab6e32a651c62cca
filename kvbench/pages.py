"""Whether this process's large buffers sit in transparent huge pages, as meta.json and profile record it.

Deliberately free of torch: kvbench.cli sets HUGE_PAGES_ENV before torch is imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# torch's CPU allocator reads this once, at its first allocation: 1 puts buffers of 2 MB or more in huge pages
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
SYSTEM_POLICY = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROCESS_MEMORY = Path("/proc/self/smaps_rollup")


def system_policy() -> str | None:
    """The kernel's setting, the bracketed word of "always [madvise] never"; None where there is none."""
    try:
        chosen = re.search(r"\[(\w+)\]", SYSTEM_POLICY.read_text())
    except OSError:
        return None
    return chosen.group(1) if chosen else None


def huge_page_bytes() -> int | None:
    """Bytes of this process's anonymous memory in huge pages now; None where the kernel does not say."""
    try:
        found = re.search(r"^AnonHugePages:\s+(\d+) kB", PROCESS_MEMORY.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def huge_pages() -> dict:
    """What was asked (torch's allocator, the kernel's policy) and what happened (bytes in huge pages)."""
    return {"torch_allocator": os.environ.get(HUGE_PAGES_ENV, "unset"), "system_policy": system_policy(),
            "process_bytes": huge_page_bytes()}


def describe(pages: dict) -> str:
    """One line for a table's caption: "huge pages: 412 MB" or why there are none."""
    if pages["process_bytes"]:
        return f"huge pages: {pages['process_bytes'] / 1e6:.0f} MB"
    if pages["torch_allocator"] != "1":  # torch reads 1 as on; 0, and anything it does not know, as off
        return f"huge pages: off ({HUGE_PAGES_ENV}={pages['torch_allocator'] or '(empty)'})"
    if pages["process_bytes"] is None:
        return "huge pages: not reported by this system"
    if pages["system_policy"] == "never":
        return "huge pages: off (the kernel's policy is never)"
    return "huge pages: none in use (no buffer of 2 MB or more, or the kernel had none free)"
