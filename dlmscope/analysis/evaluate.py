"""`dlmscope evaluate SAE`: an SAEBench-style evaluation suite made for diffusion LMs, offline.

Sections (each a key of the JSON result):

- core: per mask-ratio bin and for all / masked / visible positions, FVU (`sae.metrics.fvu`'s textbook
  ratio), mean cosine, L0, dead fraction (never fired on the set) and dense fraction (firing on more than
  10% of tokens); ΔCE and ΔELBO of splicing the SAE in at those positions (`analysis.splice`). For a
  transcoder, FVU compares its prediction with the output hook.
- t_curves: each latent's firing rate per mask-ratio bin, and its masked share r_m / (r_m + r_v) (r_m, r_v:
  firing rates on masked and on visible positions, pooled over bins); the fractions of alive latents that
  fire mostly on masked (share > 0.8) or mostly on visible (share < 0.2) positions.
- probing: SAEBench's sparse probing on token-level labels computable offline (LABEL_SETS). Per class,
  one-vs-rest on a balanced sample (80/20, split by row or task example, so no sequence lends positions to
  both sides; Sudoku labels only the cells its puzzle hides): the k latents with the largest |mean difference|
  between positives and negatives on the training split feed a logistic regression; the baseline is a
  logistic regression on the raw activations. Test accuracy, averaged over classes, for all test
  positions and separately for masked and visible ones (half of each sequence's tokens are masked).
  SAEBench pools activations over whole texts for sentence-level datasets; our labels are per token.
- absorption: SAEBench's first-letter absorption (Chanin et al.; absorption fraction by Till) on
  single-token words. Definitions follow SAEBench's FeatureAbsorptionCalculator (thresholds 0.025, 0.1,
  0.4; at most 3 absorbing latents; main latents from k-sparse probing with F1 jumps > 0.03, k <= 10),
  with two offline changes: activations come from the word's visible position in held-out text (t = 0.1)
  instead of an in-context spelling prompt, which a tiny model cannot follow, and the ground-truth probe
  is a one-vs-rest logistic regression per letter instead of one multi-class probe.
"""

from __future__ import annotations

import keyword
import math
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..diffusion.noise import corrupt
from .. import checks
from ..errors import DLMScopeError
from ..hooks import run_with_cache
from ..models.base import LoadedModel
from ..stats import t_interval
from .splice import SpliceConfig, check_sae_matches, draw_masks, splice_eval

LABEL_SETS = ("token_class", "sudoku_digit", "countdown_op")
POSITIONS = ("all", "masked", "visible")
TOKEN_CLASSES = ("digit", "keyword", "identifier", "punctuation")
OPERATORS = ("+", "-", "*", "/")


@dataclass
class EvaluateConfig:
    """What `dlmscope evaluate` measures and on how much data."""

    n_seqs: int = 64
    """Held-out sequences for the core metrics and t-curves."""
    t_bins: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """Mask ratios of the bins."""
    n_draws: int = 3
    """Independent mask draws per bin for the core metrics (pooled; FVU also per draw, with a t-interval)."""
    splice_seqs: int = 32
    """Sequences per bin for ΔCE / ΔELBO (0 skips splicing)."""
    probes: tuple[str, ...] = LABEL_SETS
    """Label sets for sparse probing (empty skips probing)."""
    probe_k: tuple[int, ...] = (1, 2, 5, 20)
    """Latents per sparse probe."""
    probe_examples: int = 300
    """Positives (and as many negatives) per class at most."""
    absorption: bool = True
    """Run the first-letter absorption metric."""
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [p for p in self.probes if p not in LABEL_SETS]
        if bad:
            raise DLMScopeError(f"unknown label set {bad[0]!r}; allowed: {', '.join(LABEL_SETS)}")
        if not self.t_bins or any(not 0 < t < 1 for t in self.t_bins):
            raise DLMScopeError(f"t_bins={self.t_bins} must be mask ratios in (0, 1)")
        checks.positive("n_seqs", self.n_seqs)
        checks.positive("n_draws", self.n_draws)
        for k in self.probe_k:
            checks.positive("probe_k", k)
        checks.non_negative("splice_seqs", self.splice_seqs)
        checks.positive("probe_examples", self.probe_examples)
        checks.positive("batch_size", self.batch_size)
        checks.seed("seed", self.seed)


