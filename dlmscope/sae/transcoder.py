"""Transcoders and skip transcoders: read one hook, predict another (e.g. an MLP's input -> its output).

Transcoders (Dunefsky et al. 2024) replace an MLP by a sparse, wide one; skip transcoders (Paulo,
Shabalin, Belrose 2025) add a linear path, y_hat = f W_dec + b_dec + x W_skip^T, which lets the
latents spend their capacity on the non-linear part. Latents are BatchTopK-selected during training
with an inference threshold, like our BatchTopK SAEs, because that is what SAELens can store exactly:
its "jumprelu_transcoder" / "jumprelu_skip_transcoder" formats (encode ReLU(x W_enc + b_enc) gated by
the threshold; no b_dec on the input side, `d_out`, W_skip (d_out, d_in)). The input and the output
hook have their own scales (unit mean squared norm each); `metadata.hook_name_out` names the output hook.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import SAEConfig, TopKSAE


class Transcoder(TopKSAE):
    """A (skip) transcoder: encode the input hook's activations, decode the output hook's."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.register_buffer("out_scale", torch.ones(()))
        if cfg.architecture == "skip_transcoder":
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in))  # (d_out, d_in), SAELens' layout

    @property
    def output_scale(self) -> torch.Tensor:
        return self.out_scale

    def _encoder_input(self, xs: torch.Tensor) -> torch.Tensor:
        return xs  # b_dec lives in the output space

    def _skip(self, xs: torch.Tensor) -> torch.Tensor | float:
        return xs @ self.W_skip.t() if self.cfg.architecture == "skip_transcoder" else 0.0

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        if self.cfg.architecture == "skip_transcoder":
            self.W_skip.mul_(self.input_scale / self.out_scale)
        super().fold_input_scale()
