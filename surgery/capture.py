"""Run a training step eagerly, or capture it once as a CUDA graph and replay it.

A step that reads its batch and hyperparameters from tensors that stay at fixed addresses
(batch positions at a device counter, lr in a device tensor, random numbers drawn ahead
into a buffer) can be recorded once and replayed with one launch: the fine-tuning steps
(:mod:`surgery.graphed`) and the pretraining steps (RBM, dense autoencoders) are written so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Replay:
    """``fn()`` run as it is (``capture=False``, and always on a CPU), or: the first
    ``warmup`` calls eagerly on a side stream (as capture requires: allocator and library
    handles settle), then captured once and replayed. ``reset()`` drops the graph, for
    when a buffer it reads has moved."""

    def __init__(self, fn: Callable[[], None], capture: bool, warmup: int = 3):
        self.fn, self.capture, self.warmup = fn, capture, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        """One step."""
        self.calls += 1
        if not self.capture:
            self.fn()
        elif self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn()
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.fn()
            self.graph.replay()

    def reset(self) -> None:
        """Capture again at the next call after ``warmup`` more eager ones."""
        self.graph, self.calls = None, 0
