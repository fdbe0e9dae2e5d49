"""One fine-tuning step captured as a CUDA graph: forward, loss, backward and the
optimizer update replayed with one launch instead of ~30 kernel launches from Python.
:class:`GraphedStep` is a single network's step, :class:`StackedStep` a population's.

On an H200, for a 784-1000x3-10 net at batch 100, the GPU idled 84% of an eager epoch
(launch-bound); captured, an epoch ran 4-5x faster (0.19 against 0.93 s, measured with
``benchmarks/finetune.py --device cuda``). What makes capture possible:

- the graph gathers its batch itself from the epoch's shuffled copy of the training set
  (the Trainer reuses one buffer every epoch), at a position held in a device counter
  that the graph advances: a replay needs no copy from Python;
- the update is written here over the optimizer's own state tensors (SGD's
  ``momentum_buffer``; Adam's ``exp_avg``, ``exp_avg_sq``, ``step``) in ``_foreach``
  kernels (a handful for all tensors, not ~6 per tensor: a replay is as long as its
  kernels, and on the H200 the graphed epoch, 0.19 s, still trailed a minimal captured
  loop's 0.13 s), with the learning
  rate and momentum held in device tensors that the schedule refills before each replay
  (``fill_``: a kernel, not a host sync), so schedules need no re-capture and checkpoints
  keep working through ``optimizer.state_dict()``;
- the first ``warmup`` steps run eagerly through the same function (on a side stream, as
  capture requires), then the step is captured once and replayed;
- loss and error sums accumulate on the device; NaN is checked once per epoch;
- dropout draws from the default CUDA generator, which PyTorch keeps graph-safe.

A batch of another size (the last, partial one) runs eagerly through the same function.
On a CPU (tests) the same function runs eagerly, so its arithmetic is tested against
``torch.optim`` without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import Replay
from .errors import ConfigError
from .stacked import Noise, StackedChain, StackedOptimizer

GRAPH_OPTIMIZERS = ("sgd", "adam", "rmsprop", "adagrad", "adadelta")  # all but cg, whose line searches need the host
# The state tensors each optimizer keeps for a parameter, under torch.optim's names (and a
# 0-d "step" for all but SGD).
STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "rmsprop": ("square_avg", "momentum_buffer"),
         "adagrad": ("sum",), "adadelta": ("square_avg", "acc_delta")}


class GraphedStep:
    """Forward + backward + optimizer update of ``net`` on batches of ``batch`` rows.

    ``opt``: the ``torch.optim`` optimizer (SGD, Adam, RMSprop, Adagrad or Adadelta, named
    ``name``) whose hyperparameters (its first param group's) and state tensors the update
    reads and writes; each param group keeps its ``lr_mult``.
    """

    def __init__(self, net: nn.Module, opt: torch.optim.Optimizer, name: str, amp: bool, capture: bool,
                 warmup: int = 3):
        if name not in GRAPH_OPTIMIZERS:
            raise ConfigError(f"finetune.cuda_graph: the {name!r} optimizer is not captured; use one of "
                              f"{list(GRAPH_OPTIMIZERS)}, or cuda_graph: false.")
        hp = opt.param_groups[0]
        self.net, self.opt, self.name, self.amp = net, opt, name, amp
        self.wd, self.nesterov, self.eps = hp["weight_decay"], hp.get("nesterov", False), hp.get("eps")
        self.b2, self.alpha, self.rho = hp.get("betas", (0.0, 0.0))[1], hp.get("alpha"), hp.get("rho")
        self.default_momentum = hp["betas"][0] if name == "adam" else hp.get("momentum", 0.0)
        self.capture, self.warmup = capture, warmup
        dev = next(net.parameters()).device
        self.lr = torch.zeros((), device=dev)
        self.mom = torch.zeros((), device=dev)  # SGD and RMSprop momentum, or Adam's beta1
        self.loss_sum = torch.zeros((), device=dev)
        self.wrong = torch.zeros((), dtype=torch.long, device=dev)
        self.xs: Tensor | None = None  # the epoch's shuffled training set, [N, ...] and [N]
        self.ys: Tensor | None = None
        self.rows = torch.zeros(0, dtype=torch.long, device=dev)  # 0..B-1
        self.pos = torch.zeros((), dtype=torch.long, device=dev)  # first row of the next batch
        self.replay = Replay(self._eager, capture, warmup)

    # ------------------------------------------------------------- the arithmetic
    def _trainable(self) -> list[tuple[float, list[Tensor]]]:
        return [(gr["lr_mult"], [p for p in gr["params"] if p.requires_grad]) for gr in self.opt.param_groups]

    def _state(self, p: Tensor) -> dict[str, Tensor]:
        """``p``'s state in the optimizer, as ``torch.optim`` keeps it (so checkpoints and an
        eager step read it), made where it is missing; ``step`` a 0-d tensor on the device."""
        st = self.opt.state[p]
        for key in STATE[self.name]:
            if st.get(key) is None:  # SGD without momentum keeps a None buffer
                st[key] = torch.zeros_like(p)
        if self.name != "sgd" and (not isinstance(st.get("step"), Tensor) or st["step"].device != p.device):
            st["step"] = torch.tensor(float(st.get("step", 0.0)), device=p.device)
        return st

    @torch.no_grad()
    def _update(self) -> None:
        """The optimizer's update of every trainable tensor in a handful of ``_foreach``
        kernels (captured, ~10 launches instead of ~6 per tensor)."""
        pairs = [(p, mult) for mult, params in self._trainable() for p in params]
        if not pairs:
            return
        params, mults = [p for p, _ in pairs], [m for _, m in pairs]
        grads = [p.grad for p in params]
        if self.wd:
            grads = torch._foreach_add(grads, params, alpha=self.wd)
        states = [self._state(p) for p in params]
        t = None if self.name == "sgd" else states[0]["step"]
        if t is not None:
            torch._foreach_add_([st["step"] for st in states], 1)  # counted as torch.optim counts
        steps = getattr(self, f"_{self.name}")(grads, [[st[k] for st in states] for k in STATE[self.name]], t)
        if any(m != 1.0 for m in mults):
            torch._foreach_mul_(steps, mults)
        torch._foreach_sub_(params, steps)

    # Each returns the steps (lr included) that are subtracted from the parameters; ``states``:
    # the optimizer's state tensors of every parameter, one list for each key of STATE; ``t``:
    # the step count, a 0-d device tensor (Adam's bias correction).
    def _sgd(self, grads: list[Tensor], states: list[list[Tensor]], t: Tensor | None) -> list[Tensor]:
        bufs = states[0]
        torch._foreach_mul_(bufs, self.mom)
        torch._foreach_add_(bufs, grads)
        if not self.nesterov:
            return torch._foreach_mul(bufs, self.lr)
        steps = torch._foreach_mul(bufs, self.mom)
        torch._foreach_add_(steps, grads)
        torch._foreach_mul_(steps, self.lr)
        return steps

    def _adam(self, grads: list[Tensor], states: list[list[Tensor]], t: Tensor | None) -> list[Tensor]:
        m, v = states
        torch._foreach_mul_(m, self.mom)
        torch._foreach_add_(m, torch._foreach_mul(grads, 1 - self.mom))
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - self.b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, torch.sqrt(1 - self.b2**t))
        torch._foreach_add_(denom, self.eps)
        steps = torch._foreach_div(m, denom)
        torch._foreach_mul_(steps, self.lr / (1 - torch.pow(self.mom, t)))
        return steps

    def _rmsprop(self, grads: list[Tensor], states: list[list[Tensor]], t: Tensor | None) -> list[Tensor]:
        v, bufs = states  # momentum 0: the buffer holds g / (sqrt(v) + eps), the step itself
        torch._foreach_mul_(v, self.alpha)
        torch._foreach_addcmul_(v, grads, grads, value=1 - self.alpha)
        avg = torch._foreach_sqrt(v)
        torch._foreach_add_(avg, self.eps)
        torch._foreach_mul_(bufs, self.mom)
        torch._foreach_addcdiv_(bufs, grads, avg)
        return torch._foreach_mul(bufs, self.lr)

    def _adagrad(self, grads: list[Tensor], states: list[list[Tensor]], t: Tensor | None) -> list[Tensor]:
        (sums,) = states
        torch._foreach_addcmul_(sums, grads, grads)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, self.eps)
        steps = torch._foreach_div(grads, std)
        torch._foreach_mul_(steps, self.lr)
        return steps

    def _adadelta(self, grads: list[Tensor], states: list[list[Tensor]], t: Tensor | None) -> list[Tensor]:
        v, u = states  # averages of squared gradients and of squared updates
        torch._foreach_mul_(v, self.rho)
        torch._foreach_addcmul_(v, grads, grads, value=1 - self.rho)
        std = torch._foreach_add(v, self.eps)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(u, self.eps)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, grads)
        torch._foreach_mul_(u, self.rho)
        torch._foreach_addcmul_(u, delta, delta, value=1 - self.rho)
        return torch._foreach_mul(delta, self.lr)

    def _step(self, x: Tensor, y: Tensor) -> None:
        # autocast must not cache casts across a graph capture (see torch.cuda.graph docs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp and x.is_cuda, cache_enabled=False):
            out = self.net(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        self._update()
        self.loss_sum += loss.detach() * x.shape[0]
        self.wrong += (out.detach().argmax(1) != y).sum()

    # ------------------------------------------------------------ running it
    def set_hyperparameters(self, lr: float, momentum: float | None) -> None:
        """The schedule's values for the next step (written into device tensors);
        ``momentum=None``: the optimizer's own (SGD momentum, Adam beta1)."""
        self.lr.fill_(lr)
        self.mom.fill_(self.default_momentum if momentum is None else momentum)

    def start_epoch(self, xs: Tensor, ys: Tensor, batch: int) -> None:
        """Take this epoch's shuffled training set (``xs`` [N, ...], ``ys`` [N]); batches of
        ``batch`` rows are read from it in order. Zeroes the epoch's sums."""
        if self.xs is None or xs.data_ptr() != self.xs.data_ptr() or ys.data_ptr() != self.ys.data_ptr() \
                or batch != self.rows.numel():
            self.replay.reset()  # the graph reads fixed addresses: capture again for new buffers
            self.xs, self.ys = xs, ys
            self.rows = torch.arange(batch, device=xs.device)
        self.pos.zero_()
        self.loss_sum.zero_()
        self.wrong.zero_()

    def step(self) -> None:
        """Train on the next full batch of the epoch."""
        self.replay()

    def last_batch(self, start: int) -> None:
        """Train on the rows from ``start`` to the end (a partial batch), eagerly."""
        assert self.xs is not None and self.ys is not None
        for p in self.net.parameters():
            p.grad = None
        self._step(self.xs[start:], self.ys[start:])

    def _next_batch(self) -> None:
        assert self.xs is not None and self.ys is not None
        idx = self.rows + self.pos
        self._step(self.xs.index_select(0, idx), self.ys.index_select(0, idx))
        self.pos += self.rows.numel()

    def _eager(self) -> None:
        for p in self.net.parameters():
            p.grad = None  # captured, the graph allocates the gradients it writes
        self._next_batch()


