"""Keep freed host memory in the process, so every call does not page fresh buffers in again.

XLA:CPU allocates each execution's output and temporary buffers with ``malloc``
and frees them afterwards. glibc serves any allocation above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and returns it on ``free``, so
a model whose activations are tens of megabytes (a CNN at 224x224, a long
batch of tokens) pays page faults and kernel zeroing for every buffer on every
call: on a 2-core AMD EPYC (AVX2) the reference CNN at 224x224, batch 16, spent
about a quarter of its int8 time there. ``retain_host_memory()`` tells glibc to
serve every allocation from its heap and never give the heap's top back, so
the buffers of one call are reused by the next.

This is process-wide and one-way: the process keeps its peak heap size for
its lifetime (as tcmalloc and jemalloc, the allocators serving stacks often
preload, also do). The command line's ``serve``, ``infer``, ``embed`` and
``demo`` call it at start unless ``JAXOPT_SERVE_RETAIN_MEMORY=0``; library
users call it once in a serving process. On a C library other than glibc it
does nothing and returns ``False``.
"""

from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

ENV = "JAXOPT_SERVE_RETAIN_MEMORY"


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError on other C libraries)
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def retain_host_memory(*, top_pad_bytes: int = 64 << 20) -> bool:
    """Make glibc keep freed memory for reuse (no ``mmap`` per large buffer, no trimming); ``True`` if applied.

    Args:
        top_pad_bytes: extra bytes the heap grows by at a time, so a growing
            workload asks the kernel less often (default 64 MiB).

    Raises:
        ValueError: ``top_pad_bytes`` negative or above 2 GiB.

    Example:
        >>> from jaxopt_serve.engine import retain_host_memory
        >>> retain_host_memory()   # Linux with glibc
        True
    """
    if not isinstance(top_pad_bytes, int) or not 0 <= top_pad_bytes < 2**31:
        raise ValueError(f"top_pad_bytes must be an int in [0, 2**31), got {top_pad_bytes!r}")
    libc = _glibc()
    if libc is None:
        return False
    # One arena: a thread's own arena (XLA runs programs on its worker threads) is capped at 64 MiB heaps and
    # maps anything larger afresh whatever M_MMAP_MAX says; the main arena's heap has no such cap.
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= libc.mallopt(_M_TOP_PAD, top_pad_bytes) == 1
    return bool(ok)


def retain_host_memory_from_env() -> bool:
    """``retain_host_memory()`` unless ``JAXOPT_SERVE_RETAIN_MEMORY`` is ``0`` (the command line's default)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value == "1" and retain_host_memory()
