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


class StackedOptimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam (``kind``) over stacked tensors, each
    member with its own weight decay, Nesterov flag, Adam beta2/eps and per-layer lr
    multipliers ``mults[k][layer]``; member k's arithmetic is ``torch.optim``'s for that
    member alone. ``params`` are every layer's weights, then every layer's biases."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], kind: str, mults: Sequence[Sequence[float]],
                 weight_decay: Sequence[float], nesterov: Sequence[bool] | None = None,
                 beta2: Sequence[float] | None = None, eps: Sequence[float] | None = None):
        K, dev = len(mults), params[0].device
        self.params, self.grads, self.adam = params, grads, kind == "adam"
        self.bufs = [torch.zeros_like(p) for p in params]  # momentum / Adam's first moments
        self.sq = [torch.zeros_like(p) for p in params] if self.adam else []  # Adam's second moments
        layers = len(mults[0])
        self.mult = [torch.tensor([m[i % layers] for m in mults], device=dev) for i in range(len(params))]
        nesterov = list(nesterov) if nesterov is not None else [False] * K
        self.decay = torch.tensor(list(weight_decay), device=dev)
        self.nesterov = torch.tensor(nesterov, device=dev)
        self.any_decay, self.nest_all, self.nest_any = any(weight_decay), all(nesterov), any(nesterov)
        self.b2 = torch.tensor(list(beta2) if beta2 is not None else [0.999] * K, device=dev)
        self.eps = torch.tensor(list(eps) if eps is not None else [1e-8] * K, device=dev)

    def step(self, lr: Tensor, mom: Tensor, step: int) -> None:
        """SGD with (Nesterov) momentum and weight decay, per model, as ``torch.optim.SGD``,
        in as few passes over the stacked tensors as the members' settings allow (or Adam);
        each layer's lr times the member's multiplier for it. ``lr``, ``mom``: [K]."""
        if self.adam:
            self._adam(lr, mom, step)
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

    def _adam(self, lr: Tensor, beta1: Tensor, step: int) -> None:
        """Adam with L2 weight decay, per model, as ``torch.optim.Adam`` (a momentum schedule
        sets beta1): ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``."""
        t, b2, eps = step + 1, self.b2, self.eps
        size = lr / (1 - beta1**t)
        root = torch.sqrt(1 - b2**t)
        for p, g, m, v, mult in zip(self.params, self.grads, self.bufs, self.sq, self.mult):
            shape = (len(lr),) + (1,) * (p.dim() - 1)
            if self.any_decay:
                g.addcmul_(self.decay.view(shape), p)
            m.lerp_(g, (1 - beta1).view(shape))
            v.mul_(b2.view(shape)).addcmul_(g, g * (1 - b2).view(shape))
            denom = (v.sqrt() / root.view(shape)).add_(eps.view(shape))
            p.sub_(m.div(denom).mul_((size * mult).view(shape)))
