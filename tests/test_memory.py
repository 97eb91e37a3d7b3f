"""glibc heap tuning (qflare/memory.py): applied in a child process, since it changes the process's allocator."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qflare.memory import limit_arenas


def test_arena_count_is_checked() -> None:
    with pytest.raises(ValueError, match="arena count"):
        limit_arenas(0)


def test_arena_cap_holds_under_threads() -> None:
    # Eight threads each allocating and freeing buffers: with the cap, glibc creates at most 2 arenas (main
    # included), which malloc_info reports as <heap nr=...> elements.
    code = r"""
import ctypes, ctypes.util, threading, os, tempfile
from qflare.memory import limit_arenas
assert limit_arenas(2)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    for _ in range(50):
        b = bytearray(1 << 20)
        del b
ts = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f)); libc.fclose(ctypes.c_void_p(f))
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert 1 <= int(out.stdout.strip()) <= 2
