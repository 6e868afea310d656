"""Capture, replace or add to activations at named hook sites, in one forward or across a whole sampler run.

Hook functions receive the activation and a `HookContext` that says which denoising step is
running and which positions are still masked (the sampler keeps `LoadedModel.state` current), so
the same function works on a single forward pass and during diffusion. Hooks are always removed
when the `with` block exits, exceptions included. Positions index axis 1 of an activation, except
`attn.hook_pattern` (B, heads, queries, keys), whose queries they select (`Site.pos_dim`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import DLMScopeError
from .models.base import ForwardState, LoadedModel, Site

POSITION_KINDS = ("all", "masked", "unmasked")
Positions = str | torch.Tensor | Sequence[int] | None
Steps = Iterable[int] | Callable[[int], bool] | None


@dataclass
class HookContext:
    """What a hook function knows about the activation it is given."""

    name: str
    layer: int
    state: ForwardState
    positions: torch.Tensor | None  # (B, L) bool of the positions this hook is restricted to, None = all
    pos_dim: int = 1  # the activation's axis of positions (2 for hook_pattern: its queries)

    def select(self, act: torch.Tensor) -> torch.Tensor:
        """The activation at `positions`: (N, ...) rows, the position axis first after the batch gathered."""
        return act if self.positions is None else act.movedim(self.pos_dim, 1)[self.positions]


HookFn = Callable[[torch.Tensor, HookContext], torch.Tensor | None]


class _StopForward(Exception):
    """Raised after the deepest captured site when the rest of the forward is not needed."""


def position_mask(positions: Positions, state: ForwardState, shape: tuple[int, int], device) -> torch.Tensor | None:
    """Resolve a position selector to a (B, L) bool mask; None means every position.

    During a KV-cached sampler step the activation covers only `state.window` of the sequence:
    selectors (masks, indices) are given over the whole sequence and cut to that window here.
    """
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    if state.window is not None:
        start, end = state.window
        assert state.mask is not None  # a cached step always knows the masked positions
        full = position_mask(positions, ForwardState(**{**vars(state), "window": None}),
                             (shape[0], state.mask.shape[1]), device)
        assert full is not None
        return full[:, start:end]
    if isinstance(positions, str):
        if positions not in POSITION_KINDS:
            raise DLMScopeError(f"unknown positions {positions!r}; allowed: {', '.join(POSITION_KINDS)}, a list of "
                                "indices or a (batch, length) bool tensor")
        if state.mask is None:
            raise DLMScopeError(f"positions={positions!r} needs the mask state; run inside the sampler or set lm.state.mask")
        mask = state.mask.to(device)
        return mask if positions == "masked" else ~mask
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != shape:
            raise DLMScopeError(f"position mask has shape {tuple(positions.shape)}; expected {shape}")
        return positions.to(device)
    index = torch.as_tensor(list(positions) if not isinstance(positions, torch.Tensor) else positions, dtype=torch.long)
    if index.numel() and (index.min() < -shape[1] or index.max() >= shape[1]):
        raise DLMScopeError(f"position index out of range for length {shape[1]}: {index.tolist()}")
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[:, index.to(device)] = True
    return mask


def _step_filter(steps: Steps) -> Callable[[int | None], bool]:
    if steps is None:
        return lambda step: True
    if callable(steps):
        return lambda step: step is not None and bool(steps(step))
    chosen = {int(s) for s in steps}
    return lambda step: step is not None and step in chosen


def install_edit(site: Site, edit: Callable[[torch.Tensor], torch.Tensor | None]):
    """Attach `edit` to a site (returns the handle); `edit` returns a replacement tensor or None to leave it unchanged."""
    if site.where == "output":
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = edit(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return site.module.register_forward_hook(hook)

    def pre_hook(module, args, kwargs):
        if args:
            new = edit(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = edit(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def hooked(lm: LoadedModel, fns: dict[str, HookFn], *, steps: Steps = None,
           positions: Positions = None) -> Iterator[None]:
    """Run `fns[name](act, ctx)` at each named site on every forward inside the block.

    A function returning a tensor replaces the activation (only at `positions`, if given);
    returning None leaves it unchanged. `steps` restricts the hooks to those denoising steps.
    """
    wanted = _step_filter(steps)
    handles = []

    def make_edit(name: str, fn: HookFn):
        layer, dim = lm.layer_of(name), lm.site(name).pos_dim

        def edit(act: torch.Tensor) -> torch.Tensor | None:
            if lm.state.context or not wanted(lm.state.step):
                return None
            pos = position_mask(positions, lm.state, (act.shape[0], act.shape[dim]), act.device)
            new = fn(act, HookContext(name, layer, lm.state, pos, dim))
            if new is None or pos is None:
                return new
            shape = [act.shape[0]] + [1] * (act.dim() - 1)
            shape[dim] = act.shape[dim]
            return torch.where(pos.view(shape), new.to(act.dtype), act)

        return edit

    try:
        for name, fn in fns.items():
            handles.append(install_edit(lm.site(name), make_edit(name, fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class ActivationCache:
    """Activations captured per hook name, one entry per forward pass (and its denoising step)."""

    acts: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    steps: dict[str, list[int | None]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The single captured tensor, or all of them stacked along a new leading dim."""
        items = self.acts[name]
        return items[0] if len(items) == 1 else torch.stack(items)

    def __contains__(self, name: str) -> bool:
        return name in self.acts

    def keys(self):
        return self.acts.keys()


@contextmanager
def capture(lm: LoadedModel, names: Sequence[str], *, steps: Steps = None, positions: Positions = None,
            to_cpu: bool = False, stop_early: bool = False) -> Iterator[ActivationCache]:
    """Record activations at `names`. With `positions`, each entry is the (N, ...) rows at those positions.

    `stop_early` aborts the forward after the deepest site, for activation-only passes
    (use `run_with_cache`, which catches the abort).
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise DLMScopeError("capture needs at least one hook name")
    cache = ActivationCache({n: [] for n in names}, {n: [] for n in names})
    order = {n: lm.site_order(n) for n in names}
    deepest = max(names, key=order.__getitem__)

    def make_fn(name: str) -> HookFn:
        def fn(act: torch.Tensor, ctx: HookContext) -> None:
            value = ctx.select(act.detach())
            cache.acts[name].append(value.cpu() if to_cpu else value)
            cache.steps[name].append(ctx.state.step)
            if stop_early and name == deepest:
                raise _StopForward

        return fn

    with hooked(lm, {n: make_fn(n) for n in names}, steps=steps, positions=positions):
        yield cache


@torch.no_grad()
def run_with_cache(lm: LoadedModel, input_ids: torch.Tensor, names: Sequence[str],
                   attention_mask: torch.Tensor | None = None, *, positions: Positions = None,
                   stop_early: bool = True, clean: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward pass returning {hook name: activation}; stops after the deepest site by default.

    `clean` (the uncorrupted `input_ids`) makes a block-diffusion model see clean earlier blocks, as
    in training (`LoadedModel.denoise_logits`); other models ignore it.
    """
    with capture(lm, names, positions=positions, stop_early=stop_early) as cache:
        try:
            if clean is not None and lm.block_size:
                lm.denoise_logits(input_ids, attention_mask, clean=clean)
            else:
                lm.forward(input_ids, attention_mask)
        except _StopForward:
            pass
    return {n: cache.acts[n][0] for n in cache.keys()}
