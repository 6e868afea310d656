"""Activation patching on a diffusion LM: which sites, positions, heads and denoising steps carry an answer.

A clean and a corrupted input of the same length run either as one denoising forward (the prompt followed by
`gen_length` masks, i.e. the sampler's first step) or through the real sampler. A `Patch` copies the clean
run's activation at one hook site (restricted to positions, one head, steps, or one SAE feature's
contribution) into the corrupted run; the metric is read at a masked target position: the logit difference of
the clean and the corrupted answer tokens, or the clean answer's log-probability. Under the sampler the metric
comes from the forward of the step that reveals the target, after the patched steps have shaped the trajectory
that leads there. Patched runs are batched: a sweep of N patches costs 2 + ceil(N / batch_size) forwards
(sampler: that many runs of `steps` forwards each). To patch the other way (corrupted into clean), swap the
inputs. Attribution patching approximates a whole forward-mode sweep from one forward and one backward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass, field, replace

import torch

from ..errors import DLMScopeError
from ..hooks import capture, hooked
from ..models import BACKENDS, FAMILIES
from ..models.base import ForwardState, LoadedModel
from ..options import ModelPart, choices, unset

MODES = ("forward", "sampler")
METRICS = ("logit_diff", "logprob")
SWEEPS = ("layer_position", "layer_head", "step_layer")
HEAD_AXES = {"q": (1, 2), "k": (1, 2), "v": (1, 2), "rot_q": (1, 2), "rot_k": (1, 2), "z": (1, 2), "pattern": (2, 1)}
"""Attention sites (TransformerLens names, `blocks.{i}.attn.hook_*`): (position axis, head axis). Every other
site is (batch, position, d): position axis 1, no heads."""
_ATTN_RE = re.compile(r"^blocks\.\d+\.attn\.hook_(\w+)$")


def site_axes(hook: str) -> tuple[int, int | None]:
    """(position axis, head axis or None) of a hook site's activation."""
    m = _ATTN_RE.match(hook)
    return HEAD_AXES.get(m.group(1), (1, None)) if m else (1, None)


def head_axis(hook: str) -> int:
    """The heads' axis of an attention site's activation; one line for a site without heads."""
    axis = site_axes(hook)[1]
    if axis is None:
        raise DLMScopeError(f"hook {hook!r} has no heads; heads are an axis of blocks.{{i}}.attn.hook_{{q,k,v,z,...}}")
    return axis


@dataclass(frozen=True)
class Patch:
    """One patched run: the clean activation at `hook` replaces the corrupted one where selected."""

    hook: str
    positions: tuple[int, ...] | None = None  # sequence positions (negative: from the end); None = all
    head: int | None = None  # one head of an attention site (`blocks.{i}.attn.hook_z` ...); None = all heads
    steps: tuple[int, ...] | None = None  # sampler steps; None = every step
    feature: int | None = None  # with an SAE at `hook`: patch only this latent's decoded contribution

    def label(self) -> str:
        parts = [self.hook]
        if self.head is not None:
            parts.append(f"head {self.head}")
        if self.positions is not None:
            parts.append("pos " + ",".join(map(str, self.positions)))
        if self.steps is not None:
            parts.append(f"steps {min(self.steps)}..{max(self.steps)}" if self.steps else "no steps")
        if self.feature is not None:
            parts.append(f"feature {self.feature}")
        return " | ".join(parts)


