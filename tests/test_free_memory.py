"""After a training node the bridge hands the freed host heap back to the OS: glibc keeps the pages of
freed small allocations otherwise, and the next training node's memory check (which reads the free
memory) would refuse on a CPU-only ComfyUI."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from helpers import load_pack

PACK = load_pack()
bridge = sys.modules[PACK.__name__ + ".nodes.comfy_bridge"]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_libc() is None, reason="needs Linux with glibc (malloc_trim)")
def test_free_memory_returns_freed_heap_pages_to_the_os():
    libc = _libc()
    blocks = [libc.malloc(4000) for _ in range(50_000)]  # ~190 MiB of small blocks, below glibc's mmap threshold
    for p in blocks:
        ctypes.memset(p, 1, 4000)
    top = libc.malloc(4000)  # a live block above them: freeing what lies below returns nothing by itself
    try:
        before = rss_bytes()
        for p in blocks:
            libc.free(p)
        kept = before - rss_bytes()
        bridge.free_memory()
        returned = before - rss_bytes()
    finally:
        libc.free(top)
    assert kept < 32 << 20, kept >> 20  # glibc keeps the freed pages (why the bridge trims)
    assert returned > 150 << 20, returned >> 20
