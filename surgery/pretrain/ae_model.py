"""The autoencoder layer's config and model, shared by the autograd loop
(:mod:`.autoencoder`) and the hand-written dense loop (:mod:`.dense_ae`).

The encoder *is* the layer (``weight`` [hidden, in], ``bias`` [hidden]); the decoder adds
``visible_bias`` and, when untied, ``decoder_weight``. Denoising corrupts the input
(masking, Gaussian or salt-and-pepper) and reconstructs the clean one; sparse adds
``sparsity_weight * KL(target || mean activation)`` per hidden unit.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from ..errors import ShapeError
from ..layers import ACTIVATIONS, LayerSpec, init_weight
from .base import LayerPretrainConfig, inactive_fraction


class AEConfig(LayerPretrainConfig):
    """``{method: ae|dae|sparse_ae|conv_ae, hidden, epochs, lr, noise, ...}``."""

    method: Literal["ae", "dae", "sparse_ae", "conv_ae"] = "dae"
    lr: float = Field(default=0.01, gt=0, le=100)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    tied: bool = Field(default=True, description="decoder uses the encoder's weight transposed")
    noise: float = Field(default=0.0, ge=0, description="corruption level (dae: default 0.25)")
    noise_kind: Literal["mask", "gaussian", "salt_pepper"] = "mask"
    loss: Literal["cross_entropy", "squared"] = Field(
        default="cross_entropy", description="cross_entropy needs inputs in [0, 1]"
    )
    sparsity_target: float = Field(default=0.05, gt=0, lt=1)
    sparsity_weight: float = Field(default=0.0, ge=0, description="sparse_ae: default 0.1")
    kernel_size: int = Field(default=5, gt=0, description="conv_ae only")
    stride: int = Field(default=1, gt=0, description="conv_ae only")
    padding: int = Field(default=0, ge=0, description="conv_ae only")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        # Method-specific defaults, applied only where the user left the field unset.
        if isinstance(data, dict):
            method = data.get("method", "dae")
            if method == "dae":
                data = {"noise": 0.25, **data}
            elif method == "sparse_ae":
                data = {"sparsity_weight": 0.1, **data}
        return data

    @model_validator(mode="after")
    def _noise_range(self) -> AEConfig:
        if self.noise_kind in ("mask", "salt_pepper") and self.noise >= 1:
            raise ValueError(f"noise={self.noise} must be below 1 for {self.noise_kind} corruption")
        return self

    def spec_for(self, in_shape: tuple[int, ...]) -> LayerSpec:
        """The layer this entry makes: dense, or conv2d for ``conv_ae`` (which needs image input)."""
        if self.method != "conv_ae":
            return super().spec_for(in_shape)
        if len(in_shape) != 3:
            raise ShapeError(f"conv_ae needs image input (C, H, W), got {in_shape}; set data.flatten: false")
        return LayerSpec(kind="conv2d", in_features=in_shape[0], out_features=self.hidden, in_shape=in_shape,
                         activation=self.activation, kernel_size=self.kernel_size, stride=self.stride,
                         padding=self.padding)

class AEModel(torch.nn.Module):
    """The autoencoder of one layer: the layer's ``weight`` [hidden, in] and ``bias``
    [hidden] as encoder, ``visible_bias`` and (untied) ``decoder_weight`` as decoder."""

    def __init__(self, spec: LayerSpec, cfg: AEConfig, in_shape: tuple[int, ...], g: torch.Generator):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.act = ACTIVATIONS[spec.activation]
        self.weight = torch.nn.Parameter(torch.empty(spec.weight_shape))
        init_weight(self.weight, spec.activation, "classic", spec, generator=g)
        self.bias = torch.nn.Parameter(torch.zeros(spec.out_features))
        nvis = in_shape[0] if spec.kind == "conv2d" else spec.in_features
        self.visible_bias = torch.nn.Parameter(torch.zeros(nvis))
        self.decoder_weight = None
        if not cfg.tied:
            # Initialised for its own output: sigmoid units under cross-entropy, linear ones under
            # squared loss. (With the sigmoid encoder's x4 scale there, the first errors of ~750
            # per MNIST image drove every hidden unit off.)
            out = "sigmoid" if cfg.loss == "cross_entropy" else "linear"
            self.decoder_weight = torch.nn.Parameter(torch.empty(spec.weight_shape))
            init_weight(self.decoder_weight, out, "classic", spec, generator=g)
        self.in_shape = in_shape

    def encode(self, x: Tensor) -> Tensor:
        """Hidden activations [N, hidden] (or [N, maps, H', W'] for conv layers)."""
        s = self.spec
        if s.kind == "conv2d":
            return self.act(F.conv2d(x, self.weight, self.bias, stride=s.stride, padding=s.padding))
        return self.act(F.linear(x, self.weight, self.bias))

    def decode_logits(self, h: Tensor) -> Tensor:
        """The reconstruction's pre-activation, shaped like the input."""
        w = self.weight if self.decoder_weight is None else self.decoder_weight
        s = self.spec
        if s.kind == "conv2d":
            out = F.conv_transpose2d(h, w, stride=s.stride, padding=s.padding)
            dh, dw = self.in_shape[1] - out.shape[2], self.in_shape[2] - out.shape[3]
            if dh or dw:
                out = F.pad(out, (0, dw, 0, dh))
            return out + self.visible_bias.view(1, -1, 1, 1)
        return torch.addmm(self.visible_bias, h, w)

    def loss(self, x_in: Tensor, x_target: Tensor) -> Tensor:
        """Reconstruction loss of ``x_target`` from ``x_in`` (summed, per example), plus sparsity."""
        h = self.encode(x_in)
        logits = self.decode_logits(h)
        n = x_target.shape[0]
        if self.cfg.loss == "cross_entropy":
            rec = F.binary_cross_entropy_with_logits(logits, x_target, reduction="sum") / n
        else:
            rec = F.mse_loss(logits, x_target, reduction="sum") / n
        if self.cfg.sparsity_weight > 0:
            rho = self.cfg.sparsity_target
            dims = [0, 2, 3] if h.dim() == 4 else [0]
            # KL needs mean activations in (0, 1): sigmoid units (or clamped others).
            rho_hat = h.mean(dim=dims).clamp(1e-6, 1 - 1e-6)
            kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
            rec = rec + self.cfg.sparsity_weight * kl.sum()
        return rec

    @torch.no_grad()
    def monitor(self, x: Tensor) -> dict[str, float]:
        """Per-epoch metrics on the monitor rows ``x``: the mean squared reconstruction error
        per example and, for a dense sigmoid layer, the fraction of its hidden units stuck
        off or on (``inactive_units``, as for an RBM)."""
        h = self.encode(x)
        logits = self.decode_logits(h)
        r = torch.sigmoid(logits) if self.cfg.loss == "cross_entropy" else logits
        out = {"recon_error": float(((x - r) ** 2).flatten(1).sum(1).mean())}
        if self.spec.kind == "dense" and self.spec.activation == "sigmoid":
            out["inactive_units"] = inactive_fraction(h)
        return out
