"""How much memory this process may still take, and a resize that cannot fit refused up front.

Available memory is the smallest of what the machine has free (``MemAvailable`` in
/proc/meminfo, else ``os.sysconf``), what the process's cgroup still allows (a container's
limit: cgroup v2 ``memory.max`` less ``memory.current``, or v1's ``memory.limit_in_bytes`` less
``memory.usage_in_bytes``) and what ``RLIMIT_AS`` leaves of the address space. No new
dependency: files and calls every Linux has; elsewhere only what ``os.sysconf`` knows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from detfit.errors import DetfitError

CGROUP = Path("/sys/fs/cgroup")
UNLIMITED = 1 << 62  # what cgroup v1 reports as "no limit" is about 2**63


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What this process's cgroup still allows (None without a limit)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            folder = CGROUP / rel
            limit, used = folder / "memory.max", folder / "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            folder = CGROUP / "memory" / rel
            if not folder.is_dir():
                folder = CGROUP / "memory"
            limit, used = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
        else:
            continue
        cap, now = _read_int(limit), _read_int(used)
        if cap is not None and cap < UNLIMITED:
            return max(cap - (now or 0), 0)
    return None


def _address_space_available() -> int | None:
    """What ``RLIMIT_AS`` leaves of this process's address space (None without a limit)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        return max(soft - pages * os.sysconf("SC_PAGE_SIZE"), 0)
    except (ImportError, OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """The memory this process can still take, in bytes (None: not known here)."""
    known = [
        n
        for n in (_meminfo_available(), _cgroup_available(), _address_space_available())
        if n is not None
    ]
    return min(known) if known else None


def _largest(value: Any) -> int | None:
    values = value if isinstance(value, list | tuple) else [value]
    sides = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return max(sides) if sides else None


def resized_batch_bytes(options: Mapping[str, Any], batch_size: int) -> int | None:
    """Bytes of the largest batch the model's resize can make (float32, 3 channels), from the
    model options: the short side at most ``min_size`` and the long side at most ``max_size``
    (SSD: a ``size`` square). A lower bound of what a step needs: the network's activations
    come on top. None when the options do not say."""
    short, long = _largest(options.get("min_size")), _largest(options.get("max_size"))
    if short is not None and long is not None:
        area = min(short, long) * long
    elif (side := _largest(options.get("size"))) is not None:
        area = side * side
    else:
        return None
    return batch_size * 3 * area * 4


def check_resize_fits(
    options: Mapping[str, Any],
    batch_size: int,
    eval_batch_size: int = 1,
    available: Callable[[], int | None] | None = None,
) -> None:
    """Refuse, in one line, model options whose resized batch alone needs more memory than this
    process can still take (a ``min_size``/``max_size`` far above the images, a big batch)."""
    batch = max(batch_size, eval_batch_size)
    need = resized_batch_bytes(options, batch)
    if need is None:
        return
    free = (available or available_bytes)()
    if free is None or need <= free:
        return
    sizes = ", ".join(f"{k}={options[k]}" for k in ("min_size", "max_size", "size") if k in options)
    which = "batch_size" if batch_size >= eval_batch_size else "eval_batch_size"
    raise DetfitError(
        f"model_options {sizes} with {which}={batch}: the resized batch alone needs "
        f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory available here; "
        "choose smaller sizes or a smaller batch"
    )
