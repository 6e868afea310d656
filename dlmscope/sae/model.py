"""The Top-K sparse autoencoder `SAE`, base class of every architecture, and the architecture registry.

BatchTopK (batchtopk.py), JumpReLU (jumprelu.py), Matryoshka (matryoshka.py) and (skip) transcoders
(transcoder.py) subclass `SAE` and keep its interface (encode, encode_topk, decode, reconstruct, W_dec, cfg);
the trainer calls the per-architecture hooks `configure_training`, `init_from_batch`, `extra_loss`,
`after_step`; the SAELens files use `saelens_fields` / `load_saelens_fields`. A new architecture is one module
with one `@register_architecture(name, saved_as=...)` class (imported by `dlmscope/sae/__init__.py`).

Encoder: pre = (x * s - b_dec) @ W_enc + b_enc; latents = ReLU of the k largest pre-activations per
token (Top-K).
Decoder: x_hat = (latents @ W_dec + b_dec) / s. The input scale s makes training see activations of
unit mean squared norm (DLM-Scope); `fold_input_scale` bakes it into the weights, so a saved SAE maps
raw activations to raw reconstructions with s = 1.

Training uses `forward`. On CPU its Top-K route computes the dense (N, n_latents) pre-activations once
without a graph, and the backward touches only the selected (token, latent) entries, never a dense
(N, n_latents) gradient: both weight gradients are sparse matmuls over one latent-major layout of the
selection, the activations' gradient one dot product per entry, and b_dec's follows from b_enc's;
decoding is an embedding_bag. AuxK's positive activations get the same treatment over the dead columns only
(ragged entries), or, with few dead latents or many positive activations, small dense matmuls over those columns
(`AUX_DENSE_CELL_COST`).
On GPUs dense cuBLAS matmuls over scattered latents are far faster than gathers and cuSPARSE (measured on an
H100, d_in 4096, 16,384 latents: about 9x), and deterministic, so there (and for BatchTopK) `forward` uses the
dense route; both compute the same maths.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DLMScopeError

# The sparse backward builds CSR matrices; torch flags the layout as beta once per process, which tells users nothing.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

ARCHITECTURES: dict[str, type[SAE]] = {}
"""Architecture name -> its SAE class, filled by `register_architecture` (one call per architecture module)."""
SAELENS_READERS: dict[str, str] = {}
"""SAELens architecture name -> ours, for files that do not name one of ours (`metadata.dlmscope_architecture`)."""

S = TypeVar("S", bound="type[SAE]")


def register_architecture(name: str, saved_as: str, reads_saelens: bool = False) -> Callable[[S], S]:
    """Class decorator: `name` builds this class; its SAELens files say `architecture: saved_as`; with
    `reads_saelens`, foreign SAELens files of `saved_as` load as this class."""
    def register(cls: S) -> S:
        if name in ARCHITECTURES:
            raise ValueError(f"SAE architecture {name!r} is registered twice")
        cls.architecture, cls.saved_as = name, saved_as
        ARCHITECTURES[name] = cls
        if reads_saelens:
            SAELENS_READERS[saved_as] = name
        return cls
    return register


@dataclass
class SAEConfig:
    """Shape and provenance of one SAE."""

    d_in: int
    """Width of the activations (the model's d_model)."""
    n_latents: int
    """Dictionary size."""
    k: int
    """Active latents per token (BatchTopK: on average over a batch)."""
    architecture: str = "topk"
    """topk, batchtopk, jumprelu (k = target L0), matryoshka, transcoder or skip_transcoder."""
    metadata: dict = field(default_factory=dict)
    """model_name, hook_name, masking_policy, t_range, dataset_path, context_size, ... (transcoders: hook_name_out)"""
    prefix_sizes: tuple[int, ...] = ()
    """Matryoshka: nested prefix sizes, strictly increasing, ending at n_latents."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise DLMScopeError(f"unknown SAE architecture {self.architecture!r}; allowed: {', '.join(ARCHITECTURES)}")
        if not 0 < self.k < self.n_latents:
            raise DLMScopeError(f"k={self.k} must satisfy 0 < k < n_latents ({self.n_latents})")
        if self.d_in < 1:
            raise DLMScopeError(f"d_in={self.d_in} must be positive")
        ARCHITECTURES[self.architecture].check_config(self)

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    @property
    def hook_name_out(self) -> str | None:
        """Where the decoder writes: the output hook of a transcoder, the input hook otherwise."""
        return self.metadata.get("hook_name_out", self.hook_name)


@dataclass
class SAEOutput:
    """A training forward pass, all in the scaled space (unit mean squared norm)."""

    x: torch.Tensor
    """(N, d_in) scaled input."""
    recon: torch.Tensor
    """(N, d_in) reconstruction x_hat, b_dec included."""
    values: torch.Tensor
    """Top-K: (N, k) activations of the chosen latents; other architectures: dense (N, n_latents)."""
    indices: torch.Tensor | None
    """Top-K: (N, k) chosen latent ids; other architectures: None."""
    n_latents: int
    """Dictionary size."""
    aux_recon: torch.Tensor | None = None
    """(N, d_in) AuxK prediction: decode of the k_aux largest dead-latent activations WITHOUT b_dec
    (None when no dead mask was given or nothing is dead)."""
    pre: torch.Tensor | None = None
    """(N, n_latents) encoder pre-activations, where an architecture's extra loss needs them (JumpReLU)."""

    @property
    def latents(self) -> torch.Tensor:
        """Dense (N, n_latents) latent activations."""
        if self.indices is None:
            return self.values
        return self.values.new_zeros(self.values.shape[0], self.n_latents).scatter_(1, self.indices, self.values)


class _LatentPattern:
    """Where the selected (token, column) entries of one step sit, and their column-major CSR layout, sorted once on
    first use and shared by the decoder's and the encoder's backward.

    Either a fixed number per token, column ids (N, m) (the Top-K selection over all latents), or ragged: flat
    column ids (E,) with the token of each entry (`tokens`, ascending) and where each token's entries start
    (`offsets`, (N,)): AuxK's positive activations over the dead columns (`SAE._sparse_forward`), where `n_latents`
    counts those columns."""

    def __init__(self, indices: torch.Tensor, n_latents: int, tokens: torch.Tensor | None = None,
                 offsets: torch.Tensor | None = None):
        self.indices, self.n_latents, self.tokens, self.offsets = indices, n_latents, tokens, offsets
        self.n_tokens = indices.shape[0] if offsets is None else offsets.shape[0]

    def decode(self, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(N, d): per token, the sum of its entries' values times their rows."""
        return F.embedding_bag(self.indices, rows, self.offsets, per_sample_weights=values, mode="sum")

    def column_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(n_latents,): per column, the sum of its entries' values (a bias gradient)."""
        return values.new_zeros(self.n_latents).index_add_(0, self.indices.flatten(), values.flatten())

    @functools.cached_property
    def _csr(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row pointers, the token of each entry, and the order sorting the flattened entries by column (stable:
        tokens ascend within a row, as CSR requires)."""
        flat = self.indices.flatten()
        narrow = torch.int16 if self.n_latents <= 2**15 else torch.int32  # narrower keys sort about 3x faster on CPU
        order = flat.to(narrow).argsort(stable=True)
        crow = flat.new_zeros(self.n_latents + 1)
        crow[1:] = torch.bincount(flat, minlength=self.n_latents).cumsum(0)
        tokens = order.div(self.indices.shape[1], rounding_mode="floor") if self.tokens is None else self.tokens[order]
        return crow, tokens, order

    def _matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The (n_latents, N) CSR matrix G^T of the (N, n_latents) matrix G holding `values` at the entries."""
        crow, tokens, order = self._csr
        return torch.sparse_csr_tensor(crow, tokens, values.flatten()[order], (self.n_latents, self.n_tokens),
                                       check_invariants=False)  # valid by construction

    def scatter_matmul(self, values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """G^T @ dense, (n_latents, d): a weight gradient that touches only the selected entries. Into an empty
        result with beta 0, which sparse addmm writes in full (rows without entries come out zero; unlike
        `gather_dots`' sampled_addmm, which multiplies what it is given): `sparse @ dense` first zero-fills a result
        and then copies it, which cost 4x the product itself (2.5 of 3.2 ms at 4,096 x 256, 32,768 entries)."""
        out = dense.new_empty(self.n_latents, dense.shape[1])
        return torch.addmm(out, self._matrix(values), dense, beta=0.0, out=out)

    def gather_dots(self, rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """rows[column] . dense[token], one dot product per entry (a sampled matmul), in the entries' shape."""
        order = self._csr[2]  # zeros, not empty: beta=0 still multiplies them, and 0 * NaN garbage is NaN
        dots = torch.sparse.sampled_addmm(self._matrix(dense.new_zeros(self.indices.shape)), rows, dense.t(),
                                          beta=0.0).values()
        return dots.new_empty(order.numel()).index_copy_(0, order, dots).view(self.indices.shape)


class _DenseBlock:
    """`_LatentPattern`'s operations on a dense (N, n_columns) block of values, zero outside its selection: AuxK over
    few dead columns, or over many with many positive activations (`AUX_DENSE_CELL_COST`), as small matmuls."""

    @staticmethod
    def decode(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return values @ rows

    @staticmethod
    def column_sums(values: torch.Tensor) -> torch.Tensor:
        return values.sum(0)

    @staticmethod
    def scatter_matmul(values: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return values.t() @ dense

    @staticmethod
    def gather_dots(rows: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return dense @ rows.t()


@dataclass(frozen=True, eq=False)
class _AuxSelection:
    """AuxK's activations over the dead latents `ids`, laid out by `pattern` over their local columns 0..n_dead-1:
    ragged entries (`_LatentPattern`) or a dense block (`_DenseBlock`). Their gradients are added into the dead
    latents' rows, so no full-size gradient is formed for them."""

    ids: torch.Tensor
    pattern: _LatentPattern | _DenseBlock


def _relu_gate(grad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`grad` where the ReLU'd `values` are positive, else 0: ReLU's own backward kernel, one pass where
    `grad * (values > 0)` takes two and a mask (1.3 against 0.35 ms at 4,096 x 161 on CPU)."""
    return torch.ops.aten.threshold_backward(grad, values.to(grad.dtype), 0)


class _SelectedPreacts(torch.autograd.Function):
    """ReLU'd pre-activations at the selected entries of pre = (xs - b_dec) @ W_enc + b_enc, computed without a
    graph: the Top-K ones (`values`, (N, k)) and AuxK's (`aux_values`, laid out by `aux`; empty without AuxK). The
    backward reaches W_enc and b_enc only through those entries (sparse matmuls, AuxK's added into the dead
    latents' rows), and b_dec's gradient is -W_enc @ grad(b_enc), so no (N, d_in) input gradient is ever formed.
    The input `xc` = xs - b_dec takes no gradient: the sparse route is for raw activations."""

    @staticmethod
    def forward(ctx, values, aux_values, xc, b_dec, W_enc, b_enc, pattern: _LatentPattern,
                aux: _AuxSelection | None):
        ctx.save_for_backward(xc, W_enc, values, aux_values)
        ctx.pattern, ctx.aux = pattern, aux
        return values.view_as(values), aux_values.view_as(aux_values)

    @staticmethod
    def backward(ctx, grad, grad_aux):
        xc, W_enc, values, aux_values = ctx.saved_tensors
        xc = xc.to(W_enc.dtype)
        g = _relu_gate(grad.to(W_enc.dtype), values)
        grad_w = ctx.pattern.scatter_matmul(g, xc)
        grad_b = ctx.pattern.column_sums(g)
        if ctx.aux is not None:
            ids, aux = ctx.aux.ids, ctx.aux.pattern
            g_aux = _relu_gate(grad_aux.to(W_enc.dtype), aux_values)  # ReLU and AuxK's selection
            grad_w.index_add_(0, ids, aux.scatter_matmul(g_aux, xc))
            grad_b.index_add_(0, ids, aux.column_sums(g_aux))
        return None, None, None, -(W_enc @ grad_b), grad_w.t(), grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_j values[:, j] * W_dec[indices[:, j]]: an embedding_bag forward; the backward forms W_dec's gradient as a
    sparse matmul and the values' as one dot product per entry, both on the shared column-major pattern (cheaper
    on CPU than embedding_bag's own backward). Second output: AuxK's activations decoded over the dead rows
    W_dec[aux.ids] (empty without AuxK), whose gradient is added into those rows."""

    @staticmethod
    def forward(ctx, values, aux_values, W_dec, pattern: _LatentPattern, aux: _AuxSelection | None):
        values, aux_values = values.to(W_dec.dtype), aux_values.to(W_dec.dtype)
        ctx.save_for_backward(values, aux_values, W_dec)
        ctx.pattern, ctx.aux = pattern, aux
        decoded = W_dec.new_empty(0) if aux is None else aux.pattern.decode(aux_values, W_dec.index_select(0, aux.ids))
        return pattern.decode(values, W_dec), decoded

    @staticmethod
    def backward(ctx, grad, grad_aux):
        values, aux_values, W_dec = ctx.saved_tensors
        grad_v = ctx.pattern.gather_dots(W_dec, grad) if ctx.needs_input_grad[0] else None
        grad_w = ctx.pattern.scatter_matmul(values, grad) if ctx.needs_input_grad[2] else None
        grad_aux_values = None
        if ctx.aux is not None:
            ids, aux, grad_aux = ctx.aux.ids, ctx.aux.pattern, grad_aux.to(W_dec.dtype)
            if ctx.needs_input_grad[1]:
                grad_aux_values = aux.gather_dots(W_dec.index_select(0, ids), grad_aux)
            if grad_w is not None:
                grad_w.index_add_(0, ids, aux.scatter_matmul(aux_values, grad_aux))
        return grad_v, grad_aux_values, grad_w, None, None


AUX_DENSE_CELL_COST = 0.12
"""On CPU, what one (token, dead latent) cell of AuxK's dense block costs, in positive entries of its ragged route."""
AUX_RAGGED_TOKEN_COST = 3.0
"""On CPU, the ragged route's cost per token beyond its entries, in entries. Both from `benchmarks/bench_sae_aux.py`
(d_in 256, batch 4,096): the rule picks dense below 25 dead latents whatever their activations, and from 9.6%
positive at 128 dead latents and 11.4% at 512; measured, the routes cost about the same at 16 dead latents and
dense wins from about 8-10% positive, and the rule's pick is within 1% of the cheaper route."""


def _dense_aux(n_tokens: int, n_dead: int, n_positive: float) -> bool:
    """Whether AuxK's dense block over the dead columns is cheaper than its ragged entries (`AUX_DENSE_CELL_COST`)."""
    return AUX_DENSE_CELL_COST * n_tokens * n_dead <= AUX_RAGGED_TOKEN_COST * n_tokens + n_positive


def _sparse_route(x: torch.Tensor) -> bool:
    """Gather/sparse kernels win on CPU; dense matmuls win on GPUs (see the module docstring)."""
    return x.device.type == "cpu"


@register_architecture("topk", saved_as="topk", reads_saelens=True)
class SAE(nn.Module):
    """A Top-K SAE with SAELens' parameter names and shapes; the base class of every architecture."""

    architecture: ClassVar[str]
    """The registered name `cfg.architecture` must carry (set by `register_architecture`)."""
    saved_as: ClassVar[str]
    """The SAELens architecture our files record (set by `register_architecture`)."""
    applies_b_dec_to_input: ClassVar[bool] = True
    """Whether the encoder sees x - b_dec (SAELens' `apply_b_dec_to_input`)."""
    transcodes: ClassVar[bool] = False
    """Reads one hook and predicts another (`metadata.hook_name_out`)."""
    sparse_training: ClassVar[bool] = True
    """Per-token top-k selection, so the CPU's sparse training route applies (module docstring)."""
    input_scale: torch.Tensor  # buffers, declared for type checkers (nn.Module.__getattr__ is untyped)

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise DLMScopeError(f"{type(self).__name__} builds {self.architecture!r} SAEs, not {cfg.architecture!r}; "
                                "use dlmscope.sae.build_sae(cfg)")
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        w_dec = F.normalize(torch.randn(cfg.n_latents, cfg.d_in, generator=gen), dim=1)
        self.W_dec = nn.Parameter(w_dec)  # (n_latents, d_in), unit rows
        self.W_enc = nn.Parameter(w_dec.t().clone())  # (d_in, n_latents): the decoder transpose at init
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def check_config(cls, cfg: SAEConfig) -> None:
        """Architecture-specific config checks (one line each); none but "no prefix sizes" here."""
        if cfg.prefix_sizes:
            raise DLMScopeError(f"prefix sizes are for matryoshka SAEs, not {cfg.architecture}")

    @classmethod
    def default_k(cls, d_sae: int) -> int | None:
        """k for a foreign SAELens file that records none (None: k is required)."""
        return None

    def saelens_fields(self, cfg: dict, meta: dict, weights: dict[str, torch.Tensor]) -> None:
        """Add this architecture's entries to a SAELens cfg.json, its metadata and its weights (Top-K: k)."""
        cfg.update(k=self.cfg.k, rescale_acts_by_decoder_norm=False)

    def load_saelens_fields(self, weights: dict[str, torch.Tensor], where: str) -> None:
        """Read what `saelens_fields` wrote beyond W_enc, b_enc, W_dec, b_dec (`where` names the file in errors)."""

    @property
    def output_scale(self) -> torch.Tensor:
        """Scale of the reconstruction target (a transcoder's output hook has its own)."""
        return self.input_scale

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise DLMScopeError(f"activations have d_in={x.shape[-1]} but the SAE expects d_in={self.cfg.d_in}"
                                f" (hook {self.cfg.hook_name})")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (.., n_latents) of raw activations."""
        self.check_input(x)
        return self._encoder_input(x * self.input_scale) @ self.W_enc + self.b_enc

    def _encoder_input(self, xs: torch.Tensor) -> torch.Tensor:
        """What the encoder sees of scaled activations: x - b_dec (a transcoder overrides this)."""
        return xs - self.b_dec

    def _skip(self, xs: torch.Tensor) -> torch.Tensor | float:
        """A linear path from input to output in the scaled space (skip transcoders); none here."""
        return 0.0

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), each (.., k): the per-token top-k after ReLU (also for BatchTopK SAEs)."""
        values, indices = self.pre_acts(x).topk(self.cfg.k, dim=-1, sorted=False)
        return values.relu(), indices

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations (.., n_latents)."""
        values, indices = self.encode_topk(x)
        return values.new_zeros(*values.shape[:-1], self.cfg.n_latents).scatter_(-1, indices, values)

    def decode(self, acts: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Raw-space reconstruction from dense latents or from (values, indices) (sparse decode)."""
        if isinstance(acts, tuple):
            values, indices = acts
            lead = values.shape[:-1]
            out = F.embedding_bag(indices.reshape(-1, indices.shape[-1]), self.W_dec,
                                  per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype),
                                  mode="sum").view(*lead, self.cfg.d_in)
        else:
            out = acts @ self.W_dec
        return (out + self.b_dec) / self.output_scale

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) by the cheapest route: Top-K decodes its k latents sparsely."""
        return self.decode(self.encode_topk(x))

    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Training selection on (N, n_latents) pre-activations: (dense latents, values, indices); Top-K
        keeps the k largest per token."""
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        values = values.relu()
        return torch.zeros_like(pre).scatter(1, indices, values), values, indices

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, k_aux: int = 0,
                target: torch.Tensor | None = None) -> SAEOutput:
        """Training forward on raw (N, d_in) activations, in the scaled space.

        `_select` picks the latents (Top-K: the k largest per token). With a dead mask
        (n_latents,) and k_aux > 0 it also returns the AuxK prediction from the min(k_aux, n_dead)
        largest dead-latent activations per token, decoded without b_dec. `target` (transcoders) is
        what the decoder predicts; by default x itself.
        """
        self.check_input(x)
        xs = x * self.input_scale
        ys = xs if target is None else target.to(xs) * self.output_scale
        dead_ids = dead_mask.nonzero().squeeze(1) if dead_mask is not None and k_aux > 0 else None
        if dead_ids is not None and dead_ids.numel() == 0:
            dead_ids = None
        k_aux = min(k_aux, dead_ids.numel()) if dead_ids is not None else 0
        if self.sparse_training and _sparse_route(x) and not x.requires_grad:
            return self._sparse_forward(xs, dead_ids, k_aux)
        # Dense route (GPUs, and batch selection): cuBLAS matmuls beat gathers and sparse kernels there.
        pre = self._encoder_input(xs) @ self.W_enc + self.b_enc
        dense, values, indices = self._select(pre)
        out = SAEOutput(ys, dense @ self.W_dec + self.b_dec + self._skip(xs), values, indices, self.cfg.n_latents)
        if dead_ids is not None:  # over the dead columns only: (N, n_dead) @ (n_dead, d), not (N, n_latents) @ W_dec
            dead_pre = pre.index_select(1, dead_ids)
            aux_values, local = dead_pre.topk(k_aux, dim=-1, sorted=False)
            aux = torch.zeros_like(dead_pre).scatter(1, local, aux_values.relu())
            out.aux_recon = aux @ self.W_dec.index_select(0, dead_ids)
        return out

    def _sparse_forward(self, xs: torch.Tensor, dead_ids: torch.Tensor | None, k_aux: int) -> SAEOutput:
        """The CPU Top-K route (module docstring): pre-activations and selections without a graph; the gradient
        flows through the selected entries only (`_SelectedPreacts`, `_SparseDecode`)."""
        with torch.no_grad():
            xc = xs - self.b_dec
            # A reused (N, n_latents) buffer: a fresh one costs page faults and a broadcast bias copy into new memory
            # on every step (about 12% of a CPU step at d_in 256).
            buf = self._pre_buffer(xc)
            pre = torch.addmm(self.b_enc, xc, self.W_enc) if buf is None else torch.addmm(self.b_enc, xc, self.W_enc,
                                                                                           out=buf)
            top_values, top_ids = pre.topk(self.cfg.k, dim=-1, sorted=False)
            pattern, aux, aux_values = _LatentPattern(top_ids, self.cfg.n_latents), None, xc.new_empty(0)
            if dead_ids is not None:
                acts, n_positive = self._aux_acts(pre, dead_ids, k_aux)
                if n_positive and _dense_aux(acts.shape[0], acts.shape[1], n_positive):
                    aux, aux_values = _AuxSelection(dead_ids, _DenseBlock()), acts
                elif n_positive:  # ragged: only the positive ones do anything (NaN ones too: the step then stops)
                    tokens, cols = acts.nonzero(as_tuple=True)  # token-major
                    counts = torch.bincount(tokens, minlength=acts.shape[0])
                    aux = _AuxSelection(dead_ids, _LatentPattern(cols, acts.shape[1], tokens, counts.cumsum(0) - counts))
                    aux_values = acts[tokens, cols]
        values, aux_values = _SelectedPreacts.apply(top_values.relu(), aux_values, xc, self.b_dec, self.W_enc,
                                                    self.b_enc, pattern, aux)
        recon, aux_recon = _SparseDecode.apply(values, aux_values, self.W_dec, pattern, aux)
        out = SAEOutput(xs, recon + self.b_dec, values, top_ids, self.cfg.n_latents)
        if aux is not None:
            out.aux_recon = aux_recon
        elif dead_ids is not None:  # dead latents, none positive anywhere: the prediction is zero
            out.aux_recon = torch.zeros_like(xs)
        return out

    @staticmethod
    def _aux_acts(pre: torch.Tensor, dead_ids: torch.Tensor, k_aux: int) -> tuple[torch.Tensor, float]:
        """AuxK's activations (N, n_dead): per token the k_aux largest dead pre-activations, ReLU'd, zero elsewhere
        (the rest decode to zero and get no gradient through the ReLU), and how many are positive. Where no token
        has more than k_aux positive ones (nearly always: a few per token late in a run) that is all its positive
        ones, and no top-k runs. Counted, not listed (the dense route never needs the list), as float32 sums of
        signs, three times count_nonzero's speed and exact under bfloat16 autocast; NaN if a pre-activation is."""
        acts = pre.index_select(1, dead_ids).relu_()
        positive = acts.sign().sum(1, dtype=torch.float32)
        if k_aux < dead_ids.numel() and positive.numel() and float(positive.max()) > k_aux:
            top, local = acts.topk(k_aux, dim=-1, sorted=False)
            acts = torch.zeros_like(acts).scatter_(1, local, top)
            positive = positive.clamp(max=k_aux)  # the top-k keeps all of a token's positive ones, up to k_aux
        return acts, float(positive.sum())

    def _pre_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
        """The reused (N, n_latents) pre-activation buffer of the sparse route (None under autocast)."""
        if torch.is_autocast_enabled(x.device.type):
            return None
        shape, buf = (x.shape[0], self.cfg.n_latents), self.__dict__.get("_pre")
        if buf is None or buf.shape != shape or buf.dtype != x.dtype or buf.device != x.device:
            buf = self.__dict__["_pre"] = x.new_empty(shape)  # not a buffer: never saved, never moved
        return buf

    def configure_training(self, cfg) -> None:
        """Take what the forward needs from the TrainConfig `cfg` (JumpReLU: the kernel bandwidth)."""

    @torch.no_grad()
    def init_from_batch(self, x: torch.Tensor) -> None:
        """Architecture-specific initialisation from the first raw batch, after scale and b_dec are set."""

    def extra_loss(self, out: SAEOutput, step: int, cfg) -> tuple[torch.Tensor | float, dict]:
        """Architecture-specific loss terms beyond MSE + AuxK (TrainConfig `cfg`, optimiser step `step`)."""
        return 0.0, {}

    @torch.no_grad()
    def after_step(self, out: SAEOutput, step: int, cfg) -> None:
        """State updated after each optimiser step (BatchTopK: its inference threshold)."""

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Bake the input scale into the weights: same latents, raw-space inputs and outputs."""
        s, s_out = self.input_scale.clone(), self.output_scale.clone()
        self.W_enc.mul_(s)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row (before each optimiser step)."""
        if self.W_dec.grad is None:
            return
        w, grad = self.W_dec, self.W_dec.grad  # row dot products without (n_latents, d_in) temporaries
        coef = torch.einsum("ld,ld->l", grad, w) / torch.einsum("ld,ld->l", w, w).clamp_min(1e-16)
        grad.addcmul_(w, coef[:, None], value=-1)
