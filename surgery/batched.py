"""Arithmetic over K models at once: ``a[k] @ b[k]`` for every member of a population.

One ``bmm`` on a GPU, where a population exists to turn K small launches into one; a loop
of GEMMs on a CPU, which measured faster there (5 x [1000, 500] @ [500, 500]: 22 ms looped,
34 ms as one bmm) and computes exactly what each member alone computes. K = 1 is the
single-model case through the same code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALIGN = 16  # floats: every member's block starts on a 64-byte boundary


def loops_on(device: torch.device) -> bool:
    """Whether a population on ``device`` runs its GEMMs member by member (every device but CUDA)."""
    return device.type != "cuda"


def member_tensor(K: int, shape: tuple[int, ...], device: torch.device, fill: float = 0.0) -> Tensor:
    """A [K, *shape] tensor filled with ``fill`` whose member blocks each start on a 64-byte
    boundary. A CPU GEMM's rounding can depend on where its operands sit in memory, so
    members laid out like this compute bit for bit what each computes alone (where its
    tensors start at an allocation, which is 64-byte aligned)."""
    n = math.prod(shape)
    step = -(-n // ALIGN) * ALIGN
    inner = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    return torch.full((K * step,), fill, device=device).as_strided((K, *shape), (step, *inner))


def matmul(a: Tensor, b: Tensor, loop: bool, out: Tensor | None = None) -> Tensor:
    """``out[k] = a[k] @ b[k]`` for every k: a loop of ``mm`` or one ``bmm``."""
    if out is None:
        out = torch.empty(a.shape[0], a.shape[1], b.shape[2], device=a.device, dtype=a.dtype)
    if not loop:
        return torch.bmm(a, b, out=out)
    for k in range(a.shape[0]):
        torch.mm(a[k], b[k], out=out[k])
    return out


class RowGather:
    """``out[k] = xs[k][idx[k]]``: each member's batch from its own input in its own order.

    ``xs`` may be one tensor shared by every member (the data) or one per member (the
    output of each member's layers below; stacked once here when the GEMMs are batched)."""

    def __init__(self, xs: list[Tensor], loop: bool):
        self.xs, self.loop = xs, loop
        self.shared = all(x is xs[0] for x in xs)
        if not loop and not self.shared:
            self.flat = torch.cat(xs)
            self.offsets = torch.arange(len(xs), device=xs[0].device).unsqueeze(1) * xs[0].shape[0]

    def __call__(self, idx: Tensor, out: Tensor) -> Tensor:
        """Fill ``out`` [K, b, d] with the rows ``idx`` [K, b] of each member's input."""
        if self.loop:
            for k in range(idx.shape[0]):
                torch.index_select(self.xs[k], 0, idx[k], out=out[k])
            return out
        if self.shared:
            rows = self.xs[0].index_select(0, idx.reshape(-1))
        else:
            rows = self.flat.index_select(0, (idx + self.offsets).reshape(-1))
        return out.copy_(rows.view(out.shape))
