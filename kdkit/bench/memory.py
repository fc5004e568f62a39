"""Peak memory one call adds on CPU: the growth of the process's resident set (Linux ``/proc/self``).

Why resident-set growth and not an allocator counter: CPU tensors have no `torch.cuda.max_memory_allocated`, and
what a user's machine runs out of is resident memory. Freed memory is first handed back (``malloc_trim``) and the
high-water mark reset (``clear_refs``), so the peak is the call's own."""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def trim() -> None:
    """Collect garbage and hand glibc's free heap memory back to the system (no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def start_peak() -> int | None:
    """Trim, reset the high-water mark to the current resident set and return that base (None where the kernel
    does not allow the reset)."""
    trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    return status_bytes("VmRSS")


def peak_since(base: int | None) -> float:
    """Bytes the resident set peaked above `base` (NaN when `start_peak` could not reset the mark)."""
    return float("nan") if base is None else float(status_bytes("VmHWM") - base)


def resident_growth(fn):
    """(peak resident-set growth in bytes during ``fn()``, its result)."""
    base = start_peak()
    out = fn()
    return peak_since(base), out
