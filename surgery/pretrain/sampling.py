"""Random draws for the pretraining loops: Bernoulli samples and input corruption.

The hot loops draw 16 random bits per unit: one 64-bit draw of the generator serves four
units, where ``rand(...) < p`` spends a 32-bit draw on each (profiled, the generator was
the largest cost of a CD-1 step after its GEMMs). Each signed 16-bit word ``r`` is uniform
on [-2^15, 2^15), so ``r < 2^16 p - 2^15`` holds with probability ``p`` to within 2^-16,
exactly 0 for p = 0 and 1 for p = 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..capture import Replay

CHUNK = 64  # full batches whose random words are drawn ahead, one generator call per member


def draws(n: int, d: int) -> int:
    """64-bit random draws an [n, d] block of 16-bit words takes."""
    return (n * d + 3) // 4


class RandomWords:
    """A reusable [b, d] tensor of uniform random int16 words (filled by ``draw``)."""

    def __init__(self, b: int, d: int, dev: torch.device):
        self.bits = torch.empty(draws(b, d), dtype=torch.int64, device=dev)
        self.words = self.bits.view(torch.int16)[: b * d].view(b, d)

    def draw(self, n: int, g: torch.Generator | None) -> Tensor:
        """Fresh words for the first ``n`` rows."""
        self.bits.random_(-(2**63), None, generator=g)  # the full 64-bit range
        return self.words[:n]


class BernoulliSampler(RandomWords):
    """``out = Bernoulli(p)`` for ``p`` of shape [<=b, d], from words drawn here from ``g``
    or given (``words``: int16 of p's shape, e.g. from a :class:`WordBank`)."""

    def __init__(self, b: int, d: int, dev: torch.device):
        super().__init__(b, d, dev)
        self.q = torch.empty(b, d, device=dev)

    def __call__(self, p: Tensor, out: Tensor, g: torch.Generator | None, words: Tensor | None = None) -> Tensor:
        n = p.shape[0]
        q = torch.mul(p, 65536.0, out=self.q[:n]).sub_(32768.0)
        return torch.lt(self.draw(n, g) if words is None else words, q, out=out)


class WordBank:
    """Random words for K members drawn ahead: each member's next draws filled by one call
    of its generator (:meth:`refill`), then handed out in order (:meth:`take`) from a
    position held in a device counter, so a step captured as a CUDA graph reads fresh
    words at every replay. A take of ``n`` x ``d`` words consumes ``ceil(n d / 4)``
    64-bit draws, as :meth:`RandomWords.draw` does; on a CPU, whose generator fills a
    tensor in order, a member's words are exactly those its draws one by one would give."""

    def __init__(self, K: int, draws: int, dev: torch.device):
        self.bits = torch.empty(K, draws, dtype=torch.int64, device=dev)
        self.span = torch.arange(draws, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)

    def refill(self, draws: int, gens: list[torch.Generator], members: list[int] | None = None) -> None:
        """Draw the next ``draws`` 64-bit words of each member (of ``members``: those that
        use them; the others' generators are left alone) from its generator; start handing
        out from the first."""
        for k in range(len(gens)) if members is None else members:
            self.bits[k, :draws].random_(-(2**63), None, generator=gens[k])
        self.pos.zero_()

    def take(self, n: int, d: int) -> Tensor:
        """The next [K, n, d] int16 words (each member its own)."""
        m = draws(n, d)
        words = self.bits.index_select(1, self.span[:m] + self.pos)
        self.pos += m
        return words.view(torch.int16)[:, : n * d].view(-1, n, d)


class BatchWalk:
    """K members' epochs over ``n`` rows in batches of ``batch``, each member in its own
    order. Each full batch's rows are read from the epoch's permutations at a device counter
    and passed to ``step`` through a :class:`surgery.capture.Replay` (``capture``: on a GPU,
    recorded once and replayed); the partial last batch runs eagerly."""

    def __init__(self, K: int, n: int, batch: int, dev: torch.device, step: Callable[[Tensor], None],
                 capture: bool):
        self.step = step
        self.perms = torch.zeros(K, n, dtype=torch.long, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.rows = torch.arange(batch, device=dev)
        self.replay = Replay(self._next_batch, capture)

    def _next_batch(self) -> None:
        idx = self.perms.index_select(1, self.rows + self.pos)
        self.pos += self.rows.numel()
        self.step(idx)

    def epoch(self, gens: list[torch.Generator], bar, refill: Callable[[int], None] | None = None,
              last: Callable[[Tensor], None] | None = None) -> None:
        """One epoch: each member's permutation drawn from its generator, then ``refill(s)``
        before every chunk of ``s <= CHUNK`` full batches (to draw their random words ahead),
        the full batches, and the partial last batch through ``last`` (default ``step``)."""
        n, batch = self.perms.shape[1], self.rows.numel()
        self.perms.copy_(torch.stack([torch.randperm(n, generator=g) for g in gens]))
        self.pos.zero_()
        full, rest = divmod(n, batch)
        for c0 in range(0, full, CHUNK):
            steps = min(CHUNK, full - c0)
            if refill is not None:
                refill(steps)
            for _ in range(steps):
                self.replay()
            bar.update(steps)
        if rest:
            (last or self.step)(self.perms[:, full * batch :])
            bar.update(1)


class MaskNoise(RandomWords):
    """Masking corruption: ``out = x * keep`` with ``keep ~ Bernoulli(1 - level)``, from
    words drawn here from ``g`` or given (``words``, e.g. from a :class:`WordBank`)."""

    def __init__(self, b: int, d: int, dev: torch.device):
        super().__init__(b, d, dev)
        self.keep = torch.empty(b, d, dtype=torch.bool, device=dev)

    def __call__(self, x: Tensor, level: float, out: Tensor, g: torch.Generator | None,
                 words: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        keep = torch.ge(self.draw(n, g) if words is None else words, 65536.0 * level - 32768.0, out=self.keep[:n])
        return torch.mul(x, keep, out=out)


def corrupt(x: Tensor, kind: str, level: float, g: torch.Generator | None) -> Tensor:
    """A corrupted copy of ``x``: masking (zeros), Gaussian noise, or salt-and-pepper, at ``level``."""
    if level == 0:
        return x
    if kind == "gaussian":
        return x + level * torch.randn(x.shape, generator=g, device=x.device)
    r = torch.rand(x.shape, generator=g, device=x.device)
    if kind == "mask":
        return x * (r >= level)
    # salt and pepper: a fraction `level` of the inputs set to 0 or 1 with equal odds
    flip = r < level
    salt = r < level / 2
    return torch.where(flip, salt.to(x.dtype), x)