@dataclass
class PatchSetup:
    """The two inputs, where the answer is read and how the model runs them."""

    clean: list[int]  # prompt token ids
    corrupted: list[int]
    target: int  # position in prompt + generated region; negative counts from the end
    answer: int  # token id of the clean answer at `target`
    wrong: int | None = None  # token id of the corrupted answer (needed for logit_diff)
    metric: str = "logit_diff"
    mode: str = "forward"
    gen_length: int = 16  # masks appended after each prompt
    steps: int = 16  # sampler steps (mode "sampler")
    block_length: int | None = None
    remasking: str = "low_confidence"
    batch_size: int = 32

    def __post_init__(self) -> None:
        from .. import checks

        checks.choice("metric", self.metric, METRICS)
        checks.choice("mode", self.mode, MODES)
        checks.positive("gen_length", self.gen_length)
        checks.positive("steps", self.steps)
        checks.positive("batch_size", self.batch_size)
        if len(self.clean) != len(self.corrupted):
            raise DLMScopeError(f"clean and corrupted inputs differ in length ({len(self.clean)} vs "
                                f"{len(self.corrupted)} tokens); patching needs position-aligned inputs")
        if self.metric == "logit_diff" and self.wrong is None:
            raise DLMScopeError("metric='logit_diff' needs the corrupted answer token (wrong); or use metric='logprob'")
        length = self.length
        if not -length <= self.target < length:
            raise DLMScopeError(f"target={self.target} is outside the sequence of {length} positions "
                                f"({len(self.clean)} prompt + {self.gen_length} generated)")
        self.target %= length
        if self.target < len(self.clean):
            raise DLMScopeError(f"target={self.target} is a prompt position; the answer is read at a masked position "
                                f"({len(self.clean)}..{length - 1})")

    @property
    def length(self) -> int:
        return len(self.clean) + self.gen_length

    @property
    def n_steps(self) -> int:
        """Steps in a trajectory: 1 for a single forward."""
        return self.steps if self.mode == "sampler" else 1


@dataclass
class RunResult:
    """Metric per row (and, under the sampler, the step that revealed the target and the token put there)."""

    metric: torch.Tensor
    reveal_step: torch.Tensor | None = None
    token: torch.Tensor | None = None


@dataclass
class SweepResult:
    """A patching sweep: `effect[i, j]` for `rows[i]` x `cols[j]`, raw and normalised (1 = fully restored)."""

    kind: str
    row_name: str
    col_name: str
    rows: list
    cols: list
    effect: torch.Tensor  # patched metric
    clean: float
    corrupted: float
    forwards: int
    sequences: int
    attribution: torch.Tensor | None = None  # approximated patched metric - corrupted metric
    agreement: dict = field(default_factory=dict)
    tokens: torch.Tensor | None = None  # sampler: the token each patched run put at the target

    @property
    def normalised(self) -> torch.Tensor:
        gap = self.clean - self.corrupted
        return (self.effect - self.corrupted) / (gap if abs(gap) > 1e-9 else float("nan"))

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "row_name": self.row_name, "col_name": self.col_name, "rows": self.rows,
               "cols": self.cols, "effect": self.effect.tolist(), "normalised": self.normalised.tolist(),
               "clean": self.clean, "corrupted": self.corrupted, "forwards": self.forwards,
               "sequences": self.sequences}
        if self.attribution is not None:
            out |= {"attribution": self.attribution.tolist(), "agreement": self.agreement}
        if self.tokens is not None:
            out["tokens"] = self.tokens.tolist()
        return out


