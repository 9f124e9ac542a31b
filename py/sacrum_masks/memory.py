"""glibc malloc settings for nnU-Net's large tensors: freed memory is kept and reused, never handed back.

By default glibc serves every allocation above 32 MB with a fresh ``mmap`` and returns it with
``munmap`` when freed. A 3d_fullres forward pass on a 12x384x384 tile allocates and frees a few GB of
activations, so every pass page-faults (and the kernel zeroes) all of it again: measured on 2 CPU cores,
half the pass is kernel time (``bench/bench_engine.py``, "allocator" row; about 2.2 million minor faults
per tile). With ``M_MMAP_MAX = 0`` and the largest ``M_TRIM_THRESHOLD`` every allocation comes from the
heap, and a freed block is reused by the next pass: 0 faults per pass in the steady state, the same
arithmetic (voxel for voxel the same masks), at the cost of a process keeping its peak heap until it
ends. This is the tuning PyTorch's CPU performance guide gets from jemalloc or tcmalloc, without a
preloaded library.

``SACRUM_MALLOC=system`` leaves glibc's defaults (the benchmark's baseline row).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: the largest value mallopt takes (an int)
KEEP_ALL = 2**31 - 1

_applied: list[bool] = []


def _switched_off(env) -> bool:
    return env.get("SACRUM_MALLOC", "").strip().lower() == "system"


def keep_freed_memory(env=None) -> bool:
    """Set the malloc options of this process (once); False where they cannot be set or are switched off.

    >>> keep_freed_memory({"SACRUM_MALLOC": "system"})
    False
    """
    env = os.environ if env is None else env
    if _switched_off(env):
        return False
    if _applied:
        return _applied[0]
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_ALL))
    except (OSError, AttributeError):   # not glibc (musl, macOS): its own allocator, left as it is
        ok = False
    _applied.append(ok)
    return ok


def tunables_env(env=None) -> dict:
    """The same settings for a child process (``GLIBC_TUNABLES``), e.g. ``nnUNetv2_train``; {} when switched off.

    >>> tunables_env({})["GLIBC_TUNABLES"]
    'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647'
    >>> tunables_env({"SACRUM_MALLOC": "system"})
    {}
    >>> tunables_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4"})["GLIBC_TUNABLES"]
    'glibc.malloc.mmap_max=4'
    """
    env = os.environ if env is None else env
    if _switched_off(env):
        return {}
    ours = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={KEEP_ALL}"
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.mmap_max" in current:   # set already (by us, or by the user: theirs wins)
        return {"GLIBC_TUNABLES": current}
    return {"GLIBC_TUNABLES": f"{current}:{ours}" if current else ours}
