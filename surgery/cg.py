"""Conjugate gradients, the fine-tuning method of Hinton & Salakhutdinov (2006).

Their deep nets were fine-tuned with Carl Rasmussen's ``minimize``: on each batch of 1000
examples, a few Polak-Ribiere conjugate-gradient line searches (three) from the current
weights, each line search bracketing a step that satisfies the Wolfe-Powell conditions by
cubic extrapolation and cubic or quadratic interpolation. Nothing is carried from one batch
to the next, so there is no optimizer state to checkpoint. :class:`ConjugateGradient` does
that as a ``torch.optim.Optimizer`` whose ``step`` takes a closure (it evaluates the loss
several times a step) over the parameters that train at the time (``requires_grad``).

The first trial step of a batch is ``1 / (1 + |g|^2)``, so the method is not indifferent
to the loss's scale: they minimised the cross-entropy summed over the batch, and the
fine-tuning loop hands this optimizer the summed loss too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

# The line search's constants, as in the minimize.m they used: a step is accepted when the
# loss fell by at least RHO x the predicted fall and the slope shrank to SIG x the first
# (Wolfe-Powell); interpolated points stay INT of the bracket from its ends; extrapolation
# grows the step at most EXT-fold; the next line search starts from the last step times the
# ratio of the slopes, at most RATIO.
RHO, SIG, INT, EXT, RATIO = 0.01, 0.5, 0.1, 3.0, 100.0

Loss = Callable[[Tensor], tuple[float, Tensor]]  # flat weights -> (loss, flat gradient)


class ConjugateGradient(torch.optim.Optimizer):
    """``step(closure)`` runs up to ``line_searches`` conjugate-gradient line searches on the
    closure's loss (each at most ``max_evals`` evaluations) and leaves the parameters at the
    best point found; ``weight_decay`` adds ``weight_decay / 2 * |w|^2`` to the loss.

    The closure must zero the gradients, compute the loss, call ``backward`` and return the
    loss (as for ``torch.optim.LBFGS``); ``step`` returns its first value (the loss before the
    step). ``evaluations`` counts the closure calls so far."""

    needs_closure = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], line_searches: int = 3, max_evals: int = 20,
                 weight_decay: float = 0.0):
        if line_searches < 1 or max_evals < 1 or weight_decay < 0:
            raise ValueError(f"line_searches and max_evals must be >= 1 and weight_decay >= 0; got {line_searches}, "
                             f"{max_evals}, {weight_decay}")
        super().__init__(params, {"lr": 0.0, "line_searches": line_searches, "max_evals": max_evals,
                                  "weight_decay": weight_decay})
        self.evaluations = 0

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        """Line searches on ``closure``'s loss from the current weights; the loss before them."""
        params = self._params()
        wd = self.defaults["weight_decay"]
        first: list[Tensor] = []

        def loss(x: Tensor) -> tuple[float, Tensor]:
            _write(params, x)
            with torch.enable_grad():
                value = closure()
            self.evaluations += 1
            if not first:
                first.append(value.detach())
            g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            f = float(value)
            if wd:
                f += 0.5 * wd * float(x @ x)
                g = g + wd * x
            return f, g

        if not params:
            raise ValueError("ConjugateGradient.step: no parameter requires a gradient")
        x = torch.cat([p.detach().reshape(-1) for p in params])
        _write(params, minimize(loss, x, self.defaults["line_searches"], self.defaults["max_evals"]))
        return first[0]


def _write(params: list[Tensor], x: Tensor) -> None:
    """Copy the flat vector ``x`` into ``params`` in order."""
    at = 0
    for p in params:
        n = p.numel()
        p.copy_(x[at : at + n].view_as(p))
        at += n


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _div(a: float, b: float) -> float:
    """``a / b``, NaN where Python would raise (the line search treats NaN as "bisect")."""
    return a / b if b != 0 else math.nan


