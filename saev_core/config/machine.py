"""The machine a job runs on: the device (``auto`` resolved), the memory it has free and the check that refuses a
job before it allocates what will not fit, and where generated data is cached."""

import os
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]


def resolve_device(device: Device) -> str:
    """auto -> cuda when available, else cpu. Imports torch lazily (Dagster imports this module)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from saev_core.errors import UserError

        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here; pass --device cpu or auto.")
    return device


def available_memory(device: str) -> int | None:
    """Bytes a new allocation may use now: the free memory of a CUDA device, else the kernel's MemAvailable (RAM
    not needed by others, page cache included); None when it cannot be known."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def size_text(nbytes: float) -> str:
    """A byte count for people (GB, MB or kB)."""
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def check_memory(nbytes: int, device: str, what: str, fix: str) -> None:
    """Refuse, before allocating, a job whose arrays (``what``, with how they were counted) would not fit in the
    memory ``device`` has free now: the estimate and what is available go in the message, as the recording's
    --dry-run prints them."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        from saev_core.errors import UserError

        raise UserError(f"{what} need about {size_text(nbytes)} but {device} has {size_text(free)} available. {fix}")


def cache_dir() -> str:
    """Where generated data lives: $SAEV_CACHE, else ~/.cache/saev."""
    return os.environ.get("SAEV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "saev")
