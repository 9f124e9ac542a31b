"""sacrum_masks.memory: freed memory is kept and reused, measured by the kernel's page-fault counter.

Each case runs in a fresh Python process (malloc options are per process): it allocates and frees a
200 MB block (libc malloc (above glibc's 32 MB mmap threshold, like a forward pass's activations through torch's allocator) a few times
and reports the minor page faults of the later rounds (``getrusage``). With glibc's defaults every round
maps the block afresh and faults all its pages; with :func:`keep_freed_memory` the later rounds reuse it.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sacrum_masks import memory

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ctypes, json, resource
from sacrum_masks.memory import keep_freed_memory
ok = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def round_():   # as torch's CPU allocator: malloc, touch every page, free (no huge pages asked for)
    ptr = libc.malloc(200 * 2**20); ctypes.memset(ptr, 1, 200 * 2**20); libc.free(ptr)
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round_()
print(json.dumps({"applied": ok, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "py"), **env))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_doctests():
    result = doctest.testmod(memory)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    pages = 200 * 2**20 // 4096
    system = probe(SACRUM_MALLOC="system")
    kept = probe()
    assert system["applied"] is False and kept["applied"] is True
    assert system["faults"] >= 3 * pages * 0.9   # every round faults the whole block again
    assert kept["faults"] < pages * 0.1          # the block is reused


def test_tunables_reach_a_child_process():
    """The GLIBC_TUNABLES form (for nnUNetv2_* children) is read by glibc: same reuse without mallopt."""
    env = memory.tunables_env({})
    child = probe(SACRUM_MALLOC="system", **env)
    assert child["faults"] < 200 * 2**20 // 4096 * 0.1