def minimize(f: Loss, x: Tensor, line_searches: int, max_evals: int = 20) -> Tensor:
    """The best point found by up to ``line_searches`` Polak-Ribiere line searches on ``f``
    from ``x`` (a flat tensor; ``f`` returns the loss and its gradient there)."""
    f0, df0 = f(x)
    s = -df0
    d0 = -float(s @ s)  # the slope along s
    if d0 == 0 or not _finite(f0, d0):
        return x  # at a stationary point, or nothing finite to search from
    x3 = 1.0 / (1.0 - d0)
    failed = False
    for _ in range(line_searches):
        best = (x, f0, df0)
        x3, f3, df3, d3, best, evals = _extrapolate(f, x, s, f0, d0, x3, best, max_evals)
        x3, f3, df3, d3, best = _interpolate(f, x, s, f0, d0, x3, f3, df3, d3, best, evals)
        if abs(d3) < -SIG * d0 and f3 < f0 + x3 * RHO * d0:  # the line search succeeded
            x, f0 = x + x3 * s, f3
            s = float((df3 @ df3 - df0 @ df3) / (df0 @ df0)) * s - df3  # Polak-Ribiere
            df0, d_prev, d0 = df3, d0, float(df3 @ s)
            if d0 > 0:  # not a descent direction: steepest descent instead
                s, d0 = -df0, -float(df0 @ df0)
            x3 *= min(RATIO, d_prev / (d0 - 1e-300))
            failed = False
        else:
            x, f0, df0 = best  # back to the best point seen
            if failed:  # two failures in a row: give up on this batch
                break
            s, d0 = -df0, -float(df0 @ df0)
            if d0 == 0:
                break
            x3, failed = 1.0 / (1.0 - d0), True
    return x


Best = tuple[Tensor, float, Tensor]


def _extrapolate(f: Loss, x: Tensor, s: Tensor, f0: float, d0: float, x3: float, best: Best,
                 max_evals: int) -> tuple[float, float, Tensor, float, Best, int]:
    """Grow the step ``x3`` along ``s`` until the slope has shrunk enough or the loss rose
    (a bracket), by cubic extrapolation; a non-finite loss halves the step."""
    evals = max_evals
    x2, f2, d2 = 0.0, f0, d0
    while True:
        f3, df3 = f0, best[2]
        ok = False
        while not ok and evals > 0:
            evals -= 1
            f3, df3 = f(x + x3 * s)
            ok = _finite(f3) and bool(torch.isfinite(df3).all())
            if not ok:
                x3 = (x2 + x3) / 2
        if ok and f3 < best[1]:
            best = (x + x3 * s, f3, df3)
        d3 = float(df3 @ s) if ok else math.nan
        if not ok or d3 > SIG * d0 or f3 > f0 + x3 * RHO * d0 or evals == 0:
            return x3, f3, df3, d3, best, evals
        x1, f1, d1 = x2, f2, d2
        x2, f2, d2 = x3, f3, d3
        a = 6 * (f1 - f2) + 3 * (d2 + d1) * (x2 - x1)
        b = 3 * (f2 - f1) - (2 * d1 + d2) * (x2 - x1)
        disc = b * b - a * d1 * (x2 - x1)
        x3 = x1 - _div(d1 * (x2 - x1) * (x2 - x1), b + math.sqrt(disc)) if disc >= 0 else math.nan
        if not math.isfinite(x3) or x3 < 0 or x3 > x2 * EXT:
            x3 = x2 * EXT
        elif x3 < x2 + INT * (x2 - x1):
            x3 = x2 + INT * (x2 - x1)


def _interpolate(f: Loss, x: Tensor, s: Tensor, f0: float, d0: float, x3: float, f3: float, df3: Tensor,
                 d3: float, best: Best, evals: int) -> tuple[float, float, Tensor, float, Best]:
    """Shrink the bracket [x2, x4] around an acceptable step by cubic (or, past a rise above
    the start, quadratic) interpolation until the Wolfe-Powell conditions hold."""
    x2, f2, d2 = 0.0, f0, d0
    x4 = f4 = d4 = math.nan
    while (abs(d3) > -SIG * d0 or f3 > f0 + x3 * RHO * d0) and evals > 0:
        if d3 > 0 or f3 > f0 + x3 * RHO * d0 or not math.isfinite(x4):
            x4, f4, d4 = x3, f3, d3
        else:
            x2, f2, d2 = x3, f3, d3
        w = x4 - x2  # the bracket's width
        if f4 > f0:
            x3 = x2 - _div(0.5 * d2 * w * w, f4 - f2 - d2 * w)
        else:
            a = 6 * _div(f2 - f4, w) + 3 * (d4 + d2)
            b = 3 * (f4 - f2) - (2 * d2 + d4) * w
            disc = b * b - a * d2 * w * w
            x3 = x2 + _div(math.sqrt(disc) - b, a) if disc >= 0 else math.nan
        if not math.isfinite(x3):
            x3 = (x2 + x4) / 2
        x3 = max(min(x3, x4 - INT * (x4 - x2)), x2 + INT * (x4 - x2))
        f3, df3 = f(x + x3 * s)
        evals -= 1
        if not (_finite(f3) and bool(torch.isfinite(df3).all())):
            return x3, math.inf, df3, math.nan, best  # the search fails; the best point stands
        if f3 < best[1]:
            best = (x + x3 * s, f3, df3)
        d3 = float(df3 @ s)
    return x3, f3, df3, d3, best