class _Stats:
    """Streaming FVU (float64 sums), cosine, L0 and per-latent firing counts over one set of tokens."""

    def __init__(self, n_latents: int):
        self.n = 0
        self.err = self.sq = self.cos = self.active = 0.0
        self.sum: torch.Tensor | None = None
        self.fired = torch.zeros(n_latents, dtype=torch.float64)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, lat: torch.Tensor) -> None:
        if y.shape[0] == 0:
            return
        y, y_hat = y.double(), y_hat.double()
        self.n += y.shape[0]
        self.err += float((y - y_hat).pow(2).sum())
        self.sq += float(y.pow(2).sum())
        self.sum = y.sum(0) if self.sum is None else self.sum + y.sum(0)
        self.cos += float(torch.nn.functional.cosine_similarity(y, y_hat, dim=-1).sum())
        fired = (lat > 0).double()
        self.active += float(fired.sum())
        self.fired += fired.sum(0).cpu()

    def result(self) -> dict:
        if self.n == 0:
            return {"n_tokens": 0}
        assert self.sum is not None  # set by the first add()
        variance = self.sq - float(self.sum.pow(2).sum()) / self.n
        density = self.fired / self.n
        return {"n_tokens": self.n, "fvu": self.err / max(variance, 1e-30), "cosine": self.cos / self.n,
                "l0": self.active / self.n, "dead_fraction": float((density == 0).double().mean()),
                "dense_fraction": float((density > 0.1).double().mean())}


def _encode_reconstruct(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(sae.device, torch.float32)
    return sae.encode(x), sae.reconstruct(x)


@torch.no_grad()
def core_metrics(lm: LoadedModel, sae, rows: torch.Tensor, cfg: EvaluateConfig) -> tuple[dict, dict]:
    """(core, t_curves): reconstruction metrics per bin and position kind, and per-latent firing by bin.

    Each bin pools `cfg.n_draws` independent mask draws; its FVU per draw and a t-interval over draws sit
    beside the pooled value (`fvu_draws`, `fvu_ci`), since one draw can land far from the others."""
    hook, out_hook = sae.cfg.hook_name, sae.cfg.hook_name_out
    n = sae.cfg.n_latents
    core, rates = {}, []
    pooled = {p: _Stats(n) for p in ("masked", "visible")}
    for b, t in enumerate(cfg.t_bins):
        stats = {p: _Stats(n) for p in POSITIONS}
        per_draw: dict[str, list[float]] = {p: [] for p in POSITIONS}
        for d in range(cfg.n_draws):
            draw = {p: _Stats(n) for p in POSITIONS}
            for s in range(0, rows.shape[0], cfg.batch_size):
                # draw 0 keeps the masks of a single-draw run; later draws move the seed
                x0, xt, c = draw_masks(lm, rows[s:s + cfg.batch_size].to(lm.device), t, cfg.seed + 7919 * d, b, s)
                acts = run_with_cache(lm, xt, list(dict.fromkeys([hook, out_hook])))
                x, y = acts[hook].flatten(0, 1), acts[out_hook].flatten(0, 1).to(sae.device).float()
                lat, y_hat = _encode_reconstruct(sae, x)
                masked = c.mask.flatten().to(y.device)
                for p, sel in (("all", slice(None)), ("masked", masked), ("visible", ~masked)):
                    stats[p].add(y[sel], y_hat[sel], lat[sel])
                    draw[p].add(y[sel], y_hat[sel], lat[sel])
                pooled["masked"].add(y[masked], y_hat[masked], lat[masked])
                pooled["visible"].add(y[~masked], y_hat[~masked], lat[~masked])
            for p in POSITIONS:
                if draw[p].n:
                    per_draw[p].append(draw[p].result()["fvu"])
        core[f"{t:g}"] = {p: st.result() | ({"fvu_draws": per_draw[p], "fvu_ci": t_interval(per_draw[p])}
                                            if per_draw[p] else {}) for p, st in stats.items()}
        rates.append(stats["all"].fired / max(stats["all"].n, 1))
    r_m = pooled["masked"].fired / max(pooled["masked"].n, 1)
    r_v = pooled["visible"].fired / max(pooled["visible"].n, 1)
    alive = (r_m + r_v) > 0
    share = torch.where(alive, r_m / (r_m + r_v).clamp_min(1e-30), torch.full_like(r_m, float("nan")))
    n_alive = max(int(alive.sum()), 1)
    curves = {"t_bins": list(cfg.t_bins), "rate_by_bin": torch.stack(rates).t().float().tolist(),
              "masked_share": share.float().tolist(), "alive_fraction": float(alive.double().mean()),
              "mostly_masked_fraction": float((share[alive] > 0.8).sum()) / n_alive,
              "mostly_visible_fraction": float((share[alive] < 0.2).sum()) / n_alive}
    return core, curves


def splice_metrics(lm: LoadedModel, sae, rows: torch.Tensor, cfg: EvaluateConfig) -> dict:
    """ΔCE and ΔELBO [95% interval over sequences] per bin for splicing at all / masked / visible positions."""
    out = {}
    for p in POSITIONS:
        r = splice_eval(lm, sae, rows, SpliceConfig(t_bins=cfg.t_bins, positions=p, n_seqs=cfg.splice_seqs,
                                                    batch_size=cfg.batch_size, seed=cfg.seed))
        out[p] = {label: {"delta_ce": e["delta_ce"], "delta_elbo": e["delta_elbo"], "clean_ce": e["clean"]["ce"][0]}
                  for label, e in r["bins"].items() if label != "dlmscope"}
    return out


# ---- labels computable offline -------------------------------------------------------------------------------

def _token_strings(lm: LoadedModel) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in range(lm.vocab_size)]


