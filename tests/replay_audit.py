"""Would a step replay correctly from a CUDA graph? Checked on the CPU.

A CUDA graph records the kernels one call of a step launches (their constant arguments
and the addresses of the tensors they read and write) and replays exactly those at every
later call; the Python of the step does not run again. So a step can be captured only if
every later call would launch the same kernels, on the same tensors, with the same
constants:

- no host sync (``.item()``, ``float(t)``, a data-dependent shape such as ``nonzero``):
  capture cannot wait for the GPU;
- no Python number that changes between calls (an lr passed as a float is frozen at the
  value it had when captured, so a schedule would silently stop);
- no tensor the step reads re-created between calls (the graph would read the old one);
- no draw from a generator of our own (the graph replays its draws unchanged: the same
  masks every step); the default generator is the graph-safe one;
- no tensor made from host data (``torch.tensor(...)``: a copy from host memory).

:func:`audit_replays` patches :class:`surgery.capture.Replay` so that each step still runs
eagerly (on the CPU), but under a dispatch mode that records its aten ops. The call a GPU
would capture (the first after the warm-up calls) is kept, and every later call until a
``reset()`` is compared with it, op by op. Every Replay is audited, captured on a GPU or
not, so a test must use a configuration that a GPU captures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from surgery import capture

HOST_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
             "equal", "is_nonzero", "allclose", "masked_scatter", "repeat_interleave"}
HOST_DATA = {"lift_fresh", "lift_fresh_copy"}


class _Trace(TorchDispatchMode):
    """The aten ops of one call: each op with its non-tensor arguments and, for each
    tensor, its shape, strides and where it came from (made during the call, or the n-th
    tensor from outside it, whose storage address is kept in ``outside``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []
        self.outside: list[int] = []  # storage addresses of tensors from outside the call, by first use
        self.problems: list[str] = []
        self._made: set[int] = set()
        self._index: dict[int, int] = {}

    def _describe(self, a: object) -> object:
        if isinstance(a, torch.Tensor):
            ptr = a.untyped_storage().data_ptr()
            if ptr in self._made:
                origin: object = "made"
            else:
                if ptr not in self._index:
                    self._index[ptr] = len(self.outside)
                    self.outside.append(ptr)
                origin = self._index[ptr]
            return ("tensor", tuple(a.shape), tuple(a.stride()), a.storage_offset(), a.dtype, origin)
        if isinstance(a, torch.Generator):
            return "generator"
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(a)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_SYNC:
            self.problems.append(f"{func} reads a tensor's value on the host")
        if name in HOST_DATA:
            self.problems.append(f"{func} makes a tensor from host data")
        if kwargs.get("generator") is not None:
            self.problems.append(f"{func} draws from a generator of its own, not the default one")
        flat, spec = tree_flatten((args, kwargs))
        self.ops.append((str(func), str(spec), tuple(self._describe(a) for a in flat)))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._index:
                self._made.add(t.untyped_storage().data_ptr())
        return out


def _difference(captured: _Trace, now: _Trace) -> str | None:
    """How a later call differs from the captured one (None: it would replay as recorded)."""
    for i, (a, b) in enumerate(zip(captured.ops, now.ops)):
        if a == b:
            continue
        if a[:2] != b[:2] or len(a[2]) != len(b[2]):
            return f"op {i} was {a[0]} when captured, now {b[0]}"
        j = next(j for j, (x, y) in enumerate(zip(a[2], b[2])) if x != y)
        return f"op {i} ({a[0]}): argument {j} was {a[2][j]} when captured, now {b[2][j]}"
    if len(captured.ops) != len(now.ops):
        return f"{len(captured.ops)} ops when captured, now {len(now.ops)}"
    if captured.outside != now.outside:
        moved = [i for i, (p, q) in enumerate(zip(captured.outside, now.outside)) if p != q]
        return f"tensors from outside the step moved since it was captured (their first uses: {moved})"
    return None


@dataclass
class Audit:
    """What :func:`audit_replays` saw: calls captured, later calls compared, problems."""

    captures: int = 0
    replays: int = 0
    problems: list[str] = field(default_factory=list)

    def check(self, min_replays: int = 1) -> None:
        """Fail unless steps were captured and replayed, and nothing stood in the way."""
        assert not self.problems, "\n".join(self.problems[:5])
        assert self.captures >= 1 and self.replays >= min_replays, (self.captures, self.replays)


@contextlib.contextmanager
def audit_replays() -> Iterator[Audit]:
    """Run every :class:`surgery.capture.Replay` eagerly while auditing it (see the module)."""
    audit = Audit()

    def call(self: capture.Replay) -> None:
        self.calls += 1
        trace = _Trace()
        with trace:
            self.fn()
        if self.calls <= self.warmup:
            return
        where = f"{getattr(self.fn, '__qualname__', self.fn)}, call {self.calls}"
        captured = getattr(self, "_audit_captured", None)
        if captured is None:
            self._audit_captured = trace
            audit.captures += 1
            audit.problems += [f"{where} (captured): {p}" for p in trace.problems]
            return
        audit.replays += 1
        diff = _difference(captured, trace)
        if diff:
            audit.problems.append(f"{where} would not replay as captured: {diff}")

    def reset(self: capture.Replay) -> None:
        self.graph, self.calls = None, 0
        self._audit_captured = None

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture.Replay, "__call__", call)
        mp.setattr(capture.Replay, "reset", reset)
        yield audit

