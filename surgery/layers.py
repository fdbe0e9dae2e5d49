"""Layer specifications, the modules they build, activations and weight initialisation.

A ``LayerSpec`` is a value (frozen pydantic model): kind, sizes, activation. ``build()``
turns it into a module whose parameters are called ``weight`` and ``bias`` so that a
module's state-dict keys are the stack's tensor names (``h1.weight``) with no renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import Tensor, nn

from .errors import ConfigError, OutOfMemory
from .runtime import machine_memory


def _identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "linear": _identity,
    "softplus": F.softplus,
}

INIT_SCHEMES = ("classic", "xavier", "he", "sparse", "torch")

# Activations for which f(f^-1-free identity layer) == identity on the layer's own outputs,
# i.e. an identity-initialised layer after them keeps the function exactly.
IDEMPOTENT_ON_OWN_RANGE = {"relu", "linear"}


def check_activation(name: str) -> str:
    """Return ``name`` if it is a known activation; raise ``ConfigError`` naming the choices."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return name


def check_init(name: str) -> str:
    """Return ``name`` if it is a known init scheme; raise ``ConfigError`` naming the choices."""
    if name not in INIT_SCHEMES:
        raise ConfigError(f"unknown init scheme {name!r}; choose one of {list(INIT_SCHEMES)}")
    return name


# Recipe field types: validated by name at load time, so pydantic reports the field path.
Activation = Annotated[str, AfterValidator(check_activation)]
InitName = Annotated[str, AfterValidator(check_init)]


def input_fits(want: tuple[int, ...], have: tuple[int, ...]) -> bool:
    """Whether examples of shape ``have`` feed a layer (or network) taking ``want``
    (images feed a dense first layer of their flattened size)."""
    return tuple(want) == tuple(have) or (len(want) == 1 and math.prod(have) == want[0])


class LayerSpec(BaseModel):
    """What a layer is, without its numbers.

    dense:  input [N, in_features] (higher-rank input is flattened), output [N, out_features]
    conv2d: input [N, C, H, W] with ``in_shape=(C, H, W)`` and ``in_features=C``,
            output [N, out_features, H', W']
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dense", "conv2d"] = "dense"
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)
    activation: Activation = "sigmoid"
    in_shape: tuple[int, int, int] | None = None
    kernel_size: int = Field(default=5, gt=0)
    stride: int = Field(default=1, gt=0)
    padding: int = Field(default=0, ge=0)

    def model_post_init(self, __context: object) -> None:
        self._check_size()
        if self.kind == "conv2d":
            if self.in_shape is None:
                raise ConfigError("a conv2d layer needs in_shape=(channels, height, width)")
            if self.in_shape[0] != self.in_features:
                raise ConfigError(
                    f"conv2d in_features={self.in_features} must equal in_shape channels "
                    f"{self.in_shape[0]}"
                )
            h, w = self._conv_hw()
            if h <= 0 or w <= 0:
                raise ConfigError(
                    f"conv2d kernel_size={self.kernel_size} is larger than the input "
                    f"{self.in_shape[1]}x{self.in_shape[2]}"
                )

    def resized(self, **sizes: int) -> LayerSpec:
        """This spec with other ``in_features``/``out_features``, validated as a new one."""
        return LayerSpec.model_validate({**self.model_dump(), **sizes})

    def _check_size(self) -> None:
        """``OutOfMemory`` for a layer whose float32 weight alone is larger than this machine's
        memory: refused when it is planned, not when torch fails to allocate it."""
        need, have = 4 * math.prod(self.weight_shape), machine_memory()
        if have is not None and need > have:
            raise OutOfMemory(f"a {self.kind} layer of {self.out_features} units on {self.in_features} inputs "
                              f"needs a {'x'.join(map(str, self.weight_shape))} weight of {need / 2**30:,.1f} GiB, "
                              f"more than this machine's {have / 2**30:.1f} GiB of memory; give it fewer units.")

    def _conv_hw(self) -> tuple[int, int]:
        assert self.in_shape is not None
        _, h, w = self.in_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-example input shape: ``(in_features,)`` or ``in_shape``."""
        if self.kind == "conv2d":
            assert self.in_shape is not None
            return tuple(self.in_shape)
        return (self.in_features,)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-example output shape: ``(out_features,)`` or ``(maps, H', W')``."""
        if self.kind == "conv2d":
            return (self.out_features, *self._conv_hw())
        return (self.out_features,)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """``[out, in]`` (dense) or ``[out, in, k, k]`` (conv2d)."""
        if self.kind == "conv2d":
            return (self.out_features, self.in_features, self.kernel_size, self.kernel_size)
        return (self.out_features, self.in_features)

    @property
    def fan_in(self) -> int:
        """Inputs per unit."""
        return math.prod(self.weight_shape[1:])

    @property
    def fan_out(self) -> int:
        """Outputs per input unit."""
        return self.weight_shape[0] * math.prod(self.weight_shape[2:])

    def brief(self) -> str:
        """One line for people: ``dense 784 -> 500, sigmoid`` or ``conv2d (1, 28, 28) -> (8, 24, 24),
        k=5, relu``."""
        if self.kind == "conv2d":
            return f"conv2d {self.in_shape} -> {self.output_shape}, k={self.kernel_size}, {self.activation}"
        return f"dense {self.in_features} -> {self.out_features}, {self.activation}"

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether an input of per-example ``shape`` fits (dense layers flatten)."""
        if self.kind == "dense":
            return math.prod(shape) == self.in_features
        return tuple(shape) == self.input_shape

    def build(self) -> nn.Module:
        """A fresh module for this spec (classic init; callers copy weights in)."""
        return Conv2dLayer(self) if self.kind == "conv2d" else Dense(self)


