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

from ..errors import DLMScopeError
from .batchtopk import BatchTopKSAE
from .model import SAEConfig, register_architecture


@register_architecture("transcoder", saved_as="jumprelu_transcoder", reads_saelens=True)
class Transcoder(BatchTopKSAE):
    """A transcoder: encode the input hook's activations, decode the output hook's."""

    applies_b_dec_to_input = False  # b_dec lives in the output space
    transcodes = True
    out_scale: torch.Tensor

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.register_buffer("out_scale", torch.ones(()))

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        super().check_config(cfg)
        out = cfg.metadata.get("hook_name_out")
        if out is None or out == cfg.hook_name:
            raise DLMScopeError(f"a transcoder reads one hook and predicts another; got input {cfg.hook_name!r} "
                                f"and output {out!r}")

    def saelens_fields(self, cfg: dict, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        super().saelens_fields(cfg, meta, weights)
        cfg.update(d_out=self.cfg.d_in, apply_b_dec_to_input=False)

    @property
    def output_scale(self) -> torch.Tensor:
        return self.out_scale

    def _encoder_input(self, xs: torch.Tensor) -> torch.Tensor:
        return xs


@register_architecture("skip_transcoder", saved_as="jumprelu_skip_transcoder", reads_saelens=True)
class SkipTranscoder(Transcoder):
    """A transcoder with a linear path from input to output."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in))  # (d_out, d_in), SAELens' layout

    def saelens_fields(self, cfg: dict, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        super().saelens_fields(cfg, meta, weights)
        weights["W_skip"] = self.W_skip.detach().float().contiguous()

    def load_saelens_fields(self, weights: dict[str, torch.Tensor], where: str) -> None:
        super().load_saelens_fields(weights, where)
        if "W_skip" not in weights:
            raise DLMScopeError(f"{where!r} lacks 'W_skip'")
        if tuple(weights["W_skip"].shape) != tuple(self.W_skip.shape):
            raise DLMScopeError(f"{where!r}: weight W_skip has shape {tuple(weights['W_skip'].shape)}, "
                                f"expected {tuple(self.W_skip.shape)}")
        self.W_skip.copy_(weights["W_skip"].float())

    def _skip(self, xs: torch.Tensor) -> torch.Tensor | float:
        return xs @ self.W_skip.t()

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        self.W_skip.mul_(self.input_scale / self.out_scale)
        super().fold_input_scale()
