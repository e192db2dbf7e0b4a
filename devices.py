"""Which device to run on: the best one available, and a clear error for one that cannot be used;
and giving freed host memory back to the operating system between the phases of a run."""

from __future__ import annotations

import ctypes
import ctypes.util

import torch


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError that says why it cannot be used here and what
    to pass instead (instead of torch's assertion deep inside the first .to())."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: no Apple MPS backend here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev


def best_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _glibc_malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_freed_memory() -> bool:
    """Give the host memory freed so far back to the operating system (glibc's malloc_trim(0));
    False where that cannot be done. Called between the phases of a run (after an epoch's
    training steps, after each test task, when the trained model is dropped), not inside them.

    Why: a CPU training step allocates and frees gigabytes of activations, most of them in pieces
    under glibc's mmap threshold (128 KB at first, raised with each larger piece freed, up to 32
    MB), so they come from the heap, and glibc keeps a freed heap for the next allocation instead
    of returning it. With lengths that change from batch to batch the heap fragments and grows: a
    135M-model LoRA run's resident memory climbed to ~11 GB in training and stayed there through
    generation and scoring, two such runs filled this 24 GB machine and the kernel killed one
    (docs/performance.md, "Host memory"). Trimming once per phase costs ~0.2 s; trimming after
    every step would make each next step ~30% slower (its pages are faulted in afresh), so the
    steps of an epoch keep their heap.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
