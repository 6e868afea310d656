"""Expert routing across denoising steps in mixture-of-experts DLMs (LLaDA-MoE, LLaDA 2.x).

One sampler run, the chosen experts of every MoE layer captured at every step. Reported per layer:
- usage: the share of routed slots each expert receives, per step, on masked vs visible positions
  (visible = prompt tokens and already decoded ones; padding excluded);
- masked_vs_visible_tv: total variation distance between the two usage distributions pooled over steps;
- unmask_overlap: mean Jaccard overlap of a generated position's expert set at the last step it was
  masked and the first step it was visible (how much routing changes when the token appears);
- overlap_with_final_by_offset: mean Jaccard overlap with the position's final expert set, by step
  offset from its unmasking (negative = still masked).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from pathlib import Path

import torch

from ..diffusion.sampler import generate
from ..errors import DLMScopeError
from ..hooks import capture
from ..io_utils import atomic_write_json, atomic_write_text
from ..models.base import LoadedModel
from .order import jaccard

STATUSES = ("masked", "visible")


def moe_layers(lm: LoadedModel) -> list[int]:
    """Layers with a router (dense layers of a MoE model have none)."""
    if not lm.n_experts:
        raise DLMScopeError(f"{lm.name} ({lm.family}) has no experts; expert analysis needs an MoE model (lladamoe, llada2)")
    return sorted({lm.layer_of(n) for n in lm.hook_names if n.endswith(".hook_expert_indices")})


def check_layer(lm: LoadedModel, layer: int | None) -> None:
    """Fail before any sampling when `layer` has no router."""
    layers = moe_layers(lm)
    if layer is not None and layer not in layers:
        raise DLMScopeError(f"layer {layer} has no router; MoE layers: {', '.join(map(str, layers))}")


def usage_by_status(indices: torch.Tensor, masks: torch.Tensor, real: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(S, 2, E) share of routed slots per expert at each step on masked (0) / visible (1) real positions.

    indices (S, B, L, k) chosen experts, masks (S, B, L) masked before the step, real (B, L) non-padding.
    Rows with no positions of that status are NaN.
    """
    onehot = torch.zeros(*indices.shape[:-1], n_experts).scatter_add_(
        -1, indices, torch.ones(indices.shape))  # (S, B, L, E) slots per expert
    out = []
    for status in (masks, ~masks):
        keep = (status & real).float()[..., None]
        counts = (onehot * keep).sum((1, 2))
        out.append(counts / counts.sum(-1, keepdim=True))
    return torch.stack(out, 1)


def unmasking_overlap(indices: torch.Tensor, masks: torch.Tensor, gen_from: int, n_experts: int) -> dict:
    """Jaccard overlap of generated positions' expert sets around their unmasking step (see module doc)."""
    S = indices.shape[0]
    last_masked = masks[:, :, gen_from:].sum(0) - 1  # (B, G): the step that decoded the position
    sets = indices[:, :, gen_from:]
    final = sets[-1]
    by_offset: dict[int, list[float]] = {}
    switch = []
    for s in range(S):
        overlap = jaccard(sets[s], final, n_experts)  # (B, G)
        offset = s - (last_masked + 1)  # 0 = first step the position is visible
        for o in offset.unique().tolist():
            by_offset.setdefault(int(o), []).extend(overlap[offset == o].tolist())
        if s + 1 < S:
            at = last_masked == s
            switch.extend(jaccard(sets[s], sets[s + 1], n_experts)[at].tolist())
    return {"unmask_overlap": sum(switch) / len(switch) if switch else float("nan"),
            "overlap_with_final_by_offset": {o: sum(v) / len(v) for o, v in sorted(by_offset.items())}}


@torch.no_grad()
def expert_dynamics(lm: LoadedModel, prompts: Sequence[str] | Sequence[Sequence[int]], gen_length: int = 32,
                    steps: int = 32, block_length: int | None = None, seed: int = 0) -> dict:
    """Run the sampler once and measure expert routing per MoE layer (see module doc)."""
    layers = moe_layers(lm)
    names = [f"blocks.{i}.hook_expert_indices" for i in layers]
    n_experts = lm.n_experts
    assert n_experts is not None  # moe_layers raised for a dense model
    with capture(lm, names, to_cpu=True) as cache:
        out = generate(lm, prompts, gen_length=gen_length, steps=steps, block_length=block_length,
                       return_history=True, seed=seed)
    masks = torch.stack([h.mask.cpu() for h in out.history])  # (S, B, L)
    real = out.attention_mask.bool().cpu()
    result: dict[str, Any] = {"model": lm.name, "family": lm.family, "n_experts": lm.n_experts, "n_active": lm.n_active_experts,
              "steps": steps, "gen_length": gen_length, "prompt_length": out.prompt_length, "layers": {}}
    for layer, name in zip(layers, names):
        idx = torch.stack(cache.acts[name])  # (S, B, L, k)
        usage = usage_by_status(idx, masks, real, n_experts)
        pooled = [torch.nan_to_num(usage[:, j]).sum(0) for j in range(2)]
        pooled = [p / p.sum() for p in pooled]
        result["layers"][layer] = {
            "usage": {status: usage[:, j].tolist() for j, status in enumerate(STATUSES)},
            "masked_vs_visible_tv": float(0.5 * (pooled[0] - pooled[1]).abs().sum()),
            **unmasking_overlap(idx, masks, out.prompt_length, n_experts),
        }
    return result


def expert_figure(result: dict, layer: int | None = None):
    """Plotly figure: expert usage per step on masked and visible positions, and overlap with the final routing."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = result["layers"]
    layer = next(iter(layers)) if layer is None else layer
    if layer not in layers:
        raise DLMScopeError(f"layer {layer} has no router; MoE layers: {', '.join(map(str, layers))}")
    data = layers[layer]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("masked positions", "visible positions",
                                                        "overlap with final experts"))
    for col, status in enumerate(STATUSES, 1):
        z = torch.tensor(data["usage"][status]).T.tolist()  # (E, S)
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis", name=status), row=1, col=col)
        fig.update_xaxes(title_text="step", row=1, col=col)
        fig.update_yaxes(title_text="expert", row=1, col=col)
    offsets = data["overlap_with_final_by_offset"]
    fig.add_trace(go.Scatter(x=list(offsets), y=list(offsets.values()), mode="lines+markers", name="Jaccard"),
                  row=1, col=3)
    fig.update_xaxes(title_text="steps since unmasking", row=1, col=3)
    fig.update_layout(title=f"{result['model']}: layer {layer} routing (TV masked vs visible "
                            f"{data['masked_vs_visible_tv']:.3f})", coloraxis={"colorscale": "Viridis"})
    return fig


def write_expert_report(result: dict, out: str | Path, layer: int | None = None) -> tuple[Path, Path]:
    """experts.json and experts.html (the figure) under `out`."""
    out = Path(out)
    page = expert_figure(result, layer).to_html(include_plotlyjs=True)
    return atomic_write_json(out / "experts.json", result), atomic_write_text(out / "experts.html", page)
