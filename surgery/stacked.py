"""K dense chains of one architecture as one program: the engine of supervised populations.

Layer ``l`` of all K networks is a weight ``W[l]`` [K, out, in] and a bias ``b[l]`` [K, out];
:class:`StackedChain` runs their forward pass and writes the softmax cross-entropy
gradient of every weight by hand (one GEMM per layer and direction, :func:`batched.matmul`),
and :class:`StackedOptimizer` updates them, each member with its own hyperparameters.
Fine-tuning populations (:mod:`surgery.population`) and supervised ``grow`` pretraining
(:mod:`surgery.pretrain.grow`) both train through it; K = 1 is the single model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .batched import matmul
from .layers import ACTIVATIONS

# noise(position, shape): the multiplicative noise [K, ...] for the input of dense layer
# ``position`` (dropout), or None for no noise there.
Noise = Callable[[int, torch.Size], Tensor | None]


def times_derivative(d: Tensor, out: Tensor, act: str) -> Tensor:
    """``d * act'(z)``, written in terms of the layer's output ``out = act(z)``."""
    if act == "sigmoid":
        return d * out * (1 - out)
    if act == "tanh":
        return d * (1 - out * out)
    if act == "relu":
        return d * (out > 0)
    if act == "softplus":
        return d * -torch.expm1(-out)  # sigmoid(z) = 1 - exp(-softplus(z))
    return d  # linear


class StackedChain:
    """Dense layers ``W[l]`` [K, out, in], ``b[l]`` [K, out] with activations ``acts[l]``;
    ``loop``: GEMMs member by member (CPU) instead of one ``bmm`` (GPU)."""

    def __init__(self, W: list[Tensor], b: list[Tensor], acts: list[str], loop: bool):
        self.W, self.b, self.acts, self.loop = W, b, acts, loop
        self.gW = [torch.empty_like(w) for w in W]
        self.gb = [torch.empty_like(v) for v in b]

    @property
    def params(self) -> list[Tensor]:
        """Every layer's weight, then every layer's bias (the order of :attr:`grads`)."""
        return self.W + self.b

    @property
    def grads(self) -> list[Tensor]:
        """The gradients :meth:`backward` writes, in the order of :attr:`params`."""
        return self.gW + self.gb

    def forward(self, x: Tensor, keep: list | None = None, noise: Noise | None = None) -> Tensor:
        """Outputs [K, B, classes] for inputs ``x`` [K, B, in] (an expanded view when every
        member sees the same rows). ``keep`` collects, per layer, its input, its output and
        the noise applied to that output, for :meth:`backward`."""
        h = x
        n = noise(0, h.shape) if noise is not None else None
        if n is not None:
            h = h * n
        for li, (w, bias, act) in enumerate(zip(self.W, self.b, self.acts)):
            o = ACTIVATIONS[act](matmul(h, w.transpose(1, 2), self.loop).add_(bias.unsqueeze(1)))
            if keep is not None:
                keep.append([h, o, None])
            h = o
            n = noise(li + 1, h.shape) if noise is not None and li + 1 < len(self.W) else None
            if n is not None:
                h = h * n
                if keep is not None:
                    keep[-1][2] = n
        return h

    def backward(self, logits: Tensor, y: Tensor, keep: list) -> Tensor:
        """Softmax cross-entropy of ``logits`` [K, B, C] against ``y`` [K, B] (the mean over
        each member's batch) and, written into :attr:`grads`, every weight's gradient;
        returns the losses [K]."""
        lse = torch.logsumexp(logits, 2, keepdim=True)
        losses = (lse.squeeze(2) - logits.gather(2, y.unsqueeze(2)).squeeze(2)).mean(1)
        d = torch.exp(logits - lse)  # softmax
        d.scatter_add_(2, y.unsqueeze(2), torch.full_like(y, -1, dtype=d.dtype).unsqueeze(2)).div_(y.shape[1])
        for li in reversed(range(len(keep))):
            inp, out, noise = keep[li]
            if noise is not None:
                d = d * noise
            d = times_derivative(d, out, self.acts[li])
            matmul(d.transpose(1, 2), inp, self.loop, out=self.gW[li])
            torch.sum(d, 1, out=self.gb[li])
            if li > 0:
                d = matmul(d, self.W[li], self.loop)
        return losses


# torch.optim's default eps for each optimizer
DEFAULT_EPS = {"sgd": 0.0, "adam": 1e-8, "rmsprop": 1e-8, "adagrad": 1e-10, "adadelta": 1e-6}


class StackedOptimizer:
    """SGD (momentum, Nesterov, weight decay), Adam, RMSprop, Adagrad or Adadelta (``kind``)
    over stacked tensors, each member with its own weight decay, Nesterov flag, ``beta2``
    (Adam), ``alpha`` (RMSprop), ``rho`` (Adadelta), ``eps`` and per-layer lr multipliers
    ``mults[k][layer]``; member k's arithmetic is ``torch.optim``'s for that member alone.
    ``params`` are every layer's weights, then every layer's biases."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], kind: str, mults: Sequence[Sequence[float]],
                 weight_decay: Sequence[float], nesterov: Sequence[bool] | None = None,
                 beta2: Sequence[float] | None = None, eps: Sequence[float | None] | None = None,
                 alpha: Sequence[float] | None = None, rho: Sequence[float] | None = None):
        K, dev = len(mults), params[0].device
        self.params, self.grads, self.kind = params, grads, kind
        self.bufs = [torch.zeros_like(p) for p in params]  # momentum, Adam's m, Adadelta's accumulated updates
        self.sq = [torch.zeros_like(p) for p in params] if kind != "sgd" else []  # squared-gradient averages
        layers = len(mults[0])
        self.mult = [torch.tensor([m[i % layers] for m in mults], device=dev) for i in range(len(params))]
        nesterov = list(nesterov) if nesterov is not None else [False] * K
        self.decay = torch.tensor(list(weight_decay), device=dev)
        self.nesterov = torch.tensor(nesterov, device=dev)
        self.any_decay, self.nest_all, self.nest_any = any(weight_decay), all(nesterov), any(nesterov)

        def per_member(values: Sequence[float | None] | None, default: float) -> Tensor:
            return torch.tensor([default if v is None else v for v in (values or [None] * K)], device=dev)

        self.b2 = per_member(beta2, 0.999)
        self.eps = per_member(eps, DEFAULT_EPS[kind])
        self.alpha = per_member(alpha, 0.99)
        self.rho = per_member(rho, 0.9)

    def step(self, lr: Tensor, mom: Tensor, step: int | Tensor) -> None:
        """One update of every member: ``lr`` [K], ``mom`` [K] (SGD and RMSprop momentum,
        Adam's beta1; unused by Adagrad and Adadelta), ``step`` the global step (from 0; a
        0-d device tensor where the update is captured as a CUDA graph); each layer's lr
        times the member's multiplier for it."""
        if self.kind != "sgd":
            getattr(self, f"_{self.kind}")(lr, mom, step)
            return
        wd, nest = self.decay, self.nesterov
        for p, g, buf, mult in zip(self.params, self.grads, self.bufs, self.mult):
            shape = (len(lr),) + (1,) * (p.dim() - 1)
            if self.any_decay:  # g is rewritten by the next backward: safe to change in place
                g.addcmul_(wd.view(shape), p)
            buf.mul_(mom.view(shape)).add_(g)
            if self.nest_all:
                d = g.addcmul_(mom.view(shape), buf)
            else:
                d = torch.where(nest.view(shape), g + mom.view(shape) * buf, buf) if self.nest_any else buf
            p.addcmul_((lr * mult).view(shape), d, value=-1.0)

    def _each(self):
        """Per tensor: the tensor, its gradient (weight decay added), both states, its
        multiplier, and a reshaper of [K] per-member values to broadcast over it."""
        for p, g, buf, sq, mult in zip(self.params, self.grads, self.bufs, self.sq, self.mult):
            shape = (p.shape[0],) + (1,) * (p.dim() - 1)

            def view(t: Tensor, shape: tuple[int, ...] = shape) -> Tensor:
                return t.view(shape)

            if self.any_decay:
                g.addcmul_(view(self.decay), p)
            yield p, g, buf, sq, mult, view

    def _adam(self, lr: Tensor, beta1: Tensor, step: int | Tensor) -> None:
        """As ``torch.optim.Adam`` with L2 weight decay (a momentum schedule sets beta1):
        ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
        t, b2 = step + 1, self.b2
        size = lr / (1 - beta1**t)
        root = torch.sqrt(1 - b2**t)
        for p, g, m, v, mult, view in self._each():
            m.lerp_(g, view(1 - beta1))
            v.mul_(view(b2)).addcmul_(g, g * view(1 - b2))
            denom = (v.sqrt() / view(root)).add_(view(self.eps))
            p.sub_(m.div(denom).mul_(view(size * mult)))

    def _rmsprop(self, lr: Tensor, mom: Tensor, step: int | Tensor) -> None:
        """As ``torch.optim.RMSprop`` (not centered): ``v = alpha v + (1 - alpha) g^2``,
        ``buf = mom buf + g / (sqrt(v) + eps)``, ``p -= lr buf`` (momentum 0: ``buf`` is the step)."""
        for p, g, buf, v, mult, view in self._each():
            v.mul_(view(self.alpha)).addcmul_(g, g * view(1 - self.alpha))
            buf.mul_(view(mom)).addcdiv_(g, v.sqrt().add_(view(self.eps)))
            p.addcmul_(view(lr * mult), buf, value=-1.0)

    def _adagrad(self, lr: Tensor, mom: Tensor, step: int | Tensor) -> None:
        """As ``torch.optim.Adagrad`` (no lr decay): ``v += g^2``, ``p -= lr g / (sqrt(v) + eps)``."""
        for p, g, _, v, mult, view in self._each():
            v.addcmul_(g, g)
            p.addcmul_(view(lr * mult), g / v.sqrt().add_(view(self.eps)), value=-1.0)

    def _adadelta(self, lr: Tensor, mom: Tensor, step: int | Tensor) -> None:
        """As ``torch.optim.Adadelta``: ``v = rho v + (1 - rho) g^2``, ``d = sqrt(u + eps) /
        sqrt(v + eps) g``, ``u = rho u + (1 - rho) d^2``, ``p -= lr d``."""
        for p, g, u, v, mult, view in self._each():
            rho, eps = view(self.rho), view(self.eps)
            v.mul_(rho).addcmul_(g, g * (1 - rho))
            d = (u + eps).sqrt_().div_((v + eps).sqrt_()).mul_(g)
            u.mul_(rho).addcmul_(d, d * (1 - rho))
            p.addcmul_(view(lr * mult), d, value=-1.0)