class _Layer(nn.Module):
    """Parameters ``weight`` and ``bias`` (classic init) plus the spec's activation."""

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.weight_shape))
        self.bias = nn.Parameter(torch.zeros(spec.out_features))
        self.act = ACTIVATIONS[spec.activation]
        init_weight(self.weight, spec.activation, "classic", spec)


class Dense(_Layer):
    """``act(x @ W.T + b)``; W is [out, in] as in ``nn.Linear``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        return self.act(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return self.spec.brief().removeprefix("dense ")


class Conv2dLayer(_Layer):
    """``act(conv2d(x, W, b))`` on [N, C, H, W]."""
    def forward(self, x: Tensor) -> Tensor:
        y = F.conv2d(x, self.weight, self.bias, stride=self.spec.stride, padding=self.spec.padding)
        return self.act(y)

    def extra_repr(self) -> str:
        return self.spec.brief().removeprefix("conv2d ")




@torch.no_grad()
def init_weight(
    weight: Tensor,
    activation: str,
    scheme: str,
    spec: LayerSpec | None = None,
    generator: torch.Generator | None = None,
    sparse_nonzero: int = 15,
) -> Tensor:
    """Initialise ``weight`` in place.

    classic: Glorot uniform, x4 for sigmoid (Glorot & Bengio 2010; the Theano tutorials'
             choice); He normal for relu.  xavier: Glorot uniform.  he: Kaiming normal.
    sparse:  each unit gets ``sparse_nonzero`` non-zero incoming weights drawn from N(0, 1)
             (Martens 2010); the rest are 0.  torch: PyTorch's nn.Linear default.
    """
    if generator is not None and generator.device != weight.device:
        # Draw where the generator lives (a seeded CPU generator gives the same numbers on
        # every device), then copy: a CUDA tensor cannot be filled from a CPU generator.
        cpu = init_weight(torch.empty(weight.shape), activation, scheme, spec, generator, sparse_nonzero)
        return weight.copy_(cpu)
    fan_in = math.prod(weight.shape[1:])
    fan_out = weight.shape[0] * math.prod(weight.shape[2:])
    g = generator
    if scheme == "classic" and activation == "relu":
        scheme = "he"
    if scheme in ("classic", "xavier"):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        if scheme == "classic" and activation == "sigmoid":
            bound *= 4.0
        weight.uniform_(-bound, bound, generator=g)
    elif scheme == "he":
        weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=g)
    elif scheme == "sparse":
        weight.zero_()
        flat = weight.view(weight.shape[0], -1)
        k = min(sparse_nonzero, flat.shape[1])
        scores = torch.rand(flat.shape, generator=g, device=weight.device)
        idx = scores.topk(k, dim=1).indices
        vals = torch.randn((flat.shape[0], k), generator=g, device=weight.device)
        flat.scatter_(1, idx, vals.to(flat.dtype))
    elif scheme == "torch":
        bound = 1.0 / math.sqrt(fan_in)
        weight.uniform_(-bound, bound, generator=g)
    else:
        check_init(scheme)
    return weight