class StackedStep:
    """A population's training step (:class:`surgery.stacked.StackedChain` forward and
    backward, then the :class:`surgery.stacked.StackedOptimizer` update) over the members'
    own shuffles of ``x`` [N, ...], ``y`` [N], captured as one CUDA graph when ``capture``.

    As :class:`GraphedStep`: each member's batch is gathered inside the graph from the
    epoch's permutations ([K, N], copied into one buffer) at a device counter; lr and
    momentum [K] live in device tensors refilled before a replay; losses and errors sum on
    the device; the first ``warmup`` steps run eagerly on a side stream, the partial last
    batch eagerly; the global step (Adam's bias correction) is a device tensor too.
    Uncaptured (a CPU, dropout), the same function runs eagerly, so the CPU tests check
    exactly the arithmetic a GPU captures."""

    def __init__(self, chain: StackedChain, opt: StackedOptimizer, x: Tensor, y: Tensor, batch: int,
                 noise: Noise | None, capture: bool, warmup: int = 3):
        K, dev = chain.W[0].shape[0], x.device
        self.chain, self.opt, self.x, self.y, self.noise = chain, opt, x, y, noise
        self.replay = Replay(self._next_batch, capture, warmup)
        self.lr = torch.zeros(K, device=dev)
        self.mom = torch.zeros(K, device=dev)
        self.loss_sum = torch.zeros(K, device=dev)
        self.wrong = torch.zeros(K, device=dev)
        self.perms = torch.zeros(K, x.shape[0], dtype=torch.long, device=dev)
        self.rows = torch.arange(batch, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.t = torch.zeros((), device=dev)  # the global step, for Adam's bias correction

    def start_epoch(self, perms: Tensor) -> None:
        """This epoch's permutations [K, N] (each member's data order); zeroes the sums."""
        self.perms.copy_(perms)
        self.pos.zero_()
        self.loss_sum.zero_()
        self.wrong.zero_()

    def set_hyperparameters(self, lr: Tensor, mom: Tensor) -> None:
        """Each member's lr and momentum (Adam: beta1) [K] for the next steps."""
        self.lr.copy_(lr)
        self.mom.copy_(mom)

    @torch.no_grad()
    def _step(self, idx: Tensor) -> None:
        xb, yb = self.x[idx].flatten(2), self.y[idx]  # [K, b, in], [K, b]
        keep: list = []
        out = self.chain.forward(xb, keep, self.noise)
        losses = self.chain.backward(out, yb, keep)
        self.opt.step(self.lr, self.mom, self.t)
        self.loss_sum += losses * idx.shape[1]
        self.wrong += (out.argmax(2) != yb).sum(1)

    def _next_batch(self) -> None:
        self._step(self.perms.index_select(1, self.rows + self.pos))
        self.pos += self.rows.numel()

    def step(self, t: int) -> None:
        """Train every member on its next full batch; ``t``: the global step."""
        self.t.fill_(t)
        self.replay()

    def last_batch(self, start: int, t: int) -> None:
        """Train on each member's rows from ``start`` to the end (a partial batch), eagerly."""
        self.t.fill_(t)
        self._step(self.perms[:, start:])
