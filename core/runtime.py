"""Process-wide settings for running networks on the CPU: glibc's allocator keeps large buffers for the next call.

Why: glibc's malloc serves a block above its mmap threshold (dynamic, at most 32 MiB on 64-bit) with a mapping of its
own and unmaps it when freed, and gives the heap's free top back to the kernel above its trim threshold (mallopt(3)).
A CNN's activations are such blocks (EfficientNet-B0 at 512 px: 24 MiB per frame for its widest one), so every call
took them fresh from the kernel, one zeroed page at a time: 8 frames of 512 px cost about 370,000 minor page faults
per call, and batching ran at half the single-frame rate (bench/README.md, ``python -m bench.heatmaps``). With the
thresholds raised, freed activations stay in the heap and the next call reuses them: no faults after the first call.

The cost is memory: the heap keeps its high-water mark instead of shrinking between calls (up to twice the threshold
of free memory at its top stays), so a process's resident size stays near its peak. glibc only; on other C libraries
(musl, macOS, Windows) this does nothing.

Threads: the settings are process-wide, but a thread other than the main thread allocates from an arena of its own,
whose heaps hold at most 64 MiB (glibc's ``HEAP_MAX_SIZE``): blocks larger than that are still mapped and unmapped per
call there, and a heap that empties entirely is unmapped. The CLI and Ray tasks run their work on the main thread and
get the whole effect; a Streamlit session (a script thread) gets it for blocks under 64 MiB.

``IOAI_TUNE_ALLOCATOR=0`` keeps glibc's defaults, and so do thresholds the environment sets for glibc itself
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or ``GLIBC_TUNABLES``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import threading

__all__ = ["OPT_OUT_ENV", "tune_allocator"]

OPT_OUT_ENV = "IOAI_TUNE_ALLOCATOR"  # "0": keep glibc's default thresholds
_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD_CAP = 1 << 30  # at most 1 GiB, and at most an eighth of the machine's memory
_GLIBC_MMAP_MAX = 32 << 20  # the highest threshold glibc's own heuristic reaches; older glibc refuses more
_INT_MAX = 2**31 - 1  # mallopt takes an int
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_tuned: bool | None = None  # None: not decided yet in this process

logger = logging.getLogger(__name__)


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds once per process, before the first model runs; True when they are set.

    Idempotent and thread-safe: the first call decides, later calls return its answer. False on other C libraries,
    with ``IOAI_TUNE_ALLOCATOR=0``, when the environment tunes glibc's thresholds itself, or when glibc refuses.
    """
    global _tuned
    with _lock:
        if _tuned is None:
            _tuned = _set_thresholds()
        return _tuned


def _left_to_environment() -> bool:
    """Whether the environment opts out or sets glibc's thresholds itself (which we then leave alone)."""
    if os.environ.get(OPT_OUT_ENV, "").strip() == "0":
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ for name in _GLIBC_ENV) or "threshold" in tunables


def _threshold() -> int:
    """The mmap threshold: 1 GiB, or an eighth of physical memory on a small machine (never below glibc's 32 MiB)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return _THRESHOLD_CAP
    return max(_GLIBC_MMAP_MAX, min(_THRESHOLD_CAP, memory // 8))


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or _left_to_environment():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = _threshold()
    if not mallopt(_M_MMAP_THRESHOLD, threshold):
        threshold = _GLIBC_MMAP_MAX  # older glibc refuses more than HEAP_MAX_SIZE / 2
        if not mallopt(_M_MMAP_THRESHOLD, threshold):
            return False
    trim = min(_INT_MAX, 2 * threshold)  # glibc's own ratio when it adjusts the thresholds dynamically
    if not mallopt(_M_TRIM_THRESHOLD, trim):
        return False
    logger.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB", threshold >> 20, trim >> 20)
    return True
