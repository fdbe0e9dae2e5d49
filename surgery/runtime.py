"""Process-level settings: malloc tuning for CPU training loops, the machine's memory (and
torch running out of it, told as an :class:`~surgery.errors.OutOfMemory`), the process's
rank under torchrun (who prints and writes), and how a command-line process ends.

glibc's malloc returns freed blocks of a few MB to the kernel (its trim and mmap
thresholds), so a training step that frees its gradients and activations and allocates
them again next step pays a page fault for every 4 KB page, every step: profiled on
fine-tuning a 784-1000x3-10 net, 270k minor faults per epoch and some 4% of its time.
:func:`keep_freed_memory` raises both thresholds once per process (as the PyTorch CPU
performance guides do with jemalloc or tcmalloc), so freed blocks are reused instead.
Set ``SURGERY_MALLOC_TUNING=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys

import torch

from .errors import OutOfMemory

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = False


def keep_freed_memory(trim_bytes: int = 1 << 30, mmap_bytes: int = 32 << 20) -> bool:
    """Keep up to ``trim_bytes`` of freed memory in the heap and serve blocks below
    ``mmap_bytes`` (glibc's maximum) from it. Returns whether the settings were applied
    (only on Linux with glibc, once per process, unless ``SURGERY_MALLOC_TUNING=0``)."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("SURGERY_MALLOC_TUNING", "1") == "0":
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))
    return _done


@functools.cache
def machine_memory() -> int | None:
    """Bytes of physical memory on this machine (None where the OS does not say); asked once."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def out_of_memory(e: BaseException) -> OutOfMemory | None:
    """``e`` as an :class:`OutOfMemory` saying what to make smaller, when it is torch (or
    Python) failing to allocate memory on the CPU or a GPU; None for any other error."""
    text = str(e)
    gpu = isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in text
    if not (gpu or isinstance(e, MemoryError) or "can't allocate memory" in text):
        return None
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    if asked and asked.group(1).endswith(" bytes"):
        size = f"{int(asked.group(1).split()[0]) / 2**30:,.1f} GiB"
    else:
        size = asked.group(1) if asked else None
    have = machine_memory()
    where = f"this machine's {have / 2**30:.1f} GiB" if have else "this machine's memory"
    where = "the GPU's memory" if gpu else where
    return OutOfMemory(
        f"out of memory{f' (torch asked for {size} more)' if size else ''}: the network, a batch or the data "
        f"needs more than {where}. Use fewer units per layer, a smaller finetune.batch_size or "
        "pretrain.batch_size, or a smaller data.limit; an experiment can train fewer members at once "
        "(experiment.population: off, or a smaller N). Files already written are kept; run the same command "
        "again once it fits (an experiment continues with its unfinished cells).")


def rank() -> int:
    """This process's rank under ``torchrun`` (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process prints and writes: rank 0, or the only process."""
    return rank() == 0


def distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``: under ``torchrun`` (``WORLD_SIZE`` > 1) the process
    group is set up (gloo on the CPU, nccl on GPUs) and each rank takes the GPU of its
    ``LOCAL_RANK``; otherwise ``(0, 1, device)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size(), device


def exit_status(status: int) -> int:
    """End a command-line process with ``status``: returns it when no process group is
    set up; under ``torchrun`` destroys the group, flushes stdout and stderr and leaves at
    once (``os._exit``), since a process group a DDP module used outlives
    ``destroy_process_group`` (torch 2.13) and its gloo threads torn down during interpreter
    finalization abort the process now and then (SIGABRT, "terminate called without an
    active exception") after every file was written. Call it only where the process ends."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return status
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