def token_class(text: str) -> int:
    """Index into TOKEN_CLASSES of a token's stripped text, or -1 (none of them)."""
    s = text.strip()
    if not s:
        return -1
    if s.isdigit():
        return 0
    if keyword.iskeyword(s):
        return 1
    if s.isidentifier():
        return 2
    if all(ch in string.punctuation for ch in s):
        return 3
    return -1


def _task_sequences(lm: LoadedModel, task: str, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of test examples (prompt + answer) and per-token labels (-1 where unlabelled).

    Sudoku labels only the cells the puzzle hides (a given is in the prompt: reading it is no evidence of solving)."""
    from ..tasks import get_task

    seqs, labels = [], []
    for ex in get_task(task).examples("test", n, seed=0):
        prompt = lm.to_tokens(ex.prompt)[0]
        answer = lm.to_tokens(ex.answer, add_bos=False)[0]
        pieces = [lm.tokenizer.decode([i]).strip() for i in answer]
        if task == "sudoku":
            if pieces != list(ex.answer):
                continue  # the tokenizer merged digits: cells are not one token each
            lab = [int(ch) - 1 if given == "0" else -1 for ch, given in zip(pieces, ex.meta["puzzle"])]
        else:
            lab = [OPERATORS.index(p) if p in OPERATORS else -1 for p in pieces]
        seqs.append(prompt + answer)
        labels.append([-1] * len(prompt) + lab)
    return seqs, labels


@torch.no_grad()
def _probe_data(lm: LoadedModel, sae, label_set: str, rows: torch.Tensor, cfg: EvaluateConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any, torch.Tensor] | None:
    """(raw activations, latents, labels, masked, class names, groups) at labelled positions, half of all tokens
    masked; a group is the row or task example a position comes from, so train and test can be split by it."""
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    if label_set == "token_class":
        strings = _token_strings(lm)
        cls = torch.tensor([token_class(s) for s in strings])
        batches = [(rows[s:s + cfg.batch_size], cls[rows[s:s + cfg.batch_size]])
                   for s in range(0, rows.shape[0], cfg.batch_size)]
        names = TOKEN_CLASSES
    else:
        task = "sudoku" if label_set == "sudoku_digit" else "countdown"
        seqs, labels = _task_sequences(lm, task, 200)
        if not seqs:
            return None
        names = ("1", "2", "3", "4") if task == "sudoku" else OPERATORS
        batches = [(torch.tensor([s]), torch.tensor([lab])) for s, lab in zip(seqs, labels)]
    xs, zs, ys, ms, gs, seen = [], [], [], [], [], 0
    for ids, lab in batches:
        c = corrupt(ids, lm.require_mask_id(), 0.5, eps=0.0, keep_first=True, generator=gen)
        x = run_with_cache(lm, c.xt.to(lm.device), [sae.cfg.hook_name])[sae.cfg.hook_name].float()
        keep = lab >= 0
        xs.append(x[keep.to(x.device)].cpu())
        zs.append(sae.encode(x[keep.to(x.device)].to(sae.device)).cpu())
        ys.append(lab[keep])
        ms.append(c.mask[keep])
        gs.append((seen + torch.arange(ids.shape[0]))[:, None].expand_as(lab)[keep])
        seen += ids.shape[0]
    return torch.cat(xs), torch.cat(zs), torch.cat(ys), torch.cat(ms), names, torch.cat(gs)


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, iters: int = 100) -> tuple[torch.Tensor, float]:
    """Binary logistic regression (weights, bias) in X's own coordinates; features standardised while fitting."""
    X, y = X.double(), y.double()
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8)
    Xs = (X - mu) / sd
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Xs @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw, float(b.detach() - (w_raw * mu).sum())