class Patcher:
    """Caches the clean run's activations at the sites patches read (one clean run per new set of sites) and
    batches patched corrupted runs; `forwards` / `sequences` count the model calls and rows so far."""

    def __init__(self, lm: LoadedModel, setup: PatchSetup, sae=None):
        if lm.causal:
            raise DLMScopeError(f"{lm.name} is autoregressive; patching reads a masked position of a diffusion model")
        vocab = lm.vocab_size
        for name, tok in (("answer", setup.answer), ("wrong", setup.wrong)):
            if tok is not None and not 0 <= tok < vocab:
                raise DLMScopeError(f"{name} token id {tok} is outside the vocabulary (0..{vocab - 1})")
        self.lm, self.setup, self.sae = lm, setup, sae
        self.forwards = 0
        self.sequences = 0
        self._cache: dict[str, list[torch.Tensor]] = {}
        self._baseline: dict[str, RunResult] = {}

    # ------------------------------------------------------------------------------------------ checks

    def check(self, patch: Patch) -> Patch:
        """Resolve and validate a patch against the model and the setup (one-line errors)."""
        self.lm.site(patch.hook)
        n = self.setup.length
        positions = patch.positions
        if positions is not None:
            bad = [p for p in positions if not -n <= p < n]
            if bad:
                raise DLMScopeError(f"position {bad[0]} is out of range for a sequence of {n} positions")
            positions = tuple(sorted({p % n for p in positions}))
        steps = patch.steps
        if steps is not None:
            bad = [s for s in steps if not 0 <= s < self.setup.n_steps]
            if bad:
                raise DLMScopeError(f"step {bad[0]} is past the trajectory: {self.setup.mode} mode has steps "
                                    f"0..{self.setup.n_steps - 1}")
            steps = tuple(sorted(set(steps)))
        if patch.head is not None:
            if site_axes(patch.hook)[1] is None:
                raise DLMScopeError(f"head={patch.head} needs an attention site with a head axis "
                                    f"(blocks.{{i}}.attn.hook_{{{'|'.join(HEAD_AXES)}}}); {patch.hook!r} has none")
            n_heads = self.n_heads(patch.hook)
            if not 0 <= patch.head < n_heads:
                raise DLMScopeError(f"head={patch.head} is out of range: {patch.hook} has heads 0..{n_heads - 1}")
        if patch.feature is not None:
            if self.sae is None or self.sae.cfg.hook_name != patch.hook:
                raise DLMScopeError(f"feature={patch.feature} needs an SAE trained at {patch.hook!r} "
                                    f"(given: {getattr(getattr(self.sae, 'cfg', None), 'hook_name', None)!r})")
            if not 0 <= patch.feature < self.sae.cfg.n_latents:
                raise DLMScopeError(f"feature={patch.feature} is out of range: the SAE has latents "
                                    f"0..{self.sae.cfg.n_latents - 1}")
        return replace(patch, positions=positions, steps=steps)

    def n_heads(self, hook: str) -> int:
        """Heads at an attention site, read from the clean run's cached activation."""
        return int(self.source(hook)[0].shape[head_axis(hook)])

    # ------------------------------------------------------------------------------------------- runs

    def _ids(self, prompt: list[int], n: int) -> torch.Tensor:
        mask_id = self.lm.require_mask_id()
        row = torch.tensor(list(prompt) + [mask_id] * self.setup.gen_length, dtype=torch.long)
        return row[None].expand(n, -1).clone()

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        """Metric of (B, V) logits at the target."""
        s = self.setup
        logits = logits.float()
        if s.metric == "logit_diff":
            return logits[:, s.answer] - logits[:, s.wrong]
        return logits.log_softmax(-1)[:, s.answer]

    def _run(self, prompt: list[int], n: int, fns: dict) -> RunResult:
        """`n` copies of `prompt` with hook functions `fns`: one forward, or a sampler run."""
        s, lm = self.setup, self.lm
        ids = self._ids(prompt, n)
        self.sequences += n
        if s.mode == "forward":
            lm.state = ForwardState(step=0, n_steps=1, mask=ids.eq(lm.require_mask_id()), t=1.0)
            try:
                with hooked(lm, fns), torch.no_grad():
                    logits = lm.denoise_logits(ids)
            finally:
                lm.state = ForwardState()
            self.forwards += 1
            return RunResult(self._score(logits[:, s.target]))
        from ..diffusion.sampler import generate

        metric = torch.full((n,), float("nan"))
        reveal = torch.full((n,), -1, dtype=torch.long)
        token = torch.full((n,), -1, dtype=torch.long)

        def record(step) -> None:
            hit = step.transfer[:, s.target].cpu()
            if hit.any():
                metric[hit] = self._score(step.logits[:, s.target]).cpu()[hit]
                reveal[hit] = step.step
                token[hit] = step.x0[:, s.target].cpu()[hit]

        with hooked(lm, fns), torch.no_grad():
            out = generate(lm, ids[:, :len(prompt)], gen_length=s.gen_length, steps=s.steps,
                           block_length=s.block_length, remasking=s.remasking, callback=record)
        self.forwards += out.n_forwards
        return RunResult(metric, reveal, token)

    def source(self, hook: str) -> list[torch.Tensor]:
        """The clean run's activation at `hook`, one (1, ...) tensor per step (captured on first use)."""
        self.prefetch([hook])
        return self._cache[hook]

    def prefetch(self, hooks: Sequence[str]) -> None:
        """Capture every hook a sweep reads in one clean run."""
        missing = [h for h in dict.fromkeys(hooks) if h not in self._cache]
        if not missing:
            return
        for h in missing:
            self.lm.site(h)
        with capture(self.lm, missing) as cache:
            result = self._run(self.setup.clean, 1, {})
        for h in missing:
            self._cache[h] = cache.acts[h]
        self._baseline.setdefault("clean", result)

    def baseline(self, which: str) -> RunResult:
        """The unpatched clean or corrupted run."""
        if which not in self._baseline:
            prompt = self.setup.clean if which == "clean" else self.setup.corrupted
            self._baseline[which] = self._run(prompt, 1, {})
        return self._baseline[which]

    def run(self, patches: Sequence[Patch]) -> RunResult:
        """The corrupted input with each patch applied in its own row, `batch_size` rows per run."""
        patches = [self.check(p) for p in patches]
        self.prefetch([p.hook for p in patches])
        parts = []
        for i in range(0, len(patches), self.setup.batch_size):
            chunk = patches[i:i + self.setup.batch_size]
            fns = {h: self._patch_fn([(r, p) for r, p in enumerate(chunk) if p.hook == h])
                   for h in dict.fromkeys(p.hook for p in chunk)}
            parts.append(self._run(self.setup.corrupted, len(chunk), fns))
        def cat(xs):
            return torch.cat(xs) if xs[0] is not None else None

        return RunResult(torch.cat([p.metric for p in parts]), cat([p.reveal_step for p in parts]),
                         cat([p.token for p in parts]))

    def _patch_fn(self, rows: list[tuple[int, Patch]]):
        """Hook function that writes the clean activation into the given rows where each patch selects."""
        hook = rows[0][1].hook
        pos_axis = site_axes(hook)[0]
        source = self._cache[hook]
        sae = self.sae

        def fn(act: torch.Tensor, ctx) -> torch.Tensor | None:
            step = ctx.state.step or 0
            live = [(r, p) for r, p in rows if p.steps is None or step in p.steps]
            if not live:
                return None
            clean = source[step if len(source) > 1 else 0].to(act.device, act.dtype)
            out = act.clone()
            for r, p in live:
                where = torch.ones(act.shape[1:], dtype=torch.bool, device=act.device)
                if p.positions is not None:
                    keep = torch.zeros(act.shape[pos_axis], dtype=torch.bool, device=act.device)
                    keep[list(p.positions)] = True
                    where &= keep.view([-1 if a == pos_axis else 1 for a in range(1, act.dim())])
                if p.head is not None:
                    heads = head_axis(p.hook)
                    keep = torch.zeros(act.shape[heads], dtype=torch.bool, device=act.device)
                    keep[p.head] = True
                    where &= keep.view([-1 if a == heads else 1 for a in range(1, act.dim())])
                if p.feature is None:
                    out[r] = torch.where(where, clean[0], act[r])
                else:
                    out[r] = act[r] + where * _feature_delta(sae, p.feature, clean[0], act[r]).to(act.dtype)
            return out

        return fn

    # ----------------------------------------------------------------------------------------- sweeps

    def sweep(self, kind: str, *, site: str = "resid_pre", layers: Sequence[int] | None = None,
              positions: Sequence[int] | None = None, heads: Sequence[int] | None = None,
              steps: Sequence[int] | None = None, attribution: bool = False) -> SweepResult:
        """(layer x position) at `site`, (layer x head) on `attn.hook_z`, or (step x layer) at `site` (clean
        activations from step s onward, at `positions` or everywhere; sampler mode)."""
        from .. import checks

        checks.choice("sweep", kind, SWEEPS)
        lm, s = self.lm, self.setup
        layers = list(range(lm.n_layers)) if layers is None else list(layers)
        bad = [i for i in layers if not 0 <= i < lm.n_layers]
        if bad:
            raise DLMScopeError(f"layer {bad[0]} is out of range: {lm.name} has layers 0..{lm.n_layers - 1}")
        if kind == "layer_position":
            cols = list(range(s.length)) if positions is None else [p % s.length for p in positions]
            grid = [[Patch(f"blocks.{i}.hook_{site}", positions=(p,)) for p in cols] for i in layers]
            names = ("layer", "position")
        elif kind == "layer_head":
            hook0 = f"blocks.{layers[0]}.attn.hook_z"
            lm.site(hook0)
            cols = list(range(self.n_heads(hook0))) if heads is None else list(heads)
            pos = None if positions is None else tuple(positions)
            grid = [[Patch(f"blocks.{i}.attn.hook_z", positions=pos, head=h) for h in cols] for i in layers]
            names = ("layer", "head")
        else:
            if s.mode != "sampler":
                raise DLMScopeError("sweep='step_layer' needs mode='sampler' (a single forward has one step)")
            cols = layers
            layers = list(range(s.steps)) if steps is None else list(steps)
            bad = [st for st in layers if not 0 <= st < s.steps]
            if bad:
                raise DLMScopeError(f"step {bad[0]} is past the trajectory: sampler mode has steps 0..{s.steps - 1}")
            pos = None if positions is None else tuple(positions)
            grid = [[Patch(f"blocks.{i}.hook_{site}", positions=pos, steps=tuple(range(st, s.steps))) for i in cols]
                    for st in layers]
            names = ("step", "layer")
        flat = [p for row in grid for p in row]
        if attribution and s.mode != "forward":
            raise DLMScopeError("attribution patching needs mode='forward' (gradients do not pass through the "
                                "sampler's discrete unmasking)")
        before = self.forwards, self.sequences
        self.prefetch([p.hook for p in flat])
        clean, corrupted = self.baseline("clean").metric.item(), self.baseline("corrupted").metric.item()
        result = self.run(flat)
        effect = result.metric.view(len(grid), len(grid[0]))
        approx = self.attribute(grid) if attribution else None
        return SweepResult(kind, names[0], names[1], list(layers), list(cols), effect, clean, corrupted,
                           self.forwards - before[0], self.sequences - before[1], approx,
                           agreement(approx, effect - corrupted) if approx is not None else {},
                           None if result.token is None else result.token.view(effect.shape))

    def attribute(self, grid: list[list[Patch]]) -> torch.Tensor:
        """Attribution patching: gradient of the corrupted run's metric times (clean - corrupted) activation,
        summed over each patch's selection; one forward and one backward for the whole grid."""
        lm, s = self.lm, self.setup
        flat = [self.check(p) for row in grid for p in row]
        if any(p.steps is not None or p.feature is not None for p in flat):
            raise DLMScopeError("attribution patching covers whole-site patches in forward mode (no steps or features)")
        hooks = list(dict.fromkeys(p.hook for p in flat))
        self.prefetch(hooks)
        acts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def make(h: str):
            def fn(act: torch.Tensor, ctx) -> torch.Tensor:
                delta = torch.zeros_like(act, requires_grad=True)
                acts[h] = (act.detach(), delta)
                return act + delta
            return fn

        ids = self._ids(s.corrupted, 1)
        lm.state = ForwardState(step=0, n_steps=1, mask=ids.eq(lm.require_mask_id()), t=1.0)
        try:
            with hooked(lm, {h: make(h) for h in hooks}), torch.enable_grad():
                metric = self._score(lm.denoise_logits(ids)[:, s.target]).sum()
                grads = torch.autograd.grad(metric, [acts[h][1] for h in hooks])
        finally:
            lm.state = ForwardState()
        self.forwards += 1
        self.sequences += 1
        contrib = {h: (g * (self._cache[h][0].to(g) - acts[h][0])).detach()[0] for h, g in zip(hooks, grads)}
        values = []
        for p in flat:
            c = contrib[p.hook]
            pos_axis = site_axes(p.hook)[0]  # axes of the batched activation; c has no batch axis
            if p.positions is not None:
                c = c.index_select(pos_axis - 1, torch.tensor(p.positions))
            if p.head is not None:
                c = c.index_select(head_axis(p.hook) - 1, torch.tensor([p.head]))
            values.append(float(c.sum()))
        return torch.tensor(values).view(len(grid), len(grid[0]))


