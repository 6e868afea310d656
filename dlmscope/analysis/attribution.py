"""Attribution graphs for diffusion LMs: a transcoder replacement model frozen at one denoising step.

The method is Ameisen et al. 2025 ("Circuit Tracing"): at one forward pass, freeze every attention pattern
and every RMSNorm denominator, and replace each MLP by its transcoder plus an error node (the MLP's real
output minus the transcoder's). The residual stream is then linear in its inputs: token embeddings
(visible tokens and mask tokens alike: a DLM reads both), active transcoder features (their decoder
vectors scaled by their activations), error nodes and biases. An edge s -> t is the direct effect of s on
t's input through those frozen linear paths (attention's OV circuits, skip transcoders' linear path, the
residual stream): for a feature target its encoder pre-activation, for the logit target the target
token's logit (or the difference of two tokens' logits) at the target position. Rows are computed by
batched backward passes through the frozen model, written out by hand (`FrozenStep.backward`): one pass per
batch of targets, `1 + sum over layers of ceil(n_l / batch)` passes for n_l active features at layer l.

Only decoders shaped like Llama / Qwen2 (LLaDA, Dream, their AR twins) are traced: the frozen patterns are the
model's own (`blocks.{i}.attn.hook_pattern`), the norm denominators are recomputed from the residual sites, and
the frozen model is checked against the real logits. Pruning follows the paper: influence on the target
through the row-normalised |adjacency|; keep the nodes carrying `node_threshold` of it and the edges carrying
`edge_threshold`. `max_feature_nodes` bounds the rows computed (the most influential features first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..models.base import LoadedModel

# Node kinds in circuit-tracer's JSON schema (its viewer keys on these strings).
FEATURE_TYPE = "cross layer transcoder"
ERROR_TYPE = "mlp reconstruction error"
TOKEN_TYPE = "embedding"
LOGIT_TYPE = "logit"


# ------------------------------------------------------------------------------------------ transcoders
def load_transcoders(lm: LoadedModel, spec: str | Path | list) -> list:
    """One transcoder per layer, in layer order, checked against `lm`.

    `spec`: a folder of transcoder folders (a train-sae run's `saes/`), a registered prefix (`tiny-dlm-tc` loads
    `tiny-dlm-tc-L0` ...), a comma-separated list of registered names / folders, or a list of loaded transcoders.
    """
    from ..sae.registry import load_sae, registry

    if isinstance(spec, list):
        tcs = spec
    else:
        text = str(spec)
        folder = Path(text).expanduser()
        named = sorted((n for n in registry() if n.startswith(f"{text}-L") and n[len(text) + 2:].isdigit()),
                       key=lambda n: int(n[len(text) + 2:]))
        if folder.is_dir() and not (folder / "cfg.json").is_file():
            subs = sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file())
            if not subs:
                raise DLMScopeError(f"transcoders={text!r}: the folder holds no transcoder folders (cfg.json)")
            tcs = [load_sae(p) for p in subs]
        elif named:
            tcs = [load_sae(n) for n in named]
        else:
            tcs = [load_sae(p.strip()) for p in text.split(",") if p.strip()]
    return check_transcoders(lm, tcs)


def check_transcoders(lm: LoadedModel, tcs: list) -> list:
    """Transcoders sorted by layer; one line if they do not read mlp_in and write mlp_out of every layer of `lm`."""
    from .splice import check_sae_matches

    by_layer = {}
    for tc in tcs:
        if not tc.cfg.architecture.endswith("transcoder"):
            raise DLMScopeError(f"{tc.cfg.hook_name}: architecture {tc.cfg.architecture!r} is not a transcoder "
                                "(allowed: transcoder, skip_transcoder)")
        check_sae_matches(lm, tc)
        layer = lm.layer_of(tc.cfg.hook_name)
        if tc.cfg.hook_name != f"blocks.{layer}.hook_mlp_in" or tc.cfg.hook_name_out != f"blocks.{layer}.hook_mlp_out":
            raise DLMScopeError(f"transcoder {tc.cfg.hook_name} -> {tc.cfg.hook_name_out} must read "
                                f"blocks.{layer}.hook_mlp_in and write blocks.{layer}.hook_mlp_out")
        if layer in by_layer:
            raise DLMScopeError(f"two transcoders for layer {layer}")
        by_layer[layer] = tc
    missing = sorted(set(range(lm.n_layers)) - set(by_layer))
    if missing:
        raise DLMScopeError(f"transcoders cover layers {sorted(by_layer)}; {lm.name} has layers "
                            f"0..{lm.n_layers - 1} (missing {missing})")
    return [by_layer[i].to(lm.device).eval() for i in range(lm.n_layers)]


# ------------------------------------------------------------------------------------------ the frozen model
@dataclass
class Target:
    """What the graph explains: the logit of `token` at sequence position `position` (minus `contrast`'s)."""

    position: int
    token: int
    contrast: int | None = None


def read_position(lm: LoadedModel, position: int) -> int:
    """The raw logit row that predicts `position` (the previous one for AR and Dream-style shifted models)."""
    return position - 1 if (lm.shift or lm.causal) else position


def check_target(lm: LoadedModel, ids: torch.Tensor, target: Target, masked: torch.Tensor | None) -> None:
    """One line for a position outside the input, a token outside the vocabulary, or (DLMs) a visible position."""
    L = ids.shape[-1]
    low = 1 if (lm.shift or lm.causal) else 0
    if not low <= target.position < L + (1 if lm.causal else 0):
        raise DLMScopeError(f"target position {target.position} is outside the input (allowed {low}..{L - 1})")
    for name, tok in (("token", target.token), ("contrast", target.contrast)):
        if tok is not None and not 0 <= tok < lm.vocab_size:
            raise DLMScopeError(f"{name} {tok} is outside the vocabulary (allowed 0..{lm.vocab_size - 1})")
    if masked is not None and not bool(masked[target.position]):
        raise DLMScopeError(f"target position {target.position} is not masked in this input; a DLM's graph explains "
                            "a masked position (pick a step before its reveal)")


def _attention_parts(lm: LoadedModel):
    """The decoder module, when its layers are Llama/Qwen2-shaped with attention pattern sites (else one line)."""
    module = lm.module
    for i, layer in enumerate(lm.layers):
        attn = getattr(layer, "self_attn", None)
        if f"blocks.{i}.attn.hook_pattern" not in lm.sites or not all(
                hasattr(attn, n) for n in ("v_proj", "o_proj", "head_dim")) \
                or not hasattr(layer, "input_layernorm") or not hasattr(layer, "post_attention_layernorm"):
            raise DLMScopeError(f"{lm.name} ({lm.family}): attribution graphs need Llama/Qwen2-shaped decoder layers "
                                "(attention pattern sites, v/o projections, input and post-attention RMSNorms)")
    if not hasattr(getattr(module, "model", None), "norm") or not hasattr(module, "lm_head"):
        raise DLMScopeError(f"{lm.name} ({lm.family}): attribution graphs need a final norm and an lm_head")
    return module


class FrozenStep:
    """The model at one input with attention patterns and norm denominators frozen, MLPs replaced by transcoders.

    Built from one real forward (`ids` (L,) one sequence). `linear_logits` runs the frozen replacement model
    forward (it reproduces the real logits exactly, errors included); `backward` runs its transpose for a
    batch of targets and returns the direct effects of every source node on each.
    """

    def __init__(self, lm: LoadedModel, transcoders: list, ids: torch.Tensor):
        module = _attention_parts(lm)
        self.lm, self.tcs = lm, transcoders
        dev = lm.device
        self.ids = ids.to(dev).reshape(-1)
        n = lm.n_layers
        names = [f"blocks.{i}.hook_{s}" for i in range(n) for s in ("resid_pre", "resid_mid", "mlp_in", "mlp_out")]
        names += [f"blocks.{i}.attn.hook_pattern" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
        with torch.no_grad():
            acts = {k: v[0].float() for k, v in run_with_cache(lm, self.ids[None], names, stop_early=False).items()}
            self.logits = lm.forward(self.ids[None])[0].float()
            self.layers: list[dict[str, Any]] = []
            layers: list[Any] = list(lm.layers)
            for i, layer in enumerate(layers):
                attn, tc = layer.self_attn, transcoders[i]
                dh = attn.head_dim
                self.layers.append(dict(
                    pattern=acts[f"blocks.{i}.attn.hook_pattern"],  # (H, L, L), the model's own
                    a1=_inv_rms(acts[f"blocks.{i}.hook_resid_pre"], layer.input_layernorm),
                    w1=layer.input_layernorm.weight.float(),
                    a2=_inv_rms(acts[f"blocks.{i}.hook_resid_mid"], layer.post_attention_layernorm),
                    w2=layer.post_attention_layernorm.weight.float(),
                    Wv=attn.v_proj.weight.float(), bv=_bias(attn.v_proj), Wo=attn.o_proj.weight.float(),
                    bo=_bias(attn.o_proj), n_kv=attn.v_proj.weight.shape[0] // dh, dh=dh,
                    mlp_in=acts[f"blocks.{i}.hook_mlp_in"], mlp_out=acts[f"blocks.{i}.hook_mlp_out"],
                    s_in=float(tc.input_scale), s_out=float(tc.output_scale),
                    skip=(tc.W_skip.float() * float(tc.input_scale / tc.output_scale)
                          if tc.cfg.architecture == "skip_transcoder" else None)))
            norm = module.model.norm
            last = acts[f"blocks.{n - 1}.hook_resid_post"]
            self.af, self.wf = _inv_rms(last, norm), norm.weight.float()
            self.W_U, self.b_U = module.lm_head.weight.float(), _bias(module.lm_head)
            self.embed = module.model.embed_tokens.weight[self.ids].float()
            self._features()

    def _features(self) -> None:
        """Active features (layer, position, latent), their activations and pre-activations; error vectors."""
        feats, acts, pres = [], [], []
        for i, (tc, lay) in enumerate(zip(self.tcs, self.layers)):
            pre = tc.pre_acts(lay["mlp_in"]).float()
            act = tc.encode(lay["mlp_in"]).float()
            p, f = act.nonzero(as_tuple=True)
            feats.append(torch.stack([torch.full_like(p, i), p, f], 1))
            acts.append(act[p, f])
            pres.append(pre[p, f])
            lay["feat_out"] = (act @ tc.W_dec.float() + tc.b_dec.float()) / lay["s_out"]
            skip = lay["mlp_in"] @ lay["skip"].t() if lay["skip"] is not None else 0.0
            lay["error"] = lay["mlp_out"] - lay["feat_out"] - skip
        self.features = torch.cat(feats).cpu()  # (n_f, 3) layer, position, latent
        self.activations = torch.cat(acts)
        self.preacts = torch.cat(pres)

    @property
    def n_pos(self) -> int:
        return self.ids.numel()

    # --------------------------------------------------------------------------------------- forward
    @torch.no_grad()
    def linear_logits(self, activations: torch.Tensor | None = None) -> torch.Tensor:
        """(L, V) logits of the frozen replacement model; `activations` (n_f,) overrides the features' values
        (every other input, errors included, stays at the traced forward)."""
        act = self.activations if activations is None else activations
        r = self.embed
        for i, (tc, lay) in enumerate(zip(self.tcs, self.layers)):
            sel = self.features[:, 0] == i
            r = r + self._attn(r * lay["a1"][:, None] * lay["w1"], lay)
            m = r * lay["a2"][:, None] * lay["w2"]
            dense = torch.zeros(self.n_pos, tc.cfg.n_latents, device=r.device)
            dense[self.features[sel, 1], self.features[sel, 2]] = act[sel]
            out = (dense @ tc.W_dec.float() + tc.b_dec.float()) / lay["s_out"] + lay["error"]
            r = r + out + (m @ lay["skip"].t() if lay["skip"] is not None else 0.0)
        return (r * self.af[:, None] * self.wf) @ self.W_U.t() + (self.b_U if self.b_U is not None else 0.0)

    @torch.no_grad()
    def linear_preacts(self, activations: torch.Tensor) -> torch.Tensor:
        """(n_f,) feature pre-activations in the frozen model with the features' values set to `activations`."""
        r, out = self.embed, []
        for i, (tc, lay) in enumerate(zip(self.tcs, self.layers)):
            sel = self.features[:, 0] == i
            r = r + self._attn(r * lay["a1"][:, None] * lay["w1"], lay)
            m = r * lay["a2"][:, None] * lay["w2"]
            enc = tc.W_enc.float()[:, self.features[sel, 2]].t()
            out.append(((m[self.features[sel, 1]] * lay["s_in"]) * enc).sum(1)
                       + tc.b_enc.float()[self.features[sel, 2]])
            dense = torch.zeros(self.n_pos, tc.cfg.n_latents, device=r.device)
            dense[self.features[sel, 1], self.features[sel, 2]] = activations[sel]
            r = r + (dense @ tc.W_dec.float() + tc.b_dec.float()) / lay["s_out"] + lay["error"]
            r = r + (m @ lay["skip"].t() if lay["skip"] is not None else 0.0)
        return torch.cat(out)

    @staticmethod
    def _attn(h: torch.Tensor, lay: dict) -> torch.Tensor:
        L, H = h.shape[0], lay["pattern"].shape[0]
        v = h @ lay["Wv"].t() + (lay["bv"] if lay["bv"] is not None else 0.0)
        v = v.view(L, lay["n_kv"], lay["dh"]).transpose(0, 1).repeat_interleave(H // lay["n_kv"], dim=0)
        z = (lay["pattern"] @ v).transpose(0, 1).reshape(L, -1)
        return z @ lay["Wo"].t() + (lay["bo"] if lay["bo"] is not None else 0.0)

    # --------------------------------------------------------------------------------------- backward
    def backward(self, seed_final: torch.Tensor | None, seed_mid: torch.Tensor | None = None,
                 seed_layer: torch.Tensor | None = None, top: int | None = None):
        """Transpose of the frozen model for a batch of B targets.

        `seed_final` (B, L, d): each target's gradient at the final residual (logit targets); `seed_mid`
        (B, L, d) with `seed_layer` (B,): a gradient injected at that layer's mlp_in (feature targets; a
        layer's features then see nothing of its own MLP output). `top`: the highest layer to walk (default
        the last). Returns ({layer: (B, L, d) gradient at the layer's MLP output}, (B, L, d) gradient at the
        embeddings, (B,) the biases' total contribution).
        """
        top = self.lm.n_layers - 1 if top is None else top
        ref = seed_final if seed_final is not None else seed_mid
        assert ref is not None, "backward needs a seed"
        g = seed_final.clone() if seed_final is not None else torch.zeros_like(ref)
        bias = torch.zeros(ref.shape[0], device=ref.device)
        at_out = {}
        for i in range(top, -1, -1):
            lay, tc = self.layers[i], self.tcs[i]
            at_out[i] = g
            bias += g.sum(1) @ (tc.b_dec.float() / lay["s_out"])
            gm = g @ lay["skip"] if lay["skip"] is not None else torch.zeros_like(g)
            if seed_mid is not None and seed_layer is not None:
                gm = gm + seed_mid * torch.eq(seed_layer, i).to(seed_mid)[:, None, None]
            g = g + gm * (lay["a2"][:, None] * lay["w2"])
            if lay["bo"] is not None:
                bias += g.sum(1) @ lay["bo"]
            B, L, H = g.shape[0], self.n_pos, lay["pattern"].shape[0]
            gz = (g @ lay["Wo"]).view(B, L, H, lay["dh"]).transpose(1, 2)  # (B, H, L, dh)
            gv = lay["pattern"].transpose(-1, -2) @ gz  # (B, H, L, dh)
            gv = gv.view(B, lay["n_kv"], H // lay["n_kv"], L, lay["dh"]).sum(2).transpose(1, 2).reshape(B, L, -1)
            if lay["bv"] is not None:
                bias += gv.sum(1) @ lay["bv"]
            g = g + (gv @ lay["Wv"]) * (lay["a1"][:, None] * lay["w1"])
        return at_out, g, bias


def _inv_rms(x: torch.Tensor, norm) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.float()


# ------------------------------------------------------------------------------------------ the graph
@dataclass
class AttributionGraph:
    """Direct effects between the nodes of one step's replacement model.

    Node order (as circuit-tracer's): active features (sorted by layer, position, latent), error nodes (layer-
    major: layer * n_pos + position), token nodes (one per position), the target logit. `adjacency[t, s]` is
    the direct effect of source s on target t (rows of features and of the logit are filled); `bias[t]` the
    biases' share, so each filled row sums, with its bias, to `value[t]` (completeness).
    """

    tokens: list[int]
    masked: list[bool]
    target: Target
    features: torch.Tensor  # (n_f, 3) layer, position, latent
    activations: torch.Tensor  # (n_f,)
    adjacency: torch.Tensor  # (n, n)
    bias: torch.Tensor  # (n,)
    value: torch.Tensor  # (n,) feature pre-activations and the target logit (difference)
    n_layers: int
    probability: float  # the target token's probability under the real model
    step: int | None = None
    n_steps: int | None = None
    info: dict = field(default_factory=dict)
    computed: torch.Tensor | None = None  # (n_f,) bool: features whose incoming edges were computed

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def error_index(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.n_pos + position

    def token_index(self, position: int) -> int:
        return self.n_features + self.n_layers * self.n_pos + position

    @property
    def logit_index(self) -> int:
        return self.adjacency.shape[0] - 1


def attribute(lm: LoadedModel, transcoders: list, ids: torch.Tensor, target: Target, *,
              masked: torch.Tensor | None = None, batch_size: int = 256, step: int | None = None,
              n_steps: int | None = None, max_feature_nodes: int | None = None) -> AttributionGraph:
    """The attribution graph of `target` at input `ids` (L,), MLPs replaced by `transcoders` (one per layer).

    `masked` (L,) bool marks the positions that are mask tokens in this x_t (DLMs: the target must be one;
    default: where ids == mask_id). `batch_size` targets share one backward pass. `max_feature_nodes` caps the
    features whose incoming edges are computed (circuit-tracer's budget): after the logit's row, batches of the
    features most influential under the rows so far; the rest keep empty rows (their influence is reported as
    `info["uncomputed_influence"]` by `prune`). None computes every row.
    """
    ids = torch.as_tensor(ids).reshape(-1)
    if masked is None and lm.is_diffusion:
        masked = ids == lm.require_mask_id()
    check_target(lm, ids, target, masked)
    with torch.no_grad():
        fs = FrozenStep(lm, transcoders, ids)
        return _graph(fs, target, masked, batch_size, step, n_steps, max_feature_nodes)


def _graph(fs: FrozenStep, target: Target, masked, batch_size: int, step, n_steps,
           max_feature_nodes: int | None) -> AttributionGraph:
    lm, L, n_layers = fs.lm, fs.n_pos, fs.lm.n_layers
    d = lm.d_model
    n_f = fs.features.shape[0]
    n = n_f + n_layers * L + L + 1
    dev = fs.embed.device
    A = torch.zeros(n, n)
    bias = torch.zeros(n)
    value = torch.zeros(n)
    feats = fs.features.to(dev)
    per_layer = [(feats[:, 0] == i).nonzero().squeeze(1) for i in range(n_layers)]
    dec = [fs.activations[idx, None] * fs.tcs[i].W_dec.float()[feats[idx, 2]] / fs.layers[i]["s_out"]
           for i, idx in enumerate(per_layer)]

    def fill(rows: torch.Tensor, at_out: dict, g_emb: torch.Tensor, b: torch.Tensor) -> None:
        for i, g in at_out.items():
            idx = per_layer[i]
            A[rows[:, None], idx.cpu()[None]] = (g[:, feats[idx, 1]] * dec[i]).sum(-1).cpu()
            cols = n_f + i * L + torch.arange(L)
            A[rows[:, None], cols[None]] = (g * fs.layers[i]["error"]).sum(-1).cpu()
        A[rows[:, None], (n_f + n_layers * L + torch.arange(L))[None]] = (g_emb * fs.embed).sum(-1).cpu()
        bias[rows] = b.cpu()

    # the logit row: one backward pass from the final residual
    p = read_position(lm, target.position)
    w = fs.W_U[target.token] - (fs.W_U[target.contrast] if target.contrast is not None else 0.0)
    seed = torch.zeros(1, L, d, device=dev)
    seed[0, p] = w * fs.af[p] * fs.wf
    at_out, g_emb, b = fs.backward(seed)
    if fs.b_U is not None:
        b = b + fs.b_U[target.token] - (fs.b_U[target.contrast] if target.contrast is not None else 0.0)
    fill(torch.tensor([n - 1]), at_out, g_emb, b)
    logits = fs.logits[p]
    value[n - 1] = float(logits[target.token] - (logits[target.contrast] if target.contrast is not None else 0.0))
    n_passes = 1
    W_in = [fs.layers[i]["s_in"] * tc.W_enc.float() for i, tc in enumerate(fs.tcs)]
    b_enc = torch.cat([fs.tcs[i].b_enc.float()[feats[idx, 2]] for i, idx in enumerate(per_layer)])  # features' order

    def feature_rows(chunk: torch.Tensor) -> None:
        """One backward pass for a batch of features (any layers), each seeded at its layer's mlp_in."""
        layer, pos, latent = feats[chunk, 0], feats[chunk, 1], feats[chunk, 2]
        seed = torch.zeros(chunk.numel(), L, d, device=dev)
        for i in layer.unique().tolist():
            sel = (layer == i).nonzero().squeeze(1)
            seed[sel, pos[sel]] = W_in[i][:, latent[sel]].t()
        at_out, g_emb, b = fs.backward(None, seed, layer, int(layer.max()))
        fill(chunk.cpu(), at_out, g_emb, b + b_enc[chunk])

    n_passes = 1
    if max_feature_nodes is None:  # every feature, batched within a layer (the walk stops at that layer)
        for idx in per_layer:
            for start in range(0, idx.numel(), batch_size):
                feature_rows(idx[start:start + batch_size])
                n_passes += 1
        done = torch.ones(n_f, dtype=torch.bool)
    else:  # circuit-tracer's budget: rows of the features most influential so far, a batch at a time
        done = torch.zeros(n_f, dtype=torch.bool)
        w = torch.zeros(n)
        w[-1] = 1.0
        while int(done.sum()) < min(max_feature_nodes, n_f):
            inf = _through(_normalised(A), w)[:n_f].masked_fill(done, -1.0)
            take = min(batch_size, min(max_feature_nodes, n_f) - int(done.sum()))
            chunk = inf.topk(take).indices
            chunk = chunk[inf[chunk] > 0]
            if chunk.numel() == 0:
                break
            feature_rows(chunk.to(dev))
            done[chunk] = True
            n_passes += 1
    value[:n_f] = fs.preacts.cpu()
    probs = fs.logits[p].softmax(-1)
    return AttributionGraph(tokens=fs.ids.tolist(), masked=(masked.tolist() if masked is not None else [False] * L),
                            target=target, features=fs.features, activations=fs.activations.cpu(), adjacency=A,
                            bias=bias, value=value, n_layers=n_layers, probability=float(probs[target.token]),
                            step=step, n_steps=n_steps, info={"backward_passes": n_passes, "batch_size": batch_size,
                                                              "computed_features": int(done.sum())},
                            computed=done)


# ------------------------------------------------------------------------------------------ pruning
@dataclass
class Pruned:
    """What pruning keeps: node and edge masks, and each node's influence on the target (raw and cumulative)."""

    node_mask: torch.Tensor  # (n,) bool
    edge_mask: torch.Tensor  # (n, n) bool, [target, source]
    influence: torch.Tensor  # (n,) indirect influence on the target through the normalised graph
    cumulative: torch.Tensor  # (n,) share of all influence carried by nodes at least this influential


def _normalised(A: torch.Tensor) -> torch.Tensor:
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp(min=1e-10)


def _through(N: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w N + w N^2 + ...: the graph is a DAG, so the series ends after at most n_layers + 2 terms."""
    cur = w @ N
    total = cur.clone()
    for _ in range(N.shape[0]):
        if not cur.any():
            return total
        cur = cur @ N
        total += cur
    raise DLMScopeError("the attribution graph has a cycle; influence does not converge")


def _cutoff(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The smallest score among the top scores that together carry `share` of the total."""
    s = scores.flatten()
    s = s[s > 0].sort(descending=True).values  # zeros never count towards the share (most edges are absent)
    if s.numel() == 0:
        return scores.new_tensor(float("inf"))
    cum = s.cumsum(0) / s.sum().clamp(min=1e-30)
    return s[min(int(torch.searchsorted(cum, torch.tensor(share))), s.numel() - 1)]


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes carrying `node_threshold` of the influence on the target and the edges carrying
    `edge_threshold` (token and logit nodes always stay); drop features and errors left without an outgoing
    kept edge and features without an incoming one, until nothing changes. One line if nothing is left."""
    from .. import checks

    checks.number("node_threshold", node_threshold, 0.0, 1.0)
    checks.number("edge_threshold", edge_threshold, 0.0, 1.0)
    A, n, n_f = graph.adjacency, graph.adjacency.shape[0], graph.n_features
    leaves = graph.token_index(0)
    w = torch.zeros(n)
    w[-1] = 1.0
    influence = _through(_normalised(A), w)
    nodes = influence >= _cutoff(influence, node_threshold)
    nodes[leaves:] = True
    kept = A.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    N = _normalised(kept)
    edge_scores = N * (_through(N, w) + w)[:, None]
    edges = (edge_scores >= _cutoff(edge_scores, edge_threshold)) & (edge_scores > 0)
    while True:
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:leaves] &= edges[:, :leaves].any(0)
        nodes[:n_f] &= edges[:n_f].any(1)
        if torch.equal(before, nodes):
            break
    if not edges[-1].any():
        raise DLMScopeError(f"the graph is empty after pruning (node_threshold={node_threshold}, edge_threshold="
                            f"{edge_threshold}): no edge into the target logit survives; raise the thresholds")
    order = influence.argsort(descending=True)
    cumulative = torch.zeros(n)
    cumulative[order] = influence[order].cumsum(0) / influence.sum().clamp(min=1e-30)
    return Pruned(nodes, edges, influence, cumulative)


def total_effects(graph: AttributionGraph) -> torch.Tensor:
    """(n_f,) each feature's total effect on the target in the frozen replacement model when it is switched off:
    minus its activation times the sum over all paths of the per-unit-activation edge weights."""
    A, n_f = graph.adjacency, graph.n_features
    C = A.clone()
    C[:, :n_f] /= graph.activations.clamp(min=1e-12)[None]
    w = torch.zeros(A.shape[0])
    w[-1] = 1.0
    return -graph.activations * _through(C, w)[:n_f]


def ablate_in_model(lm: LoadedModel, transcoders: list, graph: AttributionGraph, features: list[int]) -> torch.Tensor:
    """(len(features),) change of the target in the real model (attention, norms and every MLP live) when each
    feature's decoder contribution is removed from its layer's MLP output at its position (one forward each)."""
    from ..hooks import hooked

    ids = torch.tensor(graph.tokens, device=lm.device)
    k = len(features)
    tgt = graph.target
    p = read_position(lm, tgt.position)

    def value(logits):
        return logits[:, p, tgt.token] - (logits[:, p, tgt.contrast] if tgt.contrast is not None else 0.0)

    edits: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for row, f in enumerate(features):
        layer, pos, latent = graph.features[f].tolist()
        tc = transcoders[layer]
        vec = graph.activations[f] * tc.W_dec[latent].float() / float(tc.output_scale)
        edits.setdefault(layer, []).append((row, pos, vec))

    def edit(layer):
        def fn(act, ctx):
            act = act.clone()
            for row, pos, vec in edits[layer]:
                act[row, pos] -= vec.to(act)
            return act
        return fn

    with torch.no_grad():
        base = value(lm.forward(ids[None]).float())
        with hooked(lm, {f"blocks.{i}.hook_mlp_out": edit(i) for i in edits}):
            out = value(lm.forward(ids[None].expand(k, -1)).float())
    return (out - base).cpu()


# ------------------------------------------------------------------------------------------ JSON and figure
def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _token_text(tokenizer, tok: int) -> str:
    return tokenizer.decode([tok]) if tokenizer is not None else str(tok)


def graph_json(graph: AttributionGraph, pruned: Pruned, tokenizer=None, *, slug: str = "graph", scan: str = "",
               transcoder_list: list[str] | None = None, node_threshold: float = 0.8,
               edge_threshold: float = 0.98, model: str = "") -> dict:
    """The pruned graph in circuit-tracer's JSON schema (metadata, qParams, nodes, links; its viewer opens it).

    DLM additions: metadata `step`, `n_steps`, `target_position`, `masked` (per position: a mask token in this
    x_t), `model`, `edge_threshold`; every node `step` and `masked` (its position's); the target logit sits at
    the target position (circuit-tracer's is always the last one).
    """
    n_f, L, n_layers = graph.n_features, graph.n_pos, graph.n_layers
    tgt = graph.target
    nodes: dict[int, dict] = {}

    def node(idx: int, **fields) -> None:
        pos = fields["ctx_idx"]
        fields.setdefault("jsNodeId", fields["node_id"])
        nodes[idx] = {"feature_type": "", "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                      "reverse_ctx_idx": 0, "clerp": "", "influence": float(pruned.cumulative[idx]),
                      "activation": None, **fields, "step": graph.step, "masked": bool(graph.masked[pos])}

    for idx in pruned.node_mask.nonzero().squeeze(1).tolist():
        if idx < n_f:
            layer, pos, latent = graph.features[idx].tolist()
            node(idx, node_id=f"{layer}_{latent}_{pos}", feature=_cantor(layer, latent), layer=str(layer), ctx_idx=pos,
                 feature_type=FEATURE_TYPE, jsNodeId=f"{layer}_{latent}-0", activation=float(graph.activations[idx]))
        elif idx < graph.token_index(0):
            layer, pos = divmod(idx - n_f, L)
            node(idx, node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos, feature_type=ERROR_TYPE,
                 jsNodeId=f"{layer}_-1-{pos}")
        elif idx < graph.logit_index:
            pos = idx - graph.token_index(0)
            tok = graph.tokens[pos]
            node(idx, node_id=f"E_{tok}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type=TOKEN_TYPE,
                 jsNodeId=f"E_{tok}-{pos}", clerp=_token_text(tokenizer, tok))
        else:
            layer = str(n_layers + 1)
            text = _token_text(tokenizer, tgt.token)
            if tgt.contrast is not None:
                text += f'" - "{_token_text(tokenizer, tgt.contrast)}'
            node(idx, node_id=f"{layer}_{tgt.token}_{tgt.position}", feature=tgt.token, layer=layer,
                 ctx_idx=tgt.position, feature_type=LOGIT_TYPE, token_prob=graph.probability, is_target_logit=True,
                 jsNodeId=f"L_{tgt.token}-{tgt.position}", clerp=f'Output "{text}" (p={graph.probability:.3f})')
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(dst.tolist(), src.tolist()) if s in nodes and t in nodes]
    used = {x for link in links for x in (link["source"], link["target"])}
    kept = [v for v in nodes.values() if v["node_id"] in used or v["feature_type"] in (TOKEN_TYPE, LOGIT_TYPE)]
    prompt_tokens = [_token_text(tokenizer, t) for t in graph.tokens]
    return {
        "metadata": {"slug": slug, "scan": scan, "transcoder_list": transcoder_list or [],
                     "prompt_tokens": prompt_tokens, "prompt": "".join(prompt_tokens),
                     "node_threshold": node_threshold, "schema_version": 1, "edge_threshold": edge_threshold,
                     "model": model, "step": graph.step, "n_steps": graph.n_steps,
                     "target_position": tgt.position, "masked": list(map(bool, graph.masked)),
                     "target_value": float(graph.value[-1]), **graph.info},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": kept,
        "links": links,
    }


def node_xy(data: dict) -> dict[str, tuple[float, int]]:
    """node_id -> (x, y) in a layer x position layout: y = 0 for tokens, layer + 1 for features and errors, the
    top row for the logit; nodes sharing a cell spread across it."""
    cells: dict[tuple[int, int], list[str]] = {}
    for v in data["nodes"]:
        y = 0 if v["layer"] == "E" else int(v["layer"]) + (0 if v["feature_type"] == LOGIT_TYPE else 1)
        cells.setdefault((v["ctx_idx"], y), []).append(v["node_id"])
    out = {}
    for (x, y), ids in cells.items():
        for j, nid in enumerate(sorted(ids)):
            out[nid] = (x + (j + 1) / (len(ids) + 1) - 0.5, y)
    return out


def graph_figure(graphs: dict | list[dict], hover: dict[str, str] | None = None):
    """A plotly figure of one graph JSON or of several (one column per step, cross-step links drawn between
    them); `hover` adds text (e.g. a feature's top examples) to the node ids it names."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    graphs = [graphs] if isinstance(graphs, dict) else graphs
    titles = [f"step {g['metadata'].get('step')}, position {g['metadata'].get('target_position')}" for g in graphs]
    fig = make_subplots(rows=1, cols=len(graphs), shared_yaxes=True, subplot_titles=titles, horizontal_spacing=0.03)
    colours = {FEATURE_TYPE: "#4c78a8", ERROR_TYPE: "#9d9d9d", TOKEN_TYPE: "#54a24b", LOGIT_TYPE: "#e45756"}
    for col, g in enumerate(graphs, start=1):
        xy = node_xy(g)
        top = max((abs(link["weight"]) for link in g["links"]), default=1.0) or 1.0
        for sign, colour in ((1, "rgba(76,120,168,0.45)"), (-1, "rgba(228,87,86,0.45)")):
            xs, ys = [], []
            for link in g["links"]:
                if (link["weight"] >= 0) == (sign > 0) and abs(link["weight"]) >= 0.02 * top:
                    (x0, y0), (x1, y1) = xy[link["source"]], xy[link["target"]]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": 1},
                                     hoverinfo="skip", showlegend=False), row=1, col=col)
        for kind, colour in colours.items():
            vs = [v for v in g["nodes"] if v["feature_type"] == kind]
            text = [f"{v['node_id']} ({kind})<br>{v['clerp']}<br>position {v['ctx_idx']}"
                    f"{' (masked)' if v.get('masked') else ''}<br>activation {v['activation']}<br>"
                    f"influence {v['influence']:.3f}" + (f"<br>{hover[v['node_id']]}" if hover and v['node_id'] in hover
                                                          else "") for v in vs]
            fig.add_trace(go.Scatter(x=[xy[v["node_id"]][0] for v in vs], y=[xy[v["node_id"]][1] for v in vs],
                                     mode="markers", name=kind, legendgroup=kind, showlegend=col == 1,
                                     marker={"color": colour, "size": 9,
                                             "symbol": ["square" if v.get("masked") else "circle" for v in vs]},
                                     text=text, hoverinfo="text", customdata=[v["node_id"] for v in vs]),
                          row=1, col=col)
        tokens = g["metadata"]["prompt_tokens"]
        masked = g["metadata"].get("masked") or [False] * len(tokens)
        fig.update_xaxes(tickvals=list(range(len(tokens))), row=1, col=col, tickangle=-90,
                         ticktext=[("[M]" if m else t.replace("\n", "\\n")) for t, m in zip(tokens, masked)])
    n_layers = max(int(v["layer"]) for g in graphs for v in g["nodes"] if v["feature_type"] == LOGIT_TYPE) - 1
    fig.update_yaxes(tickvals=list(range(n_layers + 2)),
                     ticktext=["emb"] + [f"L{i}" for i in range(n_layers)] + ["logit"],
                     row=1, col=1)
    fig.update_layout(height=520, width=max(700, 600 * len(graphs)), title="Attribution graph", hovermode="closest")
    return fig


# ------------------------------------------------------------------------------------------ across steps
@dataclass
class AttributeConfig:
    """A `dlmscope attribute` run: generate with the sampler, then the graph of one generated position at the step
    that committed its final token (or at --step), and optionally linked graphs at the reveal steps of the
    generated tokens that graph depends on most."""

    model: str = "dlmscope-tiny-dlm"
    """Model: a built-in name or a checkpoint folder."""
    transcoders: str = "tiny-dlm-tc"
    """Transcoders, one per layer: a registered prefix (tiny-dlm-tc = tiny-dlm-tc-L0..L5), a folder of transcoder
    folders (a train-sae run's saes/), or comma-separated names / folders."""
    prompt: str = "Sudoku: 3204402310402400\nSolution: "
    """Prompt text (one: its generation is traced)."""
    position: int = 0
    """The generated token to explain: its index among the generated tokens (0 = the first)."""
    step: int = -1
    """Denoising step of the graph (0-based; the position must still be masked then); -1 = its reveal step."""
    reveal_step: bool = False
    """Graph at the step that committed the position's final token (what an unset --step means too)."""
    token: int = -1
    """Target token id (-1 = the token the sampler committed there)."""
    contrast: int = -1
    """Explain the logit difference token - contrast (a token id; -1 = the logit alone)."""
    links: int = 0
    """Also trace this many generated tokens the graph depends on most, each at its own reveal step."""
    gen_length: int = 16
    """Tokens to generate."""
    steps: int = 16
    """Denoising steps."""
    block_length: int = 0
    """Semi-autoregressive block length (0 = the sampler's default)."""
    remasking: str = "low_confidence"
    """low_confidence, random (LLaDA); maskgit_plus, topk_margin, entropy, origin (Dream)."""
    node_threshold: float = 0.8
    """Pruning: keep the nodes that carry this share of the influence on the target."""
    edge_threshold: float = 0.98
    """Pruning: keep the edges that carry this share of the influence."""
    backward_batch: int = 256
    """Targets (features) per batched backward pass."""
    max_feature_nodes: int = 0
    """Compute incoming edges for at most this many features, the most influential first (0 = every feature)."""
    out: str = "attribution"
    """Output folder: attribution.json (every graph, cross-step links), graph_step{S}.json, attribution.html."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""

    def __post_init__(self) -> None:
        from .. import checks

        for name in ("model", "transcoders", "prompt", "remasking", "out"):
            checks.text(name, getattr(self, name))
        checks.non_negative("position", self.position)
        checks.integer("step", self.step, -1)
        checks.integer("token", self.token, -1)
        checks.integer("contrast", self.contrast, -1)
        checks.non_negative("links", self.links)
        for name in ("gen_length", "steps", "backward_batch"):
            checks.positive(name, getattr(self, name))
        checks.non_negative("block_length", self.block_length)
        checks.non_negative("max_feature_nodes", self.max_feature_nodes)
        checks.number("node_threshold", self.node_threshold, 0.0, 1.0)
        checks.number("edge_threshold", self.edge_threshold, 0.0, 1.0)
        checks.device("device", self.device)
        if self.position >= self.gen_length:
            raise DLMScopeError(f"position={self.position} is not a generated token (allowed 0..{self.gen_length - 1})")
        if self.step >= 0 and self.reveal_step:
            raise DLMScopeError(f"step={self.step} and reveal_step: give one of them")
        if self.step >= self.steps:
            raise DLMScopeError(f"step={self.step} is beyond the run (allowed 0..{self.steps - 1}, "
                                "or -1 = reveal step)")
        checks.writable_folder("out", self.out)


def _graph_at(lm, tcs, rec, position: int, token: int, contrast: int | None, cfg: AttributeConfig, slug: str,
              tokenizer) -> tuple[AttributionGraph, Pruned, dict]:
    x = rec.x[0]
    g = attribute(lm, tcs, x, Target(position, token, contrast), masked=rec.mask[0], batch_size=cfg.backward_batch,
                  step=rec.step, n_steps=rec.n_steps, max_feature_nodes=cfg.max_feature_nodes or None)
    pruned = prune(g, cfg.node_threshold, cfg.edge_threshold)
    names = [str(tc.cfg.metadata.get("name") or tc.cfg.hook_name) for tc in tcs]
    data = graph_json(g, pruned, tokenizer, slug=slug, scan=cfg.transcoders, transcoder_list=names,
                      node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold, model=lm.name)
    return g, pruned, data


def attribute_run(cfg: AttributeConfig) -> dict:
    """Run the sampler, trace the chosen position (and `links` tokens it depends on), write the outputs."""
    from ..diffusion.sampler import generate
    from ..io_utils import atomic_write_json, atomic_write_text
    from ..models import load_model

    lm = load_model(cfg.model, device=cfg.device)
    if not lm.is_diffusion:
        raise DLMScopeError(f"{lm.name} is autoregressive: `attribute` traces denoising steps; call "
                            "dlmscope.analysis.attribution.attribute on a token sequence instead")
    for name in ("token", "contrast"):
        if getattr(cfg, name) >= lm.vocab_size:
            raise DLMScopeError(f"{name}={getattr(cfg, name)} is outside the vocabulary "
                                f"(allowed 0..{lm.vocab_size - 1})")
    tcs = load_transcoders(lm, cfg.transcoders)
    out = generate(lm, [cfg.prompt], gen_length=cfg.gen_length, steps=cfg.steps,
                   block_length=cfg.block_length or None, remasking=cfg.remasking, return_history=True)
    P = out.prompt_length
    final = out.sequences[0]
    reveal = {int(q): rec.step for rec in out.history for q in rec.transfer[0].nonzero().squeeze(1).tolist()}
    pos = P + cfg.position
    step = reveal[pos] if cfg.step < 0 else cfg.step
    rec = out.history[step]
    if not bool(rec.mask[0, pos]):
        raise DLMScopeError(f"generated position {cfg.position} is not masked at step {step} (its token was "
                            f"committed at step {reveal[pos]}); pick a step <= {reveal[pos]}")
    token = int(final[pos]) if cfg.token < 0 else cfg.token
    contrast = None if cfg.contrast < 0 else cfg.contrast
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    g, pruned, data = _graph_at(lm, tcs, rec, pos, token, contrast, cfg, f"step{step}-pos{pos}", lm.tokenizer)
    graphs, cross = [data], []
    visible = [q for q in range(P, final.numel()) if q != pos and not bool(rec.mask[0, q])]
    ranked = sorted(visible, key=lambda q: -float(pruned.influence[g.token_index(q)]))
    for q in [q for q in ranked if float(pruned.influence[g.token_index(q)]) > 0][:cfg.links]:
        s = reveal[q]
        _, _, linked = _graph_at(lm, tcs, out.history[s], q, int(final[q]), None, cfg, f"step{s}-pos{q}",
                                 lm.tokenizer)
        graphs.append(linked)
        cross.append({"source": f"E_{int(final[q])}_{q}", "source_step": step,
                      "target": next(v["node_id"] for v in linked["nodes"] if v["is_target_logit"]),
                      "target_step": s, "weight": float(pruned.influence[g.token_index(q)])})
    for gr in graphs:
        meta = gr["metadata"]
        atomic_write_json(folder / f"graph_step{meta['step']}_pos{meta['target_position']}.json", gr)
    result = {"model": lm.name, "transcoders": cfg.transcoders, "prompt": cfg.prompt, "prompt_length": P,
              "text": (out.texts or [""])[0], "tokens": final.tolist(), "reveal_step": {str(k): v for k, v in reveal.items()},
              "graphs": graphs, "cross_links": cross}
    atomic_write_json(folder / "attribution.json", result)
    atomic_write_text(folder / "attribution.html", graph_figure(graphs).to_html(include_plotlyjs=True))
    return result