def _balanced_split(pos: torch.Tensor, neg: torch.Tensor, cap: int, gen: torch.Generator):
    n = min(len(pos), len(neg), cap)
    pos, neg = pos[torch.randperm(len(pos), generator=gen)[:n]], neg[torch.randperm(len(neg), generator=gen)[:n]]
    cut = int(0.8 * n)
    return torch.cat([pos[:cut], neg[:cut]]), torch.cat([pos[cut:], neg[cut:]]), cut


def _accuracy(X, y, w, b, masked) -> dict:
    pred = (X.double() @ w + b) > 0
    right = (pred == y.bool()).double()
    return {p: float(right[sel].mean()) if int(sel.sum()) else None
            for p, sel in (("all", torch.ones_like(masked)), ("masked", masked), ("visible", ~masked))}


def top_mean_diff(Z: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The k latents with the largest |mean(positives) - mean(negatives)| (SAEBench's selection)."""
    diff = Z[y.bool()].mean(0) - Z[~y.bool()].mean(0)
    return diff.abs().topk(min(k, Z.shape[1])).indices


def _group_split(pos: torch.Tensor, neg: torch.Tensor, in_test: torch.Tensor, cap: int, gen: torch.Generator):
    """Balanced train and test index sets, train from positions outside the test groups, test from those inside
    (`in_test`: per position); train takes up to 80% of `cap` pairs, test the rest."""
    def draw(p, n, k):
        p, n = p[torch.randperm(len(p), generator=gen)], n[torch.randperm(len(n), generator=gen)]
        k = min(len(p), len(n), k)
        return torch.cat([p[:k], n[:k]]), k

    train, cut = draw(pos[~in_test[pos]], neg[~in_test[neg]], int(0.8 * cap))
    test, n_test = draw(pos[in_test[pos]], neg[in_test[neg]], cap - int(0.8 * cap))
    return train, test, cut, n_test


def sparse_probing(X, Z, Y, M, names, cfg: EvaluateConfig, groups: torch.Tensor | None = None) -> dict:
    """Per class one-vs-rest: residual-stream probe vs k-sparse SAE probes; accuracies averaged over classes.

    Train and test are split by `groups` (a fifth of the groups, e.g. puzzles, held out), so no group lends
    positions to both sides; without groups every position is its own."""
    gen = torch.Generator().manual_seed(cfg.seed)
    groups = torch.arange(len(Y)) if groups is None else groups
    ids = groups.unique()
    held = ids[torch.randperm(len(ids), generator=gen)[:max(1, len(ids) // 5)]]
    in_test = torch.isin(groups, held)
    per_class = {}
    for c, name in enumerate(names):
        pos, neg = (Y == c).nonzero().squeeze(1), ((Y != c) & (Y >= 0)).nonzero().squeeze(1)
        train, test, cut, n_test = _group_split(pos, neg, in_test, cfg.probe_examples, gen)
        if cut < 5 or n_test < 2:
            continue
        y_tr = torch.cat([torch.ones(cut), torch.zeros(cut)])
        y_te = torch.cat([torch.ones(n_test), torch.zeros(n_test)])
        w, b = fit_logistic(X[train], y_tr)
        entry = {"n_train": 2 * cut, "n_test": 2 * n_test, "residual": _accuracy(X[test], y_te, w, b, M[test]),
                 "sae": {}}
        for k in cfg.probe_k:
            idx = top_mean_diff(Z[train], y_tr, k)
            w, b = fit_logistic(Z[train][:, idx], y_tr)
            entry["sae"][str(k)] = _accuracy(Z[test][:, idx], y_te, w, b, M[test])
        per_class[name] = entry
    if not per_class:
        return {"skipped": "too few labelled tokens"}

    def mean(get) -> dict:
        out = {}
        for p in POSITIONS:
            vals = [get(e)[p] for e in per_class.values() if get(e)[p] is not None]
            out[p] = sum(vals) / len(vals) if vals else None
        return out

    return {"classes": per_class, "residual": mean(lambda e: e["residual"]),
            "sae": {str(k): mean(lambda e, k=k: e["sae"][str(k)]) for k in cfg.probe_k}}


def _f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    tp = float((pred & y).sum())
    return 2 * tp / max(float(pred.sum()) + float(y.sum()), 1.0)


def absorption_scores(x: torch.Tensor, lat: torch.Tensor, probe: torch.Tensor, main: list[int],
                      W_dec: torch.Tensor) -> tuple[list[float], list[bool]]:
    """SAEBench's absorption fraction and full-absorption flag for each token (rows of x / lat)."""
    p = probe / probe.norm()
    cos = torch.nn.functional.cosine_similarity(W_dec.float(), p[None].float(), dim=-1)
    proj = lat * cos  # each latent's projection onto the probe
    act_proj = x.float() @ p.float()
    fractions, full = [], []
    others = torch.ones(W_dec.shape[0], dtype=torch.bool)
    others[main] = False
    for i in range(x.shape[0]):
        a, pr = float(act_proj[i]), proj[i]
        main_proj = float(pr[main].sum())
        cand = pr[others & (cos >= 0.1) & (pr > 0)]
        absorbing = float(cand.topk(min(3, cand.numel())).values.sum()) if cand.numel() else 0.0
        if main_proj >= a or absorbing / a < 0.4:
            frac = 0.0
        elif main_proj <= 0:
            frac = 1.0
        else:
            got = min(absorbing, a - main_proj)
            frac = min(max(got / (got + main_proj), 0.0), 1.0)
        fractions.append(frac)
        top = int(pr.argmax())
        full.append(bool((lat[i, main] < 1e-8).all()) and float(cos[top]) >= 0.025 and a >= 0
                    and float(pr[top]) / a >= 0.4)
    return fractions, full


@torch.no_grad()
def first_letter_absorption(lm: LoadedModel, sae, rows: torch.Tensor, cfg: EvaluateConfig) -> dict:
    """Mean absorption fraction and full-absorption rate over first letters (see the module docstring)."""
    if sae.cfg.hook_name_out != sae.cfg.hook_name:
        return {"skipped": "a transcoder's decoder writes to another hook than the one it reads"}
    strings = _token_strings(lm)
    letter = torch.tensor([ord(s.strip()[0].lower()) - 97 if len(s.strip()) >= 2 and s.strip().isascii()
                           and s.strip().isalpha() else -1 for s in strings])
    xs, ys = [], []
    for s in range(0, rows.shape[0], cfg.batch_size):
        x0, xt, c = draw_masks(lm, rows[s:s + cfg.batch_size].to(lm.device), 0.1, cfg.seed, 99, s)
        lab = letter[x0.cpu()]
        keep = (lab >= 0) & ~c.mask.cpu()
        x = run_with_cache(lm, xt, [sae.cfg.hook_name])[sae.cfg.hook_name].float().cpu()
        xs.append(x[keep])
        ys.append(lab[keep])
    X, Y = torch.cat(xs), torch.cat(ys)
    Z = sae.encode(X.to(sae.device)).cpu()
    W_dec = (sae.W_dec.detach().float() / sae.output_scale).cpu()
    gen = torch.Generator().manual_seed(cfg.seed)
    letters: dict[str, dict[str, Any]] = {}
    for L in range(26):
        pos, neg = (Y == L).nonzero().squeeze(1), (Y != L).nonzero().squeeze(1)
        train, test, cut = _balanced_split(pos, neg, cfg.probe_examples, gen)
        if cut < 20:
            continue
        y_tr = torch.cat([torch.ones(cut), torch.zeros(cut)]).bool()
        y_te = torch.cat([torch.ones(len(test) // 2), torch.zeros(len(test) // 2)]).bool()
        w, b = fit_logistic(X[train], y_tr)
        order = top_mean_diff(Z[train], y_tr, 10)
        f1s = []
        for k in range(1, len(order) + 1):
            wk, bk = fit_logistic(Z[train][:, order[:k]], y_tr)
            f1s.append(_f1((Z[test][:, order[:k]].double() @ wk + bk) > 0, y_te))
        k = 1
        while k < len(f1s) and f1s[k] - f1s[k - 1] > 0.03:
            k += 1
        main = order[:k].tolist()
        hits = test[:len(test) // 2][(X[test[:len(test) // 2]].double() @ w + b) > 0]  # probe-correct positives
        if len(hits) == 0:
            continue
        frac, full = absorption_scores(X[hits], Z[hits], w.float(), main, W_dec)
        letters[chr(97 + L)] = {"n": len(hits), "main_latents": main, "absorption_fraction": sum(frac) / len(frac),
                                "full_absorption": sum(full) / len(full)}
    if len(letters) < 2:
        return {"skipped": f"only {len(letters)} first letter(s) have 20+ single-token words in the held-out text"}
    return {"letters": letters,
            "mean_absorption_fraction": sum(v["absorption_fraction"] for v in letters.values()) / len(letters),
            "mean_full_absorption": sum(v["full_absorption"] for v in letters.values()) / len(letters)}


def evaluate_sae_suite(lm: LoadedModel, sae, rows: torch.Tensor, cfg: EvaluateConfig = EvaluateConfig()) -> dict:
    """Every section of the suite; see the module docstring."""
    from tqdm import tqdm

    check_sae_matches(lm, sae)
    if lm.causal:
        raise DLMScopeError(f"{lm.name} is autoregressive; the evaluation suite needs a diffusion model")
    too_many = [k for k in cfg.probe_k if k > sae.cfg.n_latents] if cfg.probes else []
    if too_many:
        raise DLMScopeError(f"probe_k={too_many[0]} exceeds the SAE's {sae.cfg.n_latents} latents; allowed: "
                            f"1..{sae.cfg.n_latents}")
    rows = rows[: cfg.n_seqs]
    if rows.shape[0] == 0:
        raise DLMScopeError("no held-out sequences to evaluate on")
    result: dict[str, Any] = {"sae": {"hook": sae.cfg.hook_name, "hook_out": sae.cfg.hook_name_out, "architecture": sae.cfg.architecture,
                      "k": sae.cfg.k, "n_latents": sae.cfg.n_latents}, "model": lm.name, "config": asdict(cfg)}
    steps = ["core"] + (["splice"] if cfg.splice_seqs else []) + [f"probe:{p}" for p in cfg.probes] + \
        (["absorption"] if cfg.absorption else [])
    result["probing"] = {}
    for step in tqdm(steps, desc="evaluate", leave=False):
        if step == "core":
            result["core"], result["t_curves"] = core_metrics(lm, sae, rows, cfg)
        elif step == "splice":
            result["splice"] = splice_metrics(lm, sae, rows, cfg)
        elif step == "absorption":
            result["absorption"] = first_letter_absorption(lm, sae, rows, cfg)
        else:
            data = _probe_data(lm, sae, step[6:], rows, cfg)
            result["probing"][step[6:]] = sparse_probing(*data[:5], cfg, groups=data[5]) if data else \
                {"skipped": "no labelled tokens"}
    return result


def summary_rows(result: dict) -> list[dict]:
    """One row per bin: FVU / L0 on masked and visible positions and ΔCE of an all-position splice."""
    rows = []
    for t, e in result["core"].items():
        splice = result.get("splice", {}).get("all", {}).get(f"{float(t):.1f}", {})
        rows.append({"t": float(t), "fvu_masked": e["masked"].get("fvu"), "fvu_visible": e["visible"].get("fvu"),
                     "l0_masked": e["masked"].get("l0"), "l0_visible": e["visible"].get("l0"),
                     "delta_ce": (splice.get("delta_ce") or [None])[0]})
    return rows


def find_evaluation(sae: str, store: str | Path | None = None) -> Path | None:
    """The evaluation.json shown for an SAE: in the feature store, else beside the SAE (registry name or folder)."""
    from ..sae.registry import REGISTRY, registry

    entry = registry().get(str(sae))
    folder = REGISTRY.parent / entry["path"] if entry else Path(str(sae)).expanduser()
    candidates = ([Path(store) / "evaluation.json"] if store else []) + [folder / "evaluation.json"]
    return next((p for p in candidates if p.is_file()), None)


def write_report(result: dict, folder: str | Path) -> Path:
    """evaluation.json and evaluation.html (plotly) in `folder`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..io_utils import atomic_write_json, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "evaluation.json", result)
    bins = [float(t) for t in result["core"]]
    fig = make_subplots(rows=2, cols=2, subplot_titles=("FVU by mask ratio", "L0 by mask ratio",
                                                        "latents' masked share r_m / (r_m + r_v)",
                                                        "sparse probing accuracy (all test positions)"))
    for p in POSITIONS:
        fig.add_trace(go.Scatter(x=bins, y=[result["core"][t][p].get("fvu") for t in result["core"]], name=f"FVU {p}"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=bins, y=[result["core"][t][p].get("l0") for t in result["core"]], name=f"L0 {p}"),
                      row=1, col=2)
    share = [s for s in result["t_curves"]["masked_share"] if not math.isnan(s)]
    fig.add_trace(go.Histogram(x=share, nbinsx=20, name="masked share"), row=2, col=1)
    for name, pr in result.get("probing", {}).items():
        if "sae" in pr:
            ks = list(pr["sae"])
            fig.add_trace(go.Scatter(x=[int(k) for k in ks], y=[pr["sae"][k]["all"] for k in ks], name=f"{name} SAE"),
                          row=2, col=2)
            fig.add_trace(go.Scatter(x=[int(k) for k in ks], y=[pr["residual"]["all"]] * len(ks), name=f"{name} residual",
                                     line={"dash": "dot"}), row=2, col=2)
    fig.update_xaxes(title_text="mask ratio t", row=1, col=1)
    fig.update_xaxes(title_text="mask ratio t", row=1, col=2)
    fig.update_xaxes(title_text="k latents", type="log", row=2, col=2)
    sae = result["sae"]
    fig.update_layout(height=850, title=f"dlmscope evaluate: {sae['architecture']} SAE at {sae['hook']} on {result['model']}")
    atomic_write_text(folder / "evaluation.html", fig.to_html(include_plotlyjs=True))
    return folder / "evaluation.json"