def _feature_delta(sae, feature: int, clean: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """What swapping one latent's activation from `act`'s to `clean`'s adds to `act` (the decoder is affine)."""
    with torch.no_grad():
        a_clean = sae.encode(clean.to(sae.W_dec.dtype))[..., feature]
        a_act = sae.encode(act.to(sae.W_dec.dtype))[..., feature]
        lat = torch.zeros(*act.shape[:-1], sae.cfg.n_latents, dtype=sae.W_dec.dtype, device=act.device)
        lat[..., feature] = a_clean - a_act
        return sae.decode(lat) - sae.decode(torch.zeros_like(lat))


def agreement(approx: torch.Tensor, exact: torch.Tensor, top: int = 5) -> dict:
    """How well attribution patching ranks what exact patching finds: Pearson r, sign agreement on the cells
    whose exact effect is at least a tenth of the largest, and the overlap of the top cells by magnitude."""
    a, e = approx.flatten().double(), exact.flatten().double()
    r = float(torch.corrcoef(torch.stack([a, e]))[0, 1]) if a.std() > 0 and e.std() > 0 else float("nan")
    big = e.abs() >= 0.1 * e.abs().max() if e.abs().max() > 0 else torch.zeros_like(e, dtype=torch.bool)
    sign = float((a[big].sign() == e[big].sign()).double().mean()) if big.any() else float("nan")
    k = min(top, len(a))
    overlap = len(set(a.abs().topk(k).indices.tolist()) & set(e.abs().topk(k).indices.tolist())) / k
    return {"pearson": r, "sign_agreement": sign, "top_overlap": overlap, "top": k}


def sweep_figure(result: SweepResult | dict, title: str = ""):
    """A plotly heatmap of the normalised effect (and of attribution patching's estimate beside it)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    r = result.to_dict() if isinstance(result, SweepResult) else result
    gap = r["clean"] - r["corrupted"]
    panels = [("exact patching", r["normalised"])]
    if r.get("attribution") is not None:
        norm = gap if abs(gap) > 1e-9 else float("nan")
        panels.append(("attribution patching", [[v / norm for v in row] for row in r["attribution"]]))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels])
    for j, (_, z) in enumerate(panels):
        fig.add_trace(go.Heatmap(z=z, x=[str(c) for c in r["cols"]], y=[str(v) for v in r["rows"]], zmid=0,
                                 colorscale="RdBu", reversescale=True, showscale=j == 0,
                                 colorbar=dict(title="restored")), row=1, col=j + 1)
        fig.update_xaxes(title_text=r["col_name"], row=1, col=j + 1)
        fig.update_yaxes(title_text=r["row_name"], autorange="reversed", row=1, col=j + 1)
    fig.update_layout(title=title or f"{r['kind']}: clean {r['clean']:.3f}, corrupted {r['corrupted']:.3f} "
                      f"({r['forwards']} forwards, {r['sequences']} sequences)", height=450)
    return fig



# ------------------------------------------------------------------------------------------- the command


@dataclass(kw_only=True)
class PatchConfig(ModelPart):
    """A `dlmscope patch` run: one sweep (or a list of single patches) of clean activations into a corrupted input."""

    clean: str
    """Clean prompt text."""
    corrupted: str | None = field(default=None, metadata=unset("given by --change"))
    """Corrupted prompt text, the same number of tokens as the clean one (or give --change)."""
    change: str | None = field(default=None, metadata=unset("given by --corrupted"))
    """Corrupt by changing one token of the clean prompt instead: INDEX=TEXT (token position, one token's text)."""
    target: int = -1
    """Where the answer is read: a position of prompt + generated region (negative: from the end)."""
    answer: str
    """The clean answer at the target: one token's text, or #ID for a token id."""
    wrong: str | None = field(default=None, metadata=unset("none"))
    """The corrupted answer token (text or #ID); needed by the logit_diff metric."""
    metric: str = field(default="logit_diff", metadata=choices(lambda: METRICS))
    """logit_diff (answer minus wrong logit) or logprob (the answer's log-probability)."""
    through: str = field(default="forward", metadata=choices(lambda: MODES))
    """What the inputs run through: forward (one denoising forward of prompt + gen-length masks) or sampler
    (the whole denoising run; the metric is read at the step that reveals the target)."""
    gen_length: int = 16
    """Tokens to generate after the prompt: the masked positions (--through forward: the masks of its one
    forward)."""
    steps: int = 16
    """Denoising steps (--through sampler)."""
    sweep: str = field(default="layer_position", metadata=choices(lambda: (*SWEEPS, "none")))
    """layer_position, layer_head (on attn.hook_z), step_layer (clean from step s onward; --through sampler),
    or none (the patches given by --hooks)."""
    sweep_site: str = "resid_pre"
    """Site the layer_position and step_layer sweeps patch: blocks.{i}.hook_SITE (resid_pre, resid_mid, resid_post,
    attn_out, mlp_in, mlp_out)."""
    hooks: str | None = field(default=None, metadata=unset("none (a sweep)"))
    """With --sweep none: comma-separated hook names, each patched in its own run (restricted by --positions,
    --heads, --patch-steps, --feature)."""
    layers: str | None = field(default=None, metadata=unset("all"))
    """Comma-separated layers the sweep covers."""
    positions: str | None = field(default=None, metadata=unset("all"))
    """Comma-separated positions (a layer_position sweep's columns)."""
    heads: str | None = field(default=None, metadata=unset("all"))
    """Comma-separated heads (a layer_head sweep's columns; with --sweep none: one run per head)."""
    patch_steps: str | None = field(default=None, metadata=unset("all"))
    """With --sweep none: the sampler steps patched; step_layer: the steps s swept."""
    sae: str | None = field(default=None, metadata=unset("none"))
    """SAE name or folder; with --feature, patch only that latent's contribution at the SAE's hook."""
    feature: int | None = field(default=None, metadata=unset("none"))
    """Latent index to patch (with --sae and --sweep none): only its decoded contribution moves."""
    attribution: bool = False
    """Also estimate the sweep by attribution patching (gradient x activation difference; --through forward) and
    report its agreement with exact patching."""
    seqs_per_forward: int = 32
    """Rows per forward: how many patched runs are batched together."""
    out: str | None = field(default=None, metadata=unset("print only"))
    """Output folder for patch.json and patch.html (a plotly heatmap)."""
    backend: str = field(default="native", metadata=choices(lambda: BACKENDS))
    """native (our loaders, every hook site) or remote (the checkpoint's own code: residual sites only)."""
    family: str | None = field(default=None, metadata=choices(lambda: tuple(FAMILIES), "from config.json"))
    """Checkpoint family when it cannot be detected."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""

    def check(self) -> None:
        from .. import checks

        if not self.clean:
            raise DLMScopeError("clean='' : give the clean prompt (--clean TEXT)")
        if (self.corrupted is None) == (self.change is None):
            raise DLMScopeError("give exactly one of --corrupted TEXT and --change INDEX=TEXT")
        if self.change is not None and not re.fullmatch(r"-?\d+=.+", self.change, flags=re.S):
            raise DLMScopeError(f"change={self.change!r} must be INDEX=TEXT, e.g. 5=7")
        if not self.answer:
            raise DLMScopeError("answer='' : give the clean answer token (--answer TEXT or #ID)")
        checks.positive("gen_length", self.gen_length)
        checks.positive("steps", self.steps)
        checks.positive("seqs_per_forward", self.seqs_per_forward)
        if self.feature is not None:
            checks.non_negative("feature", self.feature)
        if self.metric == "logit_diff" and self.wrong is None:
            raise DLMScopeError("metric='logit_diff' needs --wrong (the corrupted answer token); or --metric logprob")
        if self.sweep == "none" and not self.hooks:
            raise DLMScopeError("sweep='none' needs --hooks (comma-separated hook names to patch)")
        if self.sweep == "step_layer" and self.through != "sampler":
            raise DLMScopeError("sweep='step_layer' needs --through sampler (a single forward has one step)")
        if self.attribution and (self.through != "forward" or self.sweep in ("none", "step_layer")):
            raise DLMScopeError("--attribution estimates a layer_position or layer_head sweep with --through forward")
        if (self.feature is not None) != (self.sae is not None):
            raise DLMScopeError("--feature and --sae go together (an SAE latent to patch)")
        if self.feature is not None and self.sweep != "none":
            raise DLMScopeError("--feature patches one SAE latent: use it with --sweep none --hooks <the SAE's hook>")
        for name in ("layers", "positions", "heads", "patch_steps"):
            if getattr(self, name) is not None:
                checks.int_list(name, getattr(self, name), minimum=None if name == "positions" else 0)
        if self.out is not None:
            checks.writable_folder("out", self.out)
        checks.device("device", self.device)
        checks.choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))

    def ints(self, name: str) -> list[int] | None:
        value = getattr(self, name)
        return [int(v) for v in value.split(",") if v.strip()] if value else None


def _token(lm: LoadedModel, name: str, text: str) -> int:
    """One token id from `#ID` or a text that the tokenizer makes a single token of."""
    if text.startswith("#") and text[1:].isdigit():
        return int(text[1:])
    ids = lm.to_tokens(text, add_bos=False)[0]
    if len(ids) != 1:
        raise DLMScopeError(f"{name}={text!r} is {len(ids)} tokens; give one token's text or #ID")
    return ids[0]


def patch(cfg: PatchConfig) -> dict:
    """Run `dlmscope patch`: load the model, build the inputs, run the sweep; write patch.json / patch.html."""
    from ..io_utils import atomic_write_json, atomic_write_text
    from ..models import load_model

    lm = load_model(cfg.model, family=cfg.family, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend)
    clean = lm.to_tokens(cfg.clean)[0]
    if cfg.change is not None:
        index, text = cfg.change.split("=", 1)
        corrupted = list(clean)
        i = int(index)
        if not -len(clean) <= i < len(clean):
            raise DLMScopeError(f"change index {i} is outside the clean prompt's {len(clean)} tokens")
        corrupted[i] = _token(lm, "change", text)
    else:
        corrupted = lm.to_tokens(_required(cfg.corrupted, "--corrupted or --change"))[0]
    wrong = _token(lm, "wrong", cfg.wrong) if cfg.wrong is not None else None
    setup = PatchSetup(clean, corrupted, cfg.target, _token(lm, "answer", cfg.answer), wrong, cfg.metric, cfg.through,
                       cfg.gen_length, cfg.steps, batch_size=cfg.seqs_per_forward)
    sae = None
    if cfg.sae is not None:
        from ..sae import load_sae
        from .splice import check_sae_matches

        sae = load_sae(cfg.sae, device=cfg.device)
        check_sae_matches(lm, sae)
    patcher = Patcher(lm, setup, sae)
    report: dict[str, Any] = {"model": lm.name, "clean": cfg.clean, "corrupted_tokens": corrupted, "clean_tokens": clean,
              "tokens": [lm.to_text([t], skip_special=False) for t in clean] + ["<mask>"] * cfg.gen_length,
              "target": setup.target, "answer": setup.answer, "wrong": setup.wrong, "metric": cfg.metric,
              "mode": cfg.through, "steps": setup.n_steps}
    if cfg.sweep == "none":
        positions, steps = cfg.ints("positions"), cfg.ints("patch_steps")
        given = cfg.ints("heads")
        heads: list[int | None] = list(given) if given else [None]
        patches = [Patch(h.strip(), tuple(positions) if positions else None, head, tuple(steps) if steps else None,
                         cfg.feature)
                   for h in _required(cfg.hooks, "--hooks").split(",") if h.strip()
                   for head in heads]
        result = patcher.run(patches)
        clean_m, corrupted_m = patcher.baseline("clean").metric.item(), patcher.baseline("corrupted").metric.item()
        gap = clean_m - corrupted_m
        report["patches"] = [{"patch": p.label(), "metric": float(m),
                              "normalised": float((m - corrupted_m) / gap) if abs(gap) > 1e-9 else None}
                             for p, m in zip(patches, result.metric)]
        report |= {"clean_metric": clean_m, "corrupted_metric": corrupted_m, "forwards": patcher.forwards}
    else:
        sweep = patcher.sweep(cfg.sweep, site=cfg.sweep_site, layers=cfg.ints("layers"),
                              positions=cfg.ints("positions"),
                              heads=cfg.ints("heads"), steps=cfg.ints("patch_steps"), attribution=cfg.attribution)
        report["sweep"] = sweep.to_dict()
    if cfg.out is not None:
        from pathlib import Path

        folder = Path(cfg.out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "patch.json", report)
        report["files"] = [str(folder / "patch.json")]
        if "sweep" in report:
            html = sweep_figure(report["sweep"], title=f"{lm.name}: {cfg.sweep} patching, {cfg.metric} at position "
                                f"{setup.target}").to_html(include_plotlyjs="cdn")
            atomic_write_text(folder / "patch.html", html)
            report["files"].append(str(folder / "patch.html"))
    return report


def _required(value: str | None, flag: str) -> str:
    """A setting the config's checks require for this mode (narrowed here for the type checker)."""
    if value is None:
        raise DLMScopeError(f"{flag} is required here")
    return value
